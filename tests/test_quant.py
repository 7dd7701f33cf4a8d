"""Int8 weight-only quantization: the kernel against a float reference, the whole model
against float32, and a clear error where no compiler can build the kernel."""

from __future__ import annotations

import pytest
import torch
from codevista.models.errors import ConfigError


@pytest.fixture(scope="module")
def quant():
    from codevista.models import quant

    try:
        quant.kernel()
    except ConfigError as e:
        pytest.skip(f"no C compiler here: {e}")
    return quant


def _block_quantized(x: torch.Tensor) -> torch.Tensor:
    """As the kernel does it: q = round(x * 127 / absmax), x ~ q * absmax / 127."""
    amax = x.abs().amax(dim=1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return torch.round(x * inv) * (amax / 127)


@pytest.mark.parametrize("rows", [1, 3, 16, 17, 40])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("n_in", [77, 256])  # odd: the SIMD tails; 256: the decode path
def test_int8_linear_equals_its_dequantized_weight(quant, rows, bias, n_in):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(200, n_in, generator=g)
    b = torch.randn(200, generator=g) if bias else None
    lin = quant.Int8Linear(w, b)
    x = torch.randn(rows, n_in, generator=g)
    xr = x
    if lin.act_block and rows <= lin.max_rows:  # the kernel quantizes x in blocks too
        xr = torch.cat([_block_quantized(blk) for blk in x.split(lin.act_block, dim=1)], 1)
    ref = xr @ lin.dequantized().t() + (b if bias else 0)
    y = lin(x)
    assert y.shape == (rows, 200)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    # and the quantization itself is within half a step of each row's scale
    err = (lin.dequantized() - w).abs() / lin.scale[:, None]
    assert err.max() <= 0.5 + 1e-5
    q = lin.int8_rows()
    assert q.dtype == torch.int8 and q.shape == (200, n_in) and q.abs().max() == 127
    # whatever the storage (plain rows, or the kernel's VNNI tiles), rows and embedding
    # vectors read back the same q, also across a tile's edge and the padding
    assert torch.equal(lin.int8_rows(slice(13, 35)), q[13:35])
    assert torch.equal(lin.int8_rows(slice(190, 200)), q[190:])
    idx = torch.tensor([0, 15, 16, 199, 7])
    assert torch.equal(lin.columns(idx), q[idx].float() * lin.scale[idx, None])
    for rows in (slice(None), slice(13, 35), slice(190, 200), slice(16, 32)):
        assert torch.equal(lin.dequantized(rows), q[rows].float() * lin.scale[rows, None])


def test_packed_tiles_round_trip(quant):
    g = torch.Generator().manual_seed(5)
    q = torch.randint(-127, 128, (37, 70), generator=g, dtype=torch.int8)
    tiles = quant.pack_tiles(q)
    assert tiles.shape == (3, 128 // 4, 16, 4) and tiles.dtype == torch.uint8
    # row 17's inputs 4..7 are lane 1 of tile 1's second group of four, each + 128
    assert torch.equal(tiles[1, 1, 1].to(torch.int16) - 128, q[17, 4:8].to(torch.int16))
    assert (tiles.view(3, 32, 16, 4)[2, :, 5:] == 128).all()  # padded rows weigh zero
    assert torch.equal(quant.unpack_tiles(tiles, 37, 70), q)
    assert torch.equal(quant.unpack_tiles(tiles, 37, 70, slice(15, 33)), q[15:33])


def test_int8_model_tracks_float32(quant):
    from codevista.models.engine import Engine, SamplingParams
    from codevista.models.kv_cache import KVCache
    from codevista.models.loader import DEFAULT_MODEL_DIR, load_model

    f32 = load_model(DEFAULT_MODEL_DIR)
    q8 = load_model(DEFAULT_MODEL_DIR, dtype="int8")
    assert q8.dtype == torch.float32 and any(
        isinstance(m, quant.Int8Linear) for m in q8.model.modules())
    # (ends indented, as an editor leaves a new line in a function body)
    text = ("<|lang:python|>import os\n\n\ndef read_lines(path):\n    with open(path) as f:\n"
            "        return [line.rstrip() for line in f]\n\n\ndef main():\n    ")
    ids = f32.tokenizer.encode(text, add_special_tokens=False)
    cfg = f32.config
    logits = []
    for m in (f32, q8):
        cache = KVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, len(ids), torch.float32)
        logits.append(m.model(torch.tensor(ids), cache, 0, all_logits=True))
    rel = (logits[0] - logits[1]).abs().max() / logits[0].abs().max()
    assert rel < 0.05, rel
    agree = (logits[0].argmax(-1) == logits[1].argmax(-1)).float().mean()
    assert agree >= 0.95, agree
    params = SamplingParams(max_new_tokens=24)
    with Engine(f32) as a, Engine(q8) as b:
        ra, rb = a.generate(ids, params), b.generate(ids, params)
    assert rb.text and rb.token_ids[:8] == ra.token_ids[:8]


def test_without_a_compiler_int8_is_a_clear_error(monkeypatch, tmp_path):
    from codevista.models import native
    from codevista.models.loader import DEFAULT_MODEL_DIR, load_model

    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(ConfigError, match="kernel did not compile|C compiler"):
        load_model(DEFAULT_MODEL_DIR, dtype="int8")


def test_unknown_dtype_names_the_choices():
    from codevista.models.loader import DEFAULT_MODEL_DIR, load_model

    with pytest.raises(ConfigError, match="int8"):
        load_model(DEFAULT_MODEL_DIR, dtype="int4")


@pytest.mark.parametrize("dtype", ["int8", "float32"])
@pytest.mark.parametrize("prompt_len", [37, 300])
def test_draft_verification_is_bit_identical_to_decode_steps(quant, qwen_dir, prompt_len,
                                                             dtype):
    """Prompt lookup keeps greedy output unchanged only if verifying a draft computes each
    row exactly as a decode step would: the kernel is row-independent (int8, and float32
    in the row layout) and attention runs row by row for verification segments."""
    from codevista.models.kv_cache import KVCache
    from codevista.models.loader import load_model
    from codevista.models.transformer import ROWS, Segment

    q8 = load_model(qwen_dir, dtype=dtype)
    if dtype == "float32":
        assert q8.model.lm_head.blocks == ROWS
    m, cfg = q8.model, q8.config
    g = torch.Generator().manual_seed(prompt_len)
    prompt = torch.randint(4, cfg.vocab_size, (prompt_len,), generator=g)
    draft = torch.randint(4, cfg.vocab_size, (9,), generator=g)

    def prefilled() -> KVCache:
        cache = KVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, prompt_len + 9,
                        torch.float32)
        m(prompt, cache, 0)
        return cache

    with torch.inference_mode():
        cache = prefilled()
        steps = torch.stack([m(draft[i:i + 1], cache, prompt_len + i)[-1] for i in range(9)])
        verified = m.forward_many([Segment(draft, prefilled(), prompt_len,
                                           all_logits=True)])[0]
    assert torch.equal(verified, steps)


