"""Text to image: the VQ tokenizer, generation on the engine, the PNG confined to the
workspace, rows streamed, cancellation; a tiny random checkpoint where the model's
quality does not matter, the shipped one where it does."""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
import uuid
from pathlib import Path

import pytest
import torch
from codevista.models.errors import RequestError
from codevista.models.kv_cache import KVCache
from codevista.models.vision.t2i import DEFAULT_T2I_DIR, TextToImage
from codevista.models.vision.vq import VQConfig, VQModel, psnr, save_vq, to_images, to_pixels
from PIL import Image

TINY_VQ = VQConfig(image_size=16, channels=(8, 8, 8), code_dim=4, codebook_size=16)
shipped = pytest.mark.skipif(not (DEFAULT_T2I_DIR / "config.json").is_file(),
                             reason="no shipped text-to-image model")


# -- the image tokenizer ----------------------------------------------------------------

def test_vq_shapes_and_straight_through_gradients():
    torch.manual_seed(0)
    vq = VQModel(TINY_VQ)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    rec, idx, vq_loss = vq(x)
    assert rec.shape == x.shape and idx.shape == (3, 4, 4) and idx.dtype == torch.int64
    assert 0 <= int(idx.min()) and int(idx.max()) < 16
    (torch.nn.functional.mse_loss(rec, x) + vq_loss).backward()
    # the reconstruction loss reaches the encoder only through the straight-through copy
    g = vq.encoder.conv_in.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    assert vq.quantizer.codebook.grad is not None and vq.quantizer.codebook.grad.abs().sum() > 0
    vq.eval()
    assert torch.equal(vq.encode(x), idx)
    assert vq.decode(idx).shape == (3, 3, 16, 16)
    # decoding the indices is what the forward pass computed from the quantised vectors
    assert torch.allclose(vq.decode(idx), rec.clamp(-1, 1), atol=1e-5)


def test_dead_codes_are_reseeded_from_encoder_outputs():
    torch.manual_seed(0)
    vq = VQModel(TINY_VQ)
    with torch.no_grad():  # every vector picks code 0: the other 15 are dead
        vq.quantizer.codebook[:] = -1.0
        vq.quantizer.codebook[0] = torch.tensor([1.0, 1.0, 0.0, 0.0])
        vq.encoder.conv_out.bias[:] = torch.tensor([50.0, 0.0, 0.0, 0.0])
    vq(torch.rand(2, 3, 16, 16))
    assert vq.quantizer.usage() == pytest.approx(1 / 16)
    before = vq.quantizer.codebook.detach().clone()
    assert vq.quantizer.reseed_dead(torch.Generator().manual_seed(0)) == 15
    after = vq.quantizer.codebook.detach()
    assert torch.equal(after[0], before[0]) and not torch.allclose(after[1:], before[1:])
    # re-seeded codes now lie next to encoder outputs (cosine ~1), so they get picked
    assert vq.quantizer.usage() == 0.0  # counts restart after a reseed
    vq(torch.rand(2, 3, 16, 16))
    assert vq.quantizer.usage() > 1 / 16


def test_pixels_round_trip_through_pil():
    img = Image.new("RGB", (16, 16), (220, 40, 40))
    assert to_images(to_pixels([img]))[0].getpixel((3, 3)) == (220, 40, 40)


@shipped
def test_shipped_tokenizer_reconstructs_generated_pictures():
    from codevista.models.train.t2i_data import grade, scene
    from codevista.models.vision.vq import config_from_json, load_vq

    vq = load_vq(DEFAULT_T2I_DIR, config_from_json(DEFAULT_T2I_DIR / "config.json"))
    scenes = [scene("test", 70_000 + i) for i in range(16)]
    x = to_pixels([s.image for s in scenes])
    rec = vq.decode(vq.encode(x))
    assert psnr(rec, x) > 24.0
    ok = sum(all(grade(s, im).values()) for s, im in zip(scenes, to_images(rec), strict=True))
    assert ok >= 12


