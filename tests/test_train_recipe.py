"""The training recipe end to end on a tiny corpus: prepare, train, checkpoint, resume,
export; the export loads in codevista and transformers with identical greedy output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from codevista.models.engine import Engine, SamplingParams
from codevista.models.loader import load_model
from codevista.models.train import train as recipe
from tiny_models import load_reference

CODE = {
    "python": "def add(a, b):\n    return a + b\n\n\nclass Stack:\n    def push(self, x):\n"
              "        self.items.append(x)\n",
    "java": "public class Max {\n    static int max(int a, int b) {\n        return a > b ? a : b;"
            "\n    }\n}\n",
    "go": "package main\n\nfunc main() {\n\tfmt.Println(\"hi\")\n}\n",
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("recipe")
    corpus, pairs, run = root / "corpus", root / "pairs", root / "run"
    corpus.mkdir()
    pairs.mkdir()
    for split in ("train", "valid", "test"):
        rows = [{"lang": lang, "source": "t", "path": f"{lang}{i}", "text": text * (i + 1)}
                for i in range(12) for lang, text in CODE.items()]
        (corpus / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for split in ("train", "valid"):
        (pairs / f"{split}.java-cs.txt.java").write_text("public int f() { return 1; }\n" * 20)
        (pairs / f"{split}.java-cs.txt.cs").write_text("public int F() { return 1; }\n" * 20)
    recipe.main(["prepare", "--corpus", str(corpus), "--pairs", str(pairs), "--run", str(run),
                 "--vocab", "400", "--scale", "0.001"])
    return run


TINY = ["--dim", "32", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--ffn", "64",
        "--batch", "2", "--seq-len", "64", "--log-every", "1", "--save-every", "3",
        "--device", "cpu"]


def test_prepare_writes_token_streams(prepared: Path):
    import numpy as np

    tokens = np.load(prepared / "train.tokens.npy")
    starts = np.load(prepared / "train.starts.npy")
    assert tokens.dtype == np.uint16 and len(tokens) > 1000
    assert starts[0] == 0 and (np.diff(starts) > 0).all()
    assert (prepared / "tokenizer" / "tokenizer.json").is_file()


def test_resume_continues_exactly(prepared: Path, tmp_path: Path):
    import shutil

    a = tmp_path / "a"
    shutil.copytree(prepared, a)
    recipe.main(["train", "--run", str(a), "--steps", "6", *TINY])
    # The same run interrupted at step 3, then resumed to 6.
    c = tmp_path / "c"
    shutil.copytree(prepared, c)
    recipe.main(["train", "--run", str(c), "--steps", "3", *TINY])
    state = json.loads((c / "ckpt" / "state.json").read_text())
    assert state["step"] == 3
    recipe.main(["train", "--run", str(c), "--steps", "6", *TINY])
    from safetensors.torch import load_file

    wa = load_file(str(a / "ckpt" / "model.safetensors"))
    wc = load_file(str(c / "ckpt" / "model.safetensors"))
    assert all(torch.allclose(wa[k], wc[k], atol=1e-6) for k in wa)
    assert (a / "loss.png").is_file()


def test_export_loads_in_codevista_and_transformers(prepared: Path, tmp_path: Path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(prepared, run)
    recipe.main(["train", "--run", str(run), "--steps", "3", *TINY])
    export = run / "latest-hf"
    # the context it was trained on, not the rotary table's size
    assert json.loads((export / "config.json").read_text())["max_position_embeddings"] == 64
    ref = load_reference(export)
    ids = [5, 17, 33, 9, 40]
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12,
                           min_new_tokens=12, pad_token_id=0)
    with Engine(load_model(export)) as engine:
        ours = engine.generate(ids, SamplingParams(max_new_tokens=12, ignore_eos=True))
    assert ours.token_ids == out[0, len(ids):].tolist()


def test_lr_restart_starts_a_new_warmup_and_cosine():
    # Continued run: from step 10 a fresh schedule over steps 10..30, ending at the floor.
    assert recipe.lr_at(0, 20, 1e-3, 5, 1e-4) == pytest.approx(2e-4)
    assert recipe.lr_at(4, 20, 1e-3, 5, 1e-4) == pytest.approx(1e-3)
    assert recipe.lr_at(20, 20, 1e-3, 5, 1e-4) == pytest.approx(1e-4)


def test_continued_run_with_translation_share_resumes_exactly(prepared: Path, tmp_path: Path):
    """`pairs` tokenizes the pairs with the run's tokenizer; a continuation that draws half
    of every batch from them and restarts its schedule resumes exactly, and its
    translation valid loss is recorded."""
    import shutil

    import numpy as np
    from safetensors.torch import load_file

    base = tmp_path / "base"
    shutil.copytree(prepared, base)
    recipe.main(["train", "--run", str(base), "--steps", "3", *TINY])
    pairs_dir = tmp_path / "pairs"
    pairs_dir.mkdir()
    for split in ("train", "valid"):
        (pairs_dir / f"{split}.java-cs.txt.java").write_text("int g() { return 2; }\n" * 30)
        (pairs_dir / f"{split}.java-cs.txt.cs").write_text("int G() { return 2; }\n" * 30)
    recipe.main(["pairs", "--pairs", str(pairs_dir), "--run", str(base)])
    tokens = np.load(base / "pairs-train.tokens.npy")
    starts = np.load(base / "pairs-train.starts.npy")
    assert len(starts) == 60 and tokens.dtype == np.uint16
    more = ["--restart", "3", "--pair-fraction", "0.5"]

    a = tmp_path / "a"
    shutil.copytree(base, a)
    recipe.main(["train", "--run", str(a), "--steps", "9", *more, *TINY])
    state = json.loads((a / "ckpt" / "state.json").read_text())
    assert [s for s, _ in state["pair_valid_loss"]] == [6, 9]
    # Interrupted at 6 and resumed (same checkpoints, same data order, same schedule).
    c2 = tmp_path / "c2"
    shutil.copytree(base, c2)
    recipe.main(["train", "--run", str(c2), "--steps", "6", *more, *TINY])
    recipe.main(["train", "--run", str(c2), "--steps", "9", *more, *TINY])
    wa = load_file(str(a / "ckpt" / "model.safetensors"))
    wc = load_file(str(c2 / "ckpt" / "model.safetensors"))
    assert all(torch.allclose(wa[k], wc[k], atol=1e-6) for k in wa)
    # The pair rows change training: without them the weights differ.
    d = tmp_path / "d"
    shutil.copytree(base, d)
    recipe.main(["train", "--run", str(d), "--steps", "9", "--restart", "3", *TINY])
    wd = load_file(str(d / "ckpt" / "model.safetensors"))
    assert any(not torch.allclose(wa[k], wd[k]) for k in wa)


def test_pair_fraction_without_pairs_stream_is_refused(prepared: Path, tmp_path: Path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(prepared, run)
    with pytest.raises(SystemExit, match="run `pairs` first"):
        recipe.main(["train", "--run", str(run), "--steps", "2", "--pair-fraction", "0.5",
                     *TINY])


def test_prepare_reuses_a_tokenizer_and_adds_extra_files(prepared: Path, tmp_path: Path):
    """A larger run keeps the shipped model's token ids and reads more train files."""
    import numpy as np
    from tokenizers import Tokenizer

    corpus = Path(json.loads((prepared / "prepare.json").read_text())["corpus"])
    pairs = Path(json.loads((prepared / "prepare.json").read_text())["pairs"])
    marker = "def extra_function_only_in_the_extra_file(zebra):\n    return zebra\n"
    extra = tmp_path / "extra.jsonl"
    extra.write_text(json.dumps({"lang": "python", "source": "x", "path": "x.py",
                                 "text": marker * 3}) + "\n")
    run = tmp_path / "run"
    recipe.main(["prepare", "--corpus", str(corpus), "--pairs", str(pairs), "--run", str(run),
                 "--scale", "1", "--tokenizer", str(prepared / "tokenizer"),
                 "--extra", str(extra)])
    assert ((run / "tokenizer" / "tokenizer.json").read_bytes()
            == (prepared / "tokenizer" / "tokenizer.json").read_bytes())
    info = json.loads((run / "prepare.json").read_text())
    assert info["vocab"] == Tokenizer.from_file(
        str(prepared / "tokenizer" / "tokenizer.json")).get_vocab_size()
    assert info["extra"] == [str(extra)]
    tok = Tokenizer.from_file(str(run / "tokenizer" / "tokenizer.json"))
    train_text = tok.decode(np.load(run / "train.tokens.npy").tolist(),
                            skip_special_tokens=False)
    valid_text = tok.decode(np.load(run / "valid.tokens.npy").tolist(),
                            skip_special_tokens=False)
    assert "zebra" in train_text and "zebra" not in valid_text


