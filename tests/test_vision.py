"""Vision: pixel and logit parity with transformers' LLaVA on tiny random CLIP+Llama and
SigLIP+Qwen2 checkpoints, both key layouts, image reuse through the prefix cache, and
hostile image bytes."""

from __future__ import annotations

import io
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from codevista.models.engine import Engine, SamplingParams
from codevista.models.kv_cache import KVCache
from codevista.models.loader import load_model
from codevista.models.vision.image import ImageError, ImageProcessor, open_image
from PIL import Image
from tiny_models import VISION, load_reference


def _photo(w: int = 61, h: int = 45, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def _reference_processor(kind: str, directory: Path):
    from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil

    cls = CLIPImageProcessorPil if kind.startswith("clip") else SiglipImageProcessorPil
    return cls.from_pretrained(directory)


@pytest.mark.parametrize("kind", list(VISION))
@pytest.mark.parametrize("size", [(61, 45), (45, 61), (20, 12), (400, 90), (32, 32)])
def test_pixels_equal_transformers_image_processor(llava_dirs, kind, size):
    directory = llava_dirs[kind]
    ours = load_model(directory).vision
    img = _photo(*size)
    ref = _reference_processor(kind, directory)(images=img, return_tensors="pt")
    assert (ours.preprocess(img) - ref["pixel_values"][0]).abs().max().item() <= 1e-5


def _logits(loaded, ids: list[int], pixels: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    with Engine(loaded) as engine:
        expanded, keyed = engine._expand_images(ids, [pixels])

        class State:
            pos = 0

            class request:  # noqa: N801
                prompt_ids = expanded
                images = keyed

        embeds = engine._embeds(State, expanded)
        cfg = loaded.config
        cache = KVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, len(expanded),
                        torch.float32, "cpu")
        ids_t = torch.tensor([max(t, 0) for t in expanded])
        return loaded.model(ids_t, cache, 0, all_logits=True, embeds=embeds), expanded


@pytest.mark.parametrize("kind", list(VISION))
def test_logits_and_greedy_tokens_equal_llava(llava_dirs, kind):
    directory = llava_dirs[kind]
    loaded = load_model(directory)
    ref = load_reference(directory)
    img = _photo()
    pixels = loaded.vision.preprocess(img)
    text = loaded.tokenizer.encode("USER: what is this? ASSISTANT:", add_special_tokens=False)
    image_id = loaded.vision.image_token_id
    ids = text[:2] + [image_id] + text[2:]
    full = ids[:2] + [image_id] * loaded.vision.tokens_per_image + ids[3:]
    with torch.no_grad():
        want = ref(input_ids=torch.tensor([full]), pixel_values=pixels[None]).logits[0]
        other = ref(input_ids=torch.tensor([full]),
                    pixel_values=loaded.vision.preprocess(_photo(seed=1))[None]).logits[0]
    got, expanded = _logits(loaded, ids, pixels)
    assert len(expanded) == len(full)
    assert (got - want).abs().max().item() <= 1e-4
    assert (other - want).abs().max().item() > 1e-2  # the image does change the answer
    with Engine(loaded) as engine:
        out = engine.generate(ids, SamplingParams(max_new_tokens=16, ignore_eos=True),
                              images=[pixels])
    ref.generation_config.eos_token_id = None  # run through EOS, as ignore_eos does
    with torch.no_grad():
        gen = ref.generate(input_ids=torch.tensor([full]), pixel_values=pixels[None],
                           max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert out.token_ids == gen[0, len(full):].tolist()


def _relayout(src: Path, dst: Path, rename) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    save_file({rename(k): v for k, v in tensors.items()}, str(dst / "model.safetensors"))
    return dst


def test_both_key_layouts_load_alike(llava_dirs, tmp_path):
    src = llava_dirs["clip_llama"]

    def hub(k: str) -> str:  # the hub's: vision_tower.vision_model.*
        return k.replace("vision_tower.", "vision_tower.vision_model.", 1)

    def new(k: str) -> str:  # the newer one: model.*, lm_head at the top
        if k.startswith("language_model.lm_head."):
            return k.removeprefix("language_model.")
        if k.startswith("language_model.model."):
            return "model.language_model." + k.removeprefix("language_model.model.")
        return "model." + k

    pixels = load_model(src).vision.preprocess(_photo())
    image_id = load_model(src).vision.image_token_id
    ids = [5, 6, image_id, 7, 8]
    base, _ = _logits(load_model(src), ids, pixels)
    for name, fn in (("hub", hub), ("new", new)):
        other, _ = _logits(load_model(_relayout(src, tmp_path / name, fn)), ids, pixels)
        assert torch.equal(base, other), name


def test_follow_up_question_reuses_the_image_from_the_prefix_cache(llava_dirs):
    loaded = load_model(llava_dirs["siglip_qwen2"])
    vision = loaded.vision
    calls = []
    encode = vision.encode
    vision.encode = lambda px: (calls.append(1), encode(px))[1]
    pixels = vision.preprocess(_photo())
    tok = loaded.tokenizer
    first = [5, vision.image_token_id] + tok.encode("what is it?", add_special_tokens=False)
    with Engine(loaded) as engine:
        a = engine.generate(first, SamplingParams(max_new_tokens=4), images=[pixels])
        follow = first + a.token_ids + tok.encode(" and why?", add_special_tokens=False)
        b = engine.generate(follow, SamplingParams(max_new_tokens=4), images=[pixels])
        assert len(calls) == 1  # the tower ran once
        assert b.cached_tokens >= 2 + vision.tokens_per_image
        # a different image at the same place shares only the text before it
        c = engine.generate(first, SamplingParams(max_new_tokens=4),
                            images=[vision.preprocess(_photo(seed=2))])
        assert c.cached_tokens == 1 and len(calls) == 2


def test_image_requests_are_checked(llava_dirs, loaded_qwen):
    from codevista.models.errors import RequestError

    loaded = load_model(llava_dirs["clip_llama"])
    pixels = loaded.vision.preprocess(_photo())
    with Engine(loaded) as engine:
        with pytest.raises(RequestError, match="image tokens"):
            engine.submit([5, 6], SamplingParams(), images=[pixels])
        with pytest.raises(RequestError, match="image tokens"):
            engine.submit([5, loaded.vision.image_token_id], SamplingParams())
    with Engine(loaded_qwen) as engine:
        with pytest.raises(RequestError, match="no vision tower"):
            engine.submit([5, 6], SamplingParams(), images=[pixels])


# -- untrusted bytes ------------------------------------------------------------------------

def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_header_only(w: int, h: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_formats_and_conversions():
    rgb = _photo(40, 30)
    for fmt in ("PNG", "JPEG", "WEBP", "BMP", "GIF"):
        out = open_image(_encode(rgb, fmt))
        assert out.mode == "RGB" and out.size == (40, 30), fmt
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    assert open_image(_encode(rgba, "PNG")).getpixel((0, 0)) == (255, 255, 255)
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))
    r, g, b = open_image(_encode(cmyk, "JPEG")).getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60
    deep = Image.fromarray(np.full((5, 5), 65535, dtype=np.uint16))
    assert open_image(_encode(deep, "PNG")).getpixel((2, 2)) == (255, 255, 255)
    assert open_image(_encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG")).size == (1, 1)
    frames = [Image.new("RGB", (6, 6), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    assert open_image(buf.getvalue()).getpixel((3, 3))[0] > 200  # the first frame
    tall = Image.new("RGB", (10, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    assert open_image(_encode(tall, "JPEG", exif=exif)).size == (20, 10)


@pytest.mark.parametrize("data,needle", [
    (b"print('not an image')\n" * 10, "not an image"),
    (b"", "empty"),
    (_png_header_only(30000, 30000), "too many pixels"),
])
def test_hostile_bytes_are_refused(data, needle):
    with pytest.raises(ImageError, match=needle):
        open_image(data)


def test_truncated_and_oversized_files_are_refused():
    png = _encode(_photo(64, 64), "PNG")
    with pytest.raises(ImageError):
        open_image(png[: len(png) // 2])
    with pytest.raises(ImageError, match="limit"):
        open_image(png, max_bytes=100)
    with pytest.raises(ImageError, match="pixels"):
        open_image(png, max_pixels=100)


def test_pad_to_square_keeps_a_wide_screenshot_whole():
    proc = ImageProcessor.from_dict({"size": {"height": 8, "width": 8}, "resample": 0,
                                     "image_aspect_ratio": "pad", "image_mean": [0, 0, 0],
                                     "image_std": [1, 1, 1]}, 8)
    wide = Image.new("RGB", (16, 4), (255, 255, 255))
    px = proc(wide)
    assert px.shape == (3, 8, 8)
    assert px[:, 0, :].max() == 0 and px[:, 4, :].min() == 1  # padding above, image in middle
    assert json.dumps(proc.pad_to_square)


def test_ocr_copy_bias_comes_from_the_checkpoint_and_covers_the_ocr_words(tmp_path):
    from types import SimpleNamespace

    from codevista.models.tokenizer import Tokenizer
    from codevista.server.features.vision import ocr_copy_bias, ocr_logit_bias

    (tmp_path / "config.json").write_text(json.dumps({"ocr_copy_bias": 3.0}))
    assert ocr_copy_bias(SimpleNamespace(path=tmp_path)) == 3.0
    for bad in ({}, {"ocr_copy_bias": "x"}, {"ocr_copy_bias": -1}, {"ocr_copy_bias": 1e9}):
        (tmp_path / "config.json").write_text(json.dumps(bad))
        assert ocr_copy_bias(SimpleNamespace(path=tmp_path)) == 0.0
    assert ocr_copy_bias(SimpleNamespace(path=tmp_path / "missing")) == 0.0

    tok = Tokenizer.from_dir(Path(__file__).resolve().parents[1] / "models" / "default" / "code")
    lines = [("jump", [0, 0, 10, 10]), ("audit  log", [0, 20, 10, 30])]
    bias = dict(ocr_logit_bias(tok, lines, 3.0))
    want = set(tok.encode(" jump", add_special_tokens=False)) | set(
        tok.encode(" audit log", add_special_tokens=False))
    assert set(bias) == want and set(bias.values()) == {3.0}
    assert ocr_logit_bias(tok, lines, 0.0) == () and ocr_logit_bias(tok, [], 3.0) == ()
    # at an answer's start a word has no space before it ("jump", which bar is highest)
    first = dict(ocr_logit_bias(tok, lines, 3.0, first_word=True))
    starts = set().union(*(tok.encode(w, add_special_tokens=False)
                           for w in ("jump", "audit", "log")))
    assert set(first) == want | starts and starts - want


def test_the_copy_bias_tasks_come_from_the_checkpoint_config(tmp_path):
    from types import SimpleNamespace

    from codevista.server.features.vision import ocr_copy_bias_tasks

    loaded = SimpleNamespace(path=tmp_path)
    assert ocr_copy_bias_tasks(loaded) == {"describe-diagram"}  # no config
    for bad in ({}, {"ocr_copy_bias_tasks": "explain"}, {"ocr_copy_bias_tasks": [1]}):
        (tmp_path / "config.json").write_text(json.dumps(bad))
        assert ocr_copy_bias_tasks(loaded) == {"describe-diagram"}
    (tmp_path / "config.json").write_text(json.dumps(
        {"ocr_copy_bias_tasks": ["describe-diagram", "explain"]}))
    assert ocr_copy_bias_tasks(loaded) == {"describe-diagram", "explain"}