# -- a tiny random checkpoint -------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_t2i(tmp_path_factory) -> Path:
    from codevista.models.train.model import CodeLM, ModelShape
    from codevista.models.train.t2i import BOI, EOI, code_token, extend_tokenizer
    from safetensors.torch import save_file
    from tiny_models import train_tokenizer

    root = tmp_path_factory.mktemp("t2i")
    train_tokenizer(root / "base")
    out = root / "model"
    extend_tokenizer(root / "base", out, TINY_VQ.codebook_size)
    vocab = json.loads((out / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in vocab["added_tokens"]}
    size = max(ids.values()) + 1
    prompt_tokens, grid = 24, TINY_VQ.grid
    shape = ModelShape(vocab_size=size, hidden_size=32, num_layers=2, num_heads=2,
                       num_kv_heads=1, intermediate_size=64,
                       max_position_embeddings=prompt_tokens + 2 + grid * grid)
    torch.manual_seed(0)
    lm = CodeLM(shape)
    save_file({k: v.contiguous() for k, v in lm.state_dict().items()},
              str(out / "model.safetensors"))
    torch.manual_seed(1)
    save_vq(VQModel(TINY_VQ), out)
    config = shape.hf_config(ids[EOI]) | {
        "image_tokenizer": TINY_VQ.to_dict(),
        "image_generation": {"prompt_tokens": prompt_tokens, "pad_token_id": 0,
                             "image_start_token_id": ids[BOI], "image_end_token_id": ids[EOI],
                             "first_code_token_id": ids[code_token(0)],
                             "codebook_size": TINY_VQ.codebook_size, "grid": grid,
                             "image_size": TINY_VQ.image_size}}
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def tiny(tiny_t2i: Path):
    model = TextToImage.load(tiny_t2i)
    yield model
    model.close()


def test_cached_row_by_row_decoding_equals_one_forward(tiny):
    gen = tiny.generate("a red circle", top_k=1)  # greedy within the codebook
    lo, hi = tiny.layout.code_range
    ids = gen.result.token_ids
    assert len(ids) == tiny.layout.tokens and all(lo <= t < hi for t in ids)
    prompt = tiny.prompt_ids("a red circle")
    assert len(prompt) == tiny.layout.prompt_tokens + 1
    model, cfg = tiny.loaded.model, tiny.loaded.config
    seq = torch.tensor(prompt + ids)
    cache = KVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, len(seq), model.dtype)
    logits = model(seq, cache, 0, all_logits=True)  # (T, vocab), no cache reuse
    expect = logits[len(prompt) - 1:-1, lo:hi].argmax(-1) + lo
    assert expect.tolist() == ids
    assert torch.equal(gen.codes.flatten() + lo, torch.tensor(ids))


def test_guided_generation_samples_from_the_mixed_logits(tiny):
    """Classifier-free guidance: each code is the argmax of u + s * (c - u), where c and u
    are the logits after the prompt and after the empty prompt (computed uncached)."""
    scale = 3.0
    gen = tiny.generate("a red circle", top_k=1, guidance=scale)
    lo, hi = tiny.layout.code_range
    ids = gen.result.token_ids
    model, cfg = tiny.loaded.model, tiny.loaded.config

    def logits(prefix: list[int]) -> torch.Tensor:
        seq = torch.tensor(prefix + ids)
        cache = KVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, len(seq),
                        model.dtype)
        return model(seq, cache, 0, all_logits=True)[len(prefix) - 1:-1, lo:hi]

    c, u = logits(tiny.prompt_ids("a red circle")), logits(tiny.unconditional_ids())
    expect = (u + scale * (c - u)).argmax(-1) + lo
    assert expect.tolist() == ids
    # (that guidance changes choices is shown on the engine's own test model, whose
    # logits depend on the prompt more than this tiny checkpoint's do)
    with pytest.raises(RequestError, match="guidance"):
        tiny.params(guidance=0)
    with pytest.raises(RequestError, match="guidance"):
        tiny.params(guidance=True)