def test_time_budget_fixes_the_total_from_the_measured_rate(monkeypatch: pytest.MonkeyPatch):
    clock = [1000.0]
    monkeypatch.setattr(recipe.time, "time", lambda: clock[0])
    b = recipe.TimeBudget(100.0, None, 10_000, 0)
    assert b.total == 10_000
    fixed_at = None
    for step in range(1, 10_000):
        clock[0] += 0.5  # half a second a step
        if b.tick(step) and fixed_at is None:
            fixed_at = step
        if step >= b.total:
            break
    assert fixed_at == b.SKIP + b.CALIBRATE
    # 100 s less the reserve, at 0.5 s a step: about 184 steps, ending inside the budget
    assert abs(b.total - 100 * (1 - b.RESERVE) / 0.5) <= 2
    assert clock[0] - 1000.0 <= 100.0
    # a resumed run keeps the total it fixed
    assert recipe.TimeBudget(100.0, 184, 10_000, 50).total == 184


def test_time_budget_measures_again_and_stops_a_slowed_run(monkeypatch: pytest.MonkeyPatch):
    clock = [0.0]
    monkeypatch.setattr(recipe.time, "time", lambda: clock[0])
    b = recipe.TimeBudget(100.0, None, 10_000, 0)
    step = 0
    while step < b.total:
        step += 1
        # slow during calibration (start-up work beside it), then twice as fast
        clock[0] += 0.5 if step <= b.SKIP + b.CALIBRATE else 0.25
        b.tick(step)
    assert step == b.total and clock[0] <= 100.0
    assert step > 300  # re-measured: far more than the 184 steps of the first rate
    slow = recipe.TimeBudget(100.0, None, 10_000, 0)
    step = 0
    while step < slow.total:
        step += 1
        clock[0] += 0.5 if step <= 100 else 2.0  # slows down after it was measured
        slow.tick(step)
    assert slow.total == step and step < 184