def test_int8_loading_quantizes_layer_by_layer_like_the_whole_model(quant, qwen_dir):
    """Loading with dtype int8 quantizes each weight as it is read; the result equals
    quantizing the float32 model after loading it."""
    from codevista.models.loader import load_model

    streamed = load_model(qwen_dir, dtype="int8").model
    after = quant.quantize_int8(load_model(qwen_dir).model)
    a, b = dict(streamed.named_modules()), dict(after.named_modules())
    layers = [n for n, m in a.items() if isinstance(m, quant.Int8Linear)]
    assert layers and layers == [n for n, m in b.items() if isinstance(m, quant.Int8Linear)]
    for n in layers:
        assert torch.equal(a[n].qweight, b[n].qweight) and torch.equal(a[n].scale, b[n].scale)
        assert (a[n].bias is None) == (b[n].bias is None)
        if a[n].bias is not None:
            assert torch.equal(a[n].bias, b[n].bias)


def test_an_int8_model_big_enough_to_be_bandwidth_bound_decodes_on_every_core():
    """Quantized weights are buffers, not parameters: they must count towards the size
    that decides the engine's decode threads."""
    from codevista.models.engine.engine import SMALL_MODEL_BYTES, auto_threads

    big = torch.nn.Module()
    big.register_buffer("qweight", torch.zeros(SMALL_MODEL_BYTES + 1, dtype=torch.int8))
    small = torch.nn.Module()
    small.register_buffer("qweight", torch.zeros(1 << 20, dtype=torch.int8))
    assert auto_threads(big) == torch.get_num_threads()
    assert auto_threads(small) == 1


def test_kernel_threads_give_the_same_result_concurrently_and_sleep_when_idle(quant):
    """Products from several threads at once (the pool serves one, the others run alone)
    equal the single-threaded result bit for bit; afterwards the kernel's workers stop
    spinning: an idle server burns no CPU."""
    import threading
    import time

    g = torch.Generator().manual_seed(5)
    lin = quant.Int8Linear(torch.randn(3000, 512, generator=g), None)
    xs = [torch.randn(r, 512, generator=g) for r in (1, 4, 9)]
    quant.set_kernel_threads(1)
    try:
        expected = [lin(x) for x in xs]
    finally:
        quant.set_kernel_threads(0)
    results: dict[int, list[bool]] = {}

    def work(k: int) -> None:
        quant.set_kernel_threads(2)
        results[k] = [torch.equal(lin(x), e) for _ in range(50)
                      for x, e in zip(xs, expected, strict=True)]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and all(all(v) for v in results.values())
    time.sleep(0.1)  # past the workers' spinning time
    before = time.process_time()
    time.sleep(0.5)
    assert time.process_time() - before < 0.05