def test_rows_stream_in_order_and_a_seed_repeats(tiny):
    rows: list[tuple[int, int]] = []
    sampled = {"temperature": 1.0, "top_k": 0}  # the tiny checkpoint's default is greedy
    a = tiny.generate("two blue squares", seed=7, on_rows=lambda d, n: rows.append((d, n)),
                      **sampled)
    g = tiny.layout.grid
    assert rows == [(i, g) for i in range(1, g + 1)]
    b = tiny.generate("two blue squares", seed=7, size=48, **sampled)
    c = tiny.generate("two blue squares", seed=8, **sampled)
    assert torch.equal(a.codes, b.codes) and not torch.equal(a.codes, c.codes)
    assert a.image.size == (16, 16) and b.image.size == (48, 48)


def test_bad_requests_are_refused(tiny):
    with pytest.raises(RequestError, match="empty"):
        tiny.submit("   ")
    with pytest.raises(RequestError, match="too long"):
        tiny.submit("word " * 40)
    with pytest.raises(RequestError, match="size"):
        tiny.generate("a", size=4)
    with pytest.raises(RequestError):
        from codevista.models.engine import SamplingParams
        SamplingParams(token_range=(5, 5))


@shipped
def test_cancellation_stops_generation():
    model = TextToImage.load(DEFAULT_T2I_DIR)
    try:
        handle = model.submit("3 shapes: a red circle top left, a blue square centre, "
                              "a green triangle bottom right", seed=1)
        for i, _ in enumerate(handle, 1):
            if i == model.layout.grid:  # one row decoded
                handle.cancel()
                break
        result = handle.result(30)
        assert result.finish_reason == "cancelled"
        assert model.layout.grid <= len(result.token_ids) < model.layout.tokens
        with pytest.raises(RequestError, match="cancelled"):
            model.codes_of(result)
        # the engine serves the next request normally
        assert model.generate("1 shape: a red square centre", seed=2).codes.shape == (
            model.layout.grid, model.layout.grid)
    finally:
        model.close()


# -- the output path and the service ------------------------------------------------------

def test_output_is_confined_to_the_workspace(tmp_path):
    from codevista.server.errors import ArgumentError
    from codevista.server.features.generate_image import OUTPUT_DIR, resolve_output

    ws, outside = tmp_path / "ws", tmp_path / "outside"
    (ws / "art").mkdir(parents=True)
    outside.mkdir()
    os.symlink(outside, ws / "escape")
    roots = [ws]
    real = ws.resolve()
    assert resolve_output(None, "A red circle!", 3, roots) == real / OUTPUT_DIR / \
        "a-red-circle-3.png"
    assert resolve_output("art/x.png", "p", 0, roots) == real / "art" / "x.png"
    assert resolve_output((ws / "y.png").as_uri(), "p", 0, roots) == real / "y.png"
    assert resolve_output(str(ws / "new" / "z.png"), "p", 0, roots) == real / "new" / "z.png"
    refused = {"../x.png": "outside the workspace", "art/../../x.png": "outside",
               str(outside / "x.png"): "outside", (outside / "x.png").as_uri(): "outside",
               "escape/x.png": "outside", "/etc/x.png": "outside",
               "art/x.jpg": ".png", "https://example.com/x.png": "file: URI",
               "file://otherhost/x.png": "another host", "": "non-empty", "art": ".png"}
    for value, needle in refused.items():
        with pytest.raises(ArgumentError, match=needle):
            resolve_output(value, "p", 0, roots)
    with pytest.raises(ArgumentError, match="non-empty"):
        resolve_output(42, "p", 0, roots)
    with pytest.raises(ArgumentError, match="workspace folder"):
        resolve_output(None, "p", 0, [])