def test_gpu_scripts_parse_and_name_their_inputs():
    """The one-shot GPU scripts (run on a borrowed machine, smoke-tested on CPU with
    SMOKE=1) are valid bash and read the inputs their headers list; both source the common
    set-up, which installs the fonts."""
    import subprocess

    train = Path(__file__).resolve().parents[1] / "models" / "train"
    needs = {
        "gpu_run.sh": ("corpus/$s.jsonl.xz", '"$INPUT"/pairs/*.xz', "--extra-python",
                       "--init-vlm", "--time-budget", "source models/train/gpu_env.sh"),
        "gpu_vlm.sh": ("$INPUT/init}", "--init-vlm", "--time-budget", "INIT_A", "INIT_B",
                       "source models/train/gpu_env.sh"),
        "gpu_env.sh": ('"$INPUT"/fonts/*.ttf', "PYTHONPATH"),
    }
    for name, needed in needs.items():
        subprocess.run(["bash", "-n", str(train / name)], check=True)
        text = (train / name).read_text()
        for n in needed:
            assert n in text, (name, n)


def test_plain_chunks_end_with_eot_only_at_the_end_of_their_file():
    """An EOT after every ~1 500-character chunk (each ends at a line start) taught a model
    that code ends wherever a line does; only a file's last chunk ends with one now."""
    import random

    from codevista.models import formats
    from codevista.models.train.data import render_chunk

    chunk = "x = 1\ny = 2\nz = x + y\n"
    kinds = set()
    for seed in range(200):
        rng_a, rng_b = random.Random(seed), random.Random(seed)
        inner = render_chunk("python", chunk, rng_a, last=False)
        final = render_chunk("python", chunk, rng_b, last=True)
        if final == inner:  # FIM inside the file: the middle always ends with EOT
            assert formats.FIM_MIDDLE in final and final.endswith(formats.EOT)
            kinds.add("fim")
            continue
        assert final == inner + formats.EOT and not inner.endswith(formats.EOT)
        if formats.FIM_MIDDLE in final:  # written at the end of the file: no suffix
            suffix = final.split(formats.FIM_SUFFIX)[1].split(formats.FIM_PREFIX)[0]
            prefix = final.split(formats.FIM_PREFIX)[1].split(formats.FIM_MIDDLE)[0]
            middle = inner.split(formats.FIM_MIDDLE)[1]
            assert suffix in ("", "\n") and prefix + middle + suffix == chunk
            kinds.add("end of file")
        else:
            kinds.add("plain")
    assert kinds == {"fim", "end of file", "plain"}


def test_batches_never_score_language_tags(prepared: Path):
    import numpy as np

    tags = recipe.language_tag_ids(prepared / "tokenizer" / "tokenizer.json")
    assert len(tags) == 9
    plain = recipe.Batches(prepared / "train", 64)
    masked = recipe.Batches(prepared / "train", 64, tags)
    x0, y0 = plain.get(np.random.default_rng(1), 8)
    x1, y1 = masked.get(np.random.default_rng(1), 8)
    assert torch.equal(x0, x1)
    is_tag = torch.isin(y0, torch.tensor(tags))
    assert is_tag.any()  # samples start with a tag, so some target is one
    assert (y1[is_tag] == -1).all() and torch.equal(y1[~is_tag], y0[~is_tag])