def test_a_forked_child_gets_its_own_kernel_threads(quant):
    """After fork() the child has none of the parent's workers; its products must neither
    wait for them nor differ."""
    import os

    g = torch.Generator().manual_seed(6)
    lin = quant.Int8Linear(torch.randn(2000, 256, generator=g), None)
    x = torch.randn(2, 256, generator=g)
    quant.set_kernel_threads(2)
    try:
        expected = lin(x)  # the parent's workers exist now
        pid = os.fork()
        if pid == 0:  # the child: exit code 0 only if the product is right
            os._exit(0 if torch.equal(lin(x), expected) else 1)
        import signal
        import time

        deadline = time.monotonic() + 30
        done, status = 0, 0
        while not done and time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            time.sleep(0.05)
        if not done:  # waiting for workers it does not have
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    finally:
        quant.set_kernel_threads(0)
    assert done, "the child hung"
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


@pytest.mark.parametrize("rows", [1, 2, 5, 16, 17])
@pytest.mark.parametrize("shape", [(200, 77), (96, 256), (1000, 64)])
def test_float32_rows_kernel_equals_torch_and_keeps_rows_independent(quant, rows, shape):
    """The row layout's products of up to 16 rows run in our kernel: they equal torch's
    float64 product to float32 rounding, and each row's bits do not depend on the rows
    beside it (a draft's verification equals its decode steps)."""
    from codevista.models.transformer import ROWS, Linear

    n_out, n_in = shape
    g = torch.Generator().manual_seed(rows * 7 + n_in)
    lin = Linear(n_in, n_out, True, ROWS)
    w, b = torch.randn(n_out, n_in, generator=g), torch.randn(n_out, generator=g)
    with torch.no_grad():
        lin.weight.copy_(lin.pack(w))
        lin.bias.copy_(b)
    x = torch.randn(rows, n_in, generator=g)
    with torch.inference_mode():
        assert rows > 16 or lin._rows_kernel(x) is not None  # the kernel, not torch
        y = lin(x)
        alone = torch.cat([lin(x[r:r + 1]) for r in range(rows)])
    ref = (x.double() @ w.double().t() + b.double()).float()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)
    if rows <= 16:
        assert torch.equal(y, alone)
    assert torch.equal(lin.unpack(), w) and torch.equal(lin.columns(torch.tensor([3, 1])),
                                                        w[[3, 1]])


def test_both_float32_layouts_give_the_same_model(quant, qwen_dir, monkeypatch):
    """Column blocks (torch's batched matmul: CPUs without the kernel) and rows (our
    kernel) hold the same weights and compute the same logits."""
    from codevista.models import loader
    from codevista.models.kv_cache import KVCache
    from codevista.models.transformer import ROWS

    rows = loader.load_model(qwen_dir)
    monkeypatch.setattr(loader, "layout_for", lambda dtype, device: 2)
    blocks = loader.load_model(qwen_dir)
    assert rows.model.lm_head.blocks == ROWS and blocks.model.lm_head.blocks != ROWS
    cfg = rows.config
    ids = torch.randint(4, cfg.vocab_size, (40,), generator=torch.Generator().manual_seed(2))
    out = []
    with torch.inference_mode():
        for m in (rows, blocks):
            cache = KVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 41, torch.float32)
            prefill = m.model(ids, cache, 0, all_logits=True)
            step = m.model(ids[-1:], cache, 40)  # one decode step: the kernel in `rows`
            out.append((prefill, step))
    for a, b in zip(*out, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(200, 77), (48, 256), (33, 1000)])
def test_int8_kernel_keeps_rows_independent(quant, shape):
    """Whatever the number of rows beside it (one at a time, groups of four, a remainder),
    each row of x gets the same bits: a draft's verification equals its decode steps."""
    n_out, n_in = shape
    g = torch.Generator().manual_seed(n_in)
    lin = quant.Int8Linear(torch.randn(n_out, n_in, generator=g), torch.randn(n_out, generator=g))
    x = torch.randn(16, n_in, generator=g)
    with torch.inference_mode():
        alone = torch.cat([lin(x[r:r + 1]) for r in range(16)])
        for m in (2, 3, 4, 5, 7, 9, 16):
            assert torch.equal(lin(x[:m]), alone[:m])