def test_service_writes_a_png_and_reports_rows(tiny_t2i, tmp_path):
    from codevista.server.features.generate_image import ImageService

    async def run():
        service = ImageService()
        try:
            model = await service.ensure(str(tiny_t2i), lambda m: None)
            rows: list[int] = []
            out = tmp_path / "pics" / "a.png"
            r = await service.generate(model, "a red circle", out, 32, 5,
                                       lambda d, n: rows.append(d))
            return r, rows, model.layout.grid
        finally:
            service.close()

    r, rows, grid = asyncio.run(run())
    assert rows == list(range(1, grid + 1))
    img = Image.open(r.path)
    img.verify()
    assert (r.width, r.height) == (32, 32) and Image.open(r.path).size == (32, 32)
    assert not list(r.path.parent.glob("*.part"))


# -- over LSP, with the shipped model ------------------------------------------------------

@shipped
@pytest.mark.slow
def test_generate_image_command_over_lsp(tmp_path):
    """The real server: progress rows streamed, a PNG inside the workspace, a path outside
    refused with a clear error, and the server still answering after it."""
    from lsprotocol import types
    from pygls.exceptions import JsonRpcException
    from pytest_lsp import LanguageClient, client_capabilities

    ws = tmp_path / "ws"
    ws.mkdir()

    async def run():
        client = LanguageClient()
        progress: dict[str, list] = {}

        @client.feature(types.PROGRESS)
        def on_progress(params):
            progress.setdefault(params.token, []).append(params.value)

        await client.start_io(sys.executable, "-m", "codevista.server.cli", "serve")
        try:
            await client.initialize_session(types.InitializeParams(
                capabilities=client_capabilities("visual_studio_code"),
                workspace_folders=[types.WorkspaceFolder(uri=ws.as_uri(), name="ws")]))
            token = str(uuid.uuid4())
            res = await client.workspace_execute_command_async(types.ExecuteCommandParams(
                command="codevista.generateImage", arguments=[{
                    "prompt": "2 shapes: a red circle top left, a blue square bottom right",
                    "seed": 3, "size": 128, "outputUri": "out/pic.png",
                    "partialResultToken": token}]))
            with pytest.raises(JsonRpcException, match="outside the workspace"):
                await client.workspace_execute_command_async(types.ExecuteCommandParams(
                    command="codevista.generateImage", arguments=[{
                        "prompt": "1 shape: a red circle centre",
                        "outputUri": str(tmp_path / "escape.png")}]))
            again = await client.workspace_execute_command_async(types.ExecuteCommandParams(
                command="codevista.generateImage",
                arguments=[{"prompt": "1 shape: a red circle centre"}]))
            await client.shutdown_session()
            return res, again, progress.get(token, [])
        finally:
            await client.stop()

    res, again, values = asyncio.run(asyncio.wait_for(run(), 120))
    assert res["uri"] == (ws / "out" / "pic.png").resolve().as_uri()
    assert (res["width"], res["height"]) == (128, 128)
    png = (ws / "out" / "pic.png").read_bytes()
    assert Image.open(io.BytesIO(png)).size == (128, 128)
    rows = [v["rows"] for v in values]
    assert rows == sorted(rows) and rows[-1] == values[-1]["totalRows"] == 16
    assert all(v["isIncomplete"] for v in values)
    assert not (tmp_path / "escape.png").exists()
    assert again["uri"].startswith((ws / "generated-images").resolve().as_uri())


def test_cli_writes_a_png_and_refuses_bad_arguments(tiny_t2i, tmp_path):
    import subprocess

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "codevista.server.cli",
                               "generate-image", *args, "--model", str(tiny_t2i)],
                              capture_output=True, text=True, timeout=120)

    out = tmp_path / "x.png"
    ok = cli("a red circle", "-o", str(out), "--seed", "3", "--size", "40")
    assert ok.returncode == 0, ok.stderr
    assert Image.open(out).size == (40, 40) and str(out) in ok.stdout
    assert "row 4/4" in ok.stderr  # progress on stderr, never on stdout
    for args, needle in [(("a", "-o", str(tmp_path / "x.jpg")), ".png"),
                         (("", "-o", str(out)), "empty")]:
        bad = cli(*args)
        assert bad.returncode == 2 and "codevista: error:" in bad.stderr and needle in bad.stderr
        assert bad.stdout == ""
