"""The default VLM's data and recipe: generated samples are right and reproducible, the
held-out split is disjoint, and a trained checkpoint loads alike in codevista and
transformers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from codevista.models.train import vlm_data
from codevista.models.train.vlm_data import HELDOUT_WORDS, TRAIN_WORDS, sample

ROOT = Path(__file__).resolve().parents[1]


def _blobs(img) -> int:
    """Connected regions of non-background pixels (4-neighbourhood)."""
    a = np.asarray(img).astype(int)
    bg = a[0, 0]
    fg = np.abs(a - bg).sum(-1) > 60
    seen = np.zeros_like(fg)
    count = 0
    for y, x in zip(*np.nonzero(fg), strict=True):
        if seen[y, x]:
            continue
        count += 1
        stack = [(y, x)]
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < fg.shape[0] and 0 <= nx < fg.shape[1] and fg[ny, nx] \
                        and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
    return count


def test_samples_are_reproducible_and_splits_disjoint():
    a, b = sample("train", 7), sample("train", 7)
    assert a.answer == b.answer and np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert not set(TRAIN_WORDS) & set(HELDOUT_WORDS)
    for seed in range(300):
        s = sample("train", seed)
        if s.kind == "diagram":
            assert set(s.meta["nodes"]) <= set(TRAIN_WORDS)
        t = sample("test", seed)
        if t.kind == "diagram":
            assert set(t.meta["nodes"]) <= set(HELDOUT_WORDS)


def test_novel_word_diagrams_force_copying_and_leave_the_default_draw_alone():
    from codevista.models.tokenizer import Tokenizer
    from codevista.models.train.vlm import SCENE_KINDS, Batcher

    novel = seen = 0
    for seed in range(300):
        plain, mixed = sample("train", seed), sample("train", seed, novel_words=0.7)
        assert mixed.kind == plain.kind
        if plain.kind != "diagram":
            # only flowcharts change: everything else is drawn exactly as before
            assert mixed.answer == plain.answer
            continue
        nodes = mixed.meta["nodes"]
        assert len(set(nodes)) == len(nodes) and not set(nodes) & set(HELDOUT_WORDS)
        if set(nodes) <= set(TRAIN_WORDS):
            seen += 1
        else:
            novel += 1
            # labels, answer and the drawn text agree
            assert [t for t, _ in mixed.meta["text_boxes"]] == nodes
            assert all(n in mixed.answer for n in nodes)
        t = sample("test", seed, novel_words=0.7)  # the held-out split never changes
        assert t.answer == sample("test", seed).answer
    assert novel > seen > 0
    # The batcher trains them with simulated OCR lines that carry the made-up labels.
    tok = Tokenizer.from_dir(ROOT / "models" / "default" / "code")
    b = Batcher(tok, 4, ocr_rate=1.0, novel_words=1.0)
    seeds = [sd for sd in range(200) if sample("train", sd).kind == "diagram"][:3]
    _, x, _ = b.batch("train", seeds)
    text = tok.decode([i for i in x[0].tolist() if i >= 0])
    assert "Text in the image (OCR" in text
    assert sample("train", seeds[0], 1.0).meta["nodes"][0] in text
    # A diagram-reading continuation turns a share of the other samples into flowcharts.
    heavy = Batcher(tok, 4, ocr_rate=1.0, novel_words=1.0, diagram_share=0.5)
    kinds = [heavy.draw("train", sd).kind for sd in range(200)]
    assert 0.45 < kinds.count("diagram") / 200 < 0.8
    assert heavy.draw("train", 5).answer == heavy.draw("train", 5).answer
    assert heavy.draw("test", 5).answer == sample("test", 5).answer
    # A counting and grounding continuation turns a share of the rest into scenes.
    scenes = Batcher(tok, 4, scene_share=0.5)
    kinds = [scenes.draw("train", sd).kind for sd in range(200)]
    base = [sample("train", sd).kind for sd in range(200)]
    share = sum(k in SCENE_KINDS for k in kinds) / 200
    assert share > sum(k in SCENE_KINDS for k in base) / 200 + 0.15
    assert scenes.draw("train", 7).answer == scenes.draw("train", 7).answer
    assert scenes.draw("test", 7).answer == sample("test", 7).answer


def test_count_answers_match_the_drawn_objects():
    checked = 0
    for seed in range(400):
        s = sample("train", seed)
        if s.kind == "count" and s.question == "How many shapes are there?":
            assert _blobs(s.image) == int(s.answer), seed
            checked += 1
    assert checked >= 20


def test_locate_boxes_cover_an_object_of_the_named_colour():
    for seed in range(400):
        s = sample("train", seed)
        if s.kind != "locate":
            continue
        color = s.question.split()[1]
        x1, y1, x2, y2 = (round(v * vlm_data.IMAGE_SIZE / 1000) for v in s.meta["box"])
        patch = np.asarray(s.image)[y1:y2, x1:x2].reshape(-1, 3).astype(int)
        want = np.array(vlm_data.COLORS[color])
        assert (np.abs(patch - want).sum(-1) < 30).mean() > 0.3, seed


def test_two_training_steps_export_a_checkpoint_both_engines_load(tmp_path):
    run, out = tmp_path / "run", tmp_path / "vlm"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, "-m", "codevista.models.train.vlm"]
    proc = subprocess.run(cmd + ["train", "--run", str(run), "--steps", "2", "--batch", "2",
                                 "--save-every", "2", "--log-every", "1"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "held-out loss" in proc.stderr and (run / "loss.png").is_file()
    proc = subprocess.run(cmd + ["export", "--run", str(run), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]

    from codevista.models import formats
    from codevista.models.engine import Engine, SamplingParams
    from codevista.models.loader import load_model
    from tiny_models import load_reference

    loaded = load_model(out)
    s = sample("test", 3)
    pixels = loaded.vision.preprocess(s.image)
    ids = loaded.tokenizer.encode(formats.vision_prompt(
        formats.vision_question(s.task, s.question)), add_special_tokens=False)
    with Engine(loaded) as engine:
        ours = engine.generate(ids, SamplingParams(max_new_tokens=8, ignore_eos=True),
                               images=[pixels]).token_ids
    ref = load_reference(out)
    ref.generation_config.eos_token_id = None
    full: list[int] = []
    for t in ids:
        full.extend([t] * loaded.vision.tokens_per_image if t == loaded.vision.image_token_id
                    else [t])
    with torch.no_grad():
        theirs = ref.generate(input_ids=torch.tensor([full]), pixel_values=pixels[None],
                              max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert ours == theirs[0, len(full):].tolist()


@pytest.mark.skipif(not (ROOT / "models" / "default" / "vlm" / "config.json").is_file(),
                    reason="the default VLM is not shipped in this checkout")
def test_the_shipped_vlm_loads_and_answers():
    from codevista.models import formats
    from codevista.models.engine import Engine, SamplingParams
    from codevista.models.loader import load_model

    loaded = load_model(ROOT / "models" / "default" / "vlm")
    assert loaded.vision is not None
    s = sample("test", 11)
    ids = loaded.tokenizer.encode(formats.vision_prompt(
        formats.vision_question(s.task, s.question)), add_special_tokens=False)
    with Engine(loaded) as engine:
        out = engine.generate(ids, SamplingParams(max_new_tokens=24),
                              images=[loaded.vision.preprocess(s.image)])
    assert out.generated_tokens > 0 and out.finish_reason in ("stop", "length")
