"""Every bad-checkpoint case raises its typed error; the CLI says it in one clear line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from codevista.models import errors
from codevista.models.loader import load_model
from safetensors.torch import load_file, save_file


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _bad(kind: str, src: Path, tmp: Path) -> Path:
    d = _copy(src, tmp / kind)
    weights = d / "model.safetensors"
    if kind == "missing_dir":
        shutil.rmtree(d)
    elif kind == "missing_config":
        (d / "config.json").unlink()
    elif kind == "missing_tokenizer":
        (d / "tokenizer.json").unlink()
    elif kind == "missing_weights":
        weights.unlink()
    elif kind == "pickle_only":
        weights.unlink()
        (d / "pytorch_model.bin").write_bytes(b"\x80\x04\x95 not to be unpickled")
    elif kind == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        weights.write_bytes(b"\x00" * 7 + b"this is not a safetensors file" * 10)
    elif kind == "bad_header":
        weights.write_bytes((200).to_bytes(8, "little") + b"{not json" + b" " * 191)
    elif kind == "unsupported_arch":
        _edit_config(d, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    elif kind == "unsupported_rope":
        _edit_config(d, rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                         "rope_theta": 1e6})
    elif kind == "lying_shapes":
        _edit_config(d, intermediate_size=256)
    elif kind == "missing_tensor":
        tensors = load_file(str(weights))
        del tensors["model.layers.1.mlp.down_proj.weight"]
        save_file(tensors, str(weights), metadata={"format": "pt"})
    elif kind == "tokenizer_too_big":
        _edit_config(d, vocab_size=200)
    elif kind == "eos_outside_vocab":
        (d / "generation_config.json").write_text(json.dumps({"eos_token_id": 99999}))
    elif kind == "bad_json":
        (d / "config.json").write_text("{\"architectures\": [")
    elif kind == "bad_values":
        _edit_config(d, num_key_value_heads=3)
    elif kind == "missing_shard":
        tensors = load_file(str(weights))
        names = sorted(tensors)
        save_file({n: tensors[n] for n in names[:5]}, str(d / "model-00001-of-00002.safetensors"))
        weights.unlink()
        index = {"metadata": {}, "weight_map": {
            n: ("model-00001-of-00002.safetensors" if i < 5
                else "model-00002-of-00002.safetensors") for i, n in enumerate(names)}}
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return d


CASES = {
    "missing_dir": errors.CheckpointNotFoundError,
    "missing_config": errors.CheckpointNotFoundError,
    "missing_tokenizer": errors.MissingTokenizerError,
    "missing_weights": errors.CheckpointNotFoundError,
    "pickle_only": errors.UnsafeCheckpointError,
    "truncated": errors.CorruptCheckpointError,
    "garbage": errors.CorruptCheckpointError,
    "bad_header": errors.CorruptCheckpointError,
    "unsupported_arch": errors.UnsupportedArchitectureError,
    "unsupported_rope": errors.UnsupportedArchitectureError,
    "lying_shapes": errors.ShapeMismatchError,
    "missing_tensor": errors.MissingWeightError,
    "tokenizer_too_big": errors.TokenizerMismatchError,
    "eos_outside_vocab": errors.TokenizerMismatchError,
    "bad_json": errors.ConfigError,
    "bad_values": errors.ConfigError,
    "missing_shard": errors.CheckpointNotFoundError,
}


@pytest.mark.parametrize("kind", list(CASES))
def test_bad_checkpoint_raises_typed_error(kind, qwen_dir, tmp_path):
    path = _bad(kind, qwen_dir, tmp_path)
    with pytest.raises(CASES[kind]) as info:
        load_model(path)
    assert str(info.value)  # says what is wrong


def test_sharded_checkpoint_loads_like_single_file(qwen_dir, tmp_path):
    d = _copy(qwen_dir, tmp_path / "sharded")
    tensors = load_file(str(d / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    files = {"model-00001-of-00002.safetensors": names[:half],
             "model-00002-of-00002.safetensors": names[half:]}
    for fname, part in files.items():
        save_file({n: tensors[n] for n in part}, str(d / fname), metadata={"format": "pt"})
    (d / "model.safetensors").unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: f for f, part in files.items() for n in part}}))
    a, b = load_model(qwen_dir), load_model(d)
    for (n1, p1), (n2, p2) in zip(a.model.state_dict().items(), b.model.state_dict().items(),
                                  strict=True):
        assert n1 == n2 and torch.equal(p1, p2)


def test_bfloat16_weights_load(qwen_dir, tmp_path):
    from codevista.models.engine import Engine, SamplingParams

    m = load_model(qwen_dir, dtype="bfloat16")
    assert m.model.dtype == torch.bfloat16
    with Engine(m) as engine:
        r = engine.generate([5, 6, 7], SamplingParams(max_new_tokens=8, ignore_eos=True))
    assert r.generated_tokens == 8


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "codevista.server.cli", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("kind", ["truncated", "pickle_only", "unsupported_arch",
                                  "missing_tokenizer"])
def test_cli_reports_bad_checkpoint_clearly(kind, qwen_dir, tmp_path):
    path = _bad(kind, qwen_dir, tmp_path)
    proc = _cli("generate", "--model", str(path), "--prompt", "def")
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert proc.stderr.startswith("codevista: error: ")
    assert "Traceback" not in proc.stderr