def test_a_restart_fits_a_new_total_to_its_own_time_budget(prepared: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch):
    """A total fixed by a time budget is kept on resume, but not by a --restart, which
    starts a new schedule (it used to end at once, at the old total)."""
    import shutil

    monkeypatch.setattr(recipe.TimeBudget, "SKIP", 1)
    monkeypatch.setattr(recipe.TimeBudget, "CALIBRATE", 2)
    run = tmp_path / "run"
    shutil.copytree(prepared, run)
    tiny = [a for a in TINY if a not in ("--save-every", "3")] + ["--save-every", "1000"]
    recipe.main(["train", "--run", str(run), "--steps", "8", "--time-budget", "600", *tiny])
    state = json.loads((run / "ckpt" / "state.json").read_text())
    assert state["step"] == state["total_steps"] == 8 and state["total_restart"] == 0
    recipe.main(["train", "--run", str(run), "--steps", "12", "--restart", "8",
                 "--time-budget", "600", *tiny])
    state = json.loads((run / "ckpt" / "state.json").read_text())
    assert state["step"] == state["total_steps"] == 12 and state["total_restart"] == 8


def test_a_run_can_start_from_a_released_model(prepared: Path, tmp_path: Path):
    """--init-hf: the continued run's first step starts from the export's weights (its
    step-1 weights equal one step taken from them), and a wrong shape is refused."""
    import shutil

    from codevista.models.train.model import CodeLM, ModelShape
    from safetensors.torch import load_file

    first = tmp_path / "first"
    shutil.copytree(prepared, first)
    recipe.main(["train", "--run", str(first), "--steps", "3", *TINY, "--context", "48",
                 "--warmup", "1"])  # weights far from the seed's initial ones
    released = first / "latest-hf"
    assert json.loads((released / "config.json").read_text())["max_position_embeddings"] == 48
    # two continuations from the release, one step each, with the same seed: identical,
    # and different from a run started at random
    runs = []
    for name in ("b", "c", "scratch"):
        run = tmp_path / name
        shutil.copytree(prepared, run)
        init = [] if name == "scratch" else ["--init-hf", str(released)]
        recipe.main(["train", "--run", str(run), "--steps", "1", *TINY, "--lr", "1e-9",
                     *init])
        runs.append(load_file(str(run / "ckpt" / "model.safetensors")))
    start = load_file(str(released / "model.safetensors"))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in start)
    assert all(torch.allclose(runs[0][k], start[k], atol=1e-6) for k in start)
    assert not all(torch.allclose(runs[2][k], start[k], atol=1e-3) for k in start)
    wider = CodeLM(ModelShape(vocab_size=400, hidden_size=64, num_layers=2, num_heads=4,
                              num_kv_heads=2, intermediate_size=64))
    with pytest.raises(SystemExit, match="hidden_size"):
        recipe.init_from_hf(wider, released)


def test_prepare_weights_one_language(prepared: Path, tmp_path: Path):
    root = prepared.parent
    run = tmp_path / "weighted"
    recipe.main(["prepare", "--corpus", str(root / "corpus"), "--pairs", str(root / "pairs"),
                 "--run", str(run), "--tokenizer", str(prepared / "tokenizer"),
                 "--scale", "0.001", "--weight", "python=3"])
    budgets = json.loads((run / "prepare.json").read_text())["lang_bytes"]
    base = json.loads((prepared / "prepare.json").read_text())["lang_bytes"]
    assert budgets["python"] == 3 * base["python"] and budgets["java"] == base["java"]
    with pytest.raises(SystemExit, match="LANG=FACTOR"):
        recipe.main(["prepare", "--corpus", str(root / "corpus"), "--pairs",
                     str(root / "pairs"), "--run", str(tmp_path / "bad"), "--tokenizer",
                     str(prepared / "tokenizer"), "--weight", "klingon=2"])


def test_chunk_chars_sets_how_much_of_a_file_a_sample_holds(tmp_path: Path):
    """Longer chunks: fewer, longer plain samples from the same files (the context the
    model learns to use); the option is recorded in prepare.json."""
    from codevista.models.train.data import build_samples, chunks

    text = "".join(f"value_{i} = compute({i})\n" for i in range(400))  # ~9 600 chars
    assert max(len(c) for c in chunks(text, 1500)) <= 1500 + 40
    assert len(chunks(text, 3300)) < len(chunks(text, 1500))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "train.jsonl").write_text(json.dumps({"lang": "python", "text": text}) + "\n")
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    short = build_samples(corpus, pairs, "train", {"python": 10**6}, 0, 0, (), 1500)
    long = build_samples(corpus, pairs, "train", {"python": 10**6}, 0, 0, (), 3300)
    assert len(long) < len(short)
