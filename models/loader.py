"""Load a Hugging Face checkpoint directory into a codevista Transformer.

The model is built on the `meta` device, every tensor is read from safetensors (never
pickle), checked against the shape the config implies, converted to the chosen dtype
and assigned in place. q/k/v and gate/up are concatenated into the fused projections.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .config import DecoderConfig, read_config
from .errors import (
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    MissingWeightError,
    ShapeMismatchError,
    UnsafeCheckpointError,
)
from .tokenizer import Tokenizer
from .transformer import Linear, Transformer, layout_for
from .vision.llava import LlavaConfig, is_llava, load_vision, text_layout, tied

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# The embedded default code model, shipped inside the package (see its MODEL_CARD.md).
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default" / "code"
# The embedded default vision model (LLaVA layout), used when no vision model is set.
DEFAULT_VLM_DIR = Path(__file__).resolve().parent / "default" / "vlm"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class GenerationDefaults:
    """Sampling defaults and stop ids from generation_config.json (all optional)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_file(cls, path: Path) -> GenerationDefaults:
        if not path.is_file():
            return cls()
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read {path}: {e}") from e
        eos = d.get("eos_token_id")
        ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        do_sample = bool(d.get("do_sample", False))
        return cls(temperature=float(d.get("temperature", 1.0)) if do_sample else 0.0,
                   top_k=int(d.get("top_k", 0) or 0) if do_sample else 0,
                   top_p=float(d.get("top_p", 1.0) or 1.0) if do_sample else 1.0,
                   eos_token_ids=tuple(int(i) for i in ids))


@dataclass
class LoadedModel:
    """A ready model: weights, tokenizer and the facts generation needs."""

    path: Path
    config: DecoderConfig
    model: Transformer
    tokenizer: Tokenizer
    defaults: GenerationDefaults
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)
    vision: Any = None  # a VisionEncoder for LLaVA checkpoints

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype


def weight_files(directory: Path) -> dict[str, Path]:
    """Map each tensor name to its safetensors file (single file or sharded index)."""
    index = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CorruptCheckpointError(f"cannot read {index}: {e}") from e
        files = {name: directory / fname for name, fname in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise CheckpointNotFoundError(f"shard {f.name} listed in {index.name} is missing")
        return files
    if single.is_file():
        return {"": single}
    others = sorted(p.name for p in directory.glob("*.safetensors"))
    if len(others) == 1:
        return {"": directory / others[0]}
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UnsafeCheckpointError(
            f"{directory} has weights only in pickle format ({', '.join(pickles)}); codevista "
            "never unpickles files. Convert the checkpoint to safetensors first.")
    raise CheckpointNotFoundError(f"no model.safetensors or model.safetensors.index.json in "
                                  f"{directory}")


class _Reader:
    """Reads tensors by name across one or more safetensors files, with clear errors."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.handles: dict[Path, Any] = {}
        self.names: dict[str, Path] = {}
        self.spans: dict[str, tuple[torch.dtype, int, int]] = {}
        for path in sorted(set(files.values())):
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
                keys = list(handle.keys())
            except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                raise CorruptCheckpointError(
                    f"{path.name} is not a valid safetensors file (truncated or corrupt): "
                    f"{e}") from e
            self.handles[path] = handle
            for k in keys:
                self.names[k] = path
            self.spans.update(_spans(path))

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if name not in self.names:
            raise MissingWeightError(f"tensor {name!r} is missing from the checkpoint")
        path = self.names[name]
        handle = self.handles[path]
        try:
            found = tuple(handle.get_slice(name).get_shape())
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CorruptCheckpointError(f"cannot read {name!r} from {path.name}: {e}") from e
        if found != shape:
            raise ShapeMismatchError(
                f"tensor {name!r} has shape {list(found)} but config.json implies "
                f"{list(shape)}")
        span = self.spans.get(name)
        if span is not None:
            # Read into our own memory (never a view of the file's memory map: a checkpoint
            # rewritten or truncated in place while the server runs would otherwise kill it
            # with SIGBUS at the next read), and without mapping the file at all, so that the
            # file's pages never count towards the process's memory while loading.
            stored, start, end = span
            buf = bytearray(end - start)
            try:
                with open(path, "rb") as f:
                    f.seek(start)
                    got = f.readinto(buf)
            except OSError as e:
                raise CorruptCheckpointError(f"cannot read {name!r} from {path.name}: {e}"
                                             ) from e
            if got != len(buf):
                raise CorruptCheckpointError(f"{path.name} is truncated: {name!r} needs "
                                             f"{len(buf)} bytes, {got} were there")
            tensor = torch.frombuffer(buf, dtype=stored) if buf else torch.empty(0, stored)
            return tensor.reshape(shape).to(dtype)
        try:
            tensor = handle.get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CorruptCheckpointError(f"cannot read {name!r} from {path.name}: {e}") from e
        return tensor.to(dtype, copy=True)  # a copy, never a view of the memory map


# safetensors dtype names of the floating-point tensors read directly (little-endian).
_STORED = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F64": torch.float64}


def _spans(path: Path) -> dict[str, tuple[torch.dtype, int, int]]:
    """Name -> (dtype, start, end) byte offsets of a safetensors file's float tensors, from
    its header: an 8-byte little-endian length, then that many bytes of JSON whose entries
    give each tensor's dtype and data_offsets relative to the end of the header. The file
    was already validated by safe_open; anything unexpected here falls back to it."""
    if sys.byteorder != "little":
        return {}
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= 1 << 27:
                return {}
            header = json.loads(f.read(n))
        base = 8 + n
        out = {}
        for name, info in header.items():
            if name == "__metadata__" or info.get("dtype") not in _STORED:
                continue
            a, b = (int(x) for x in info["data_offsets"])
            out[name] = (_STORED[info["dtype"]], base + a, base + b)
        return out
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


def _hf_names(cfg: DecoderConfig, i: int) -> dict[str, list[str]]:
    """Our parameter names for layer i -> the HF tensors concatenated (in order) to make them."""
    p = f"model.layers.{i}."
    ours = f"layers.{i}."
    names: dict[str, list[str]] = {}
    for suffix in ("weight", "bias") if cfg.norm == "layer" else ("weight",):
        names[f"{ours}attn_norm.{suffix}"] = [f"{p}input_layernorm.{suffix}"]
        names[f"{ours}mlp_norm.{suffix}"] = [f"{p}post_attention_layernorm.{suffix}"]
    qkv = [f"{p}self_attn.{n}_proj" for n in ("q", "k", "v")]
    names[f"{ours}attn.wqkv.weight"] = [f"{n}.weight" for n in qkv]
    if cfg.qkv_bias:
        names[f"{ours}attn.wqkv.bias"] = [f"{n}.bias" for n in qkv]
    names[f"{ours}attn.wo.weight"] = [f"{p}self_attn.o_proj.weight"]
    if cfg.o_bias:
        names[f"{ours}attn.wo.bias"] = [f"{p}self_attn.o_proj.bias"]
    if cfg.mlp == "gated":
        up = [f"{p}mlp.gate_proj", f"{p}mlp.up_proj"]
        down = f"{p}mlp.down_proj"
        ours_up = f"{ours}mlp.w_gate_up"
    else:
        up = [f"{p}mlp.c_fc"]
        down = f"{p}mlp.c_proj"
        ours_up = f"{ours}mlp.w_up"
    names[f"{ours_up}.weight"] = [f"{n}.weight" for n in up]
    names[f"{ours}mlp.w_down.weight"] = [f"{down}.weight"]
    if cfg.mlp_bias:
        names[f"{ours_up}.bias"] = [f"{n}.bias" for n in up]
        names[f"{ours}mlp.w_down.bias"] = [f"{down}.bias"]
    return names


def hf_name_table(cfg: DecoderConfig) -> dict[str, list[str]]:
    """The full table: codevista parameter name -> HF tensor names, in concatenation order.

    The weights of `Linear` modules are the (concatenated) HF tensors in packed layout.
    """
    table: dict[str, list[str]] = {}
    if cfg.tie_word_embeddings:
        table["lm_head.weight"] = ["model.embed_tokens.weight"]
    else:
        table["embed.weight"] = ["model.embed_tokens.weight"]
        table["lm_head.weight"] = ["lm_head.weight"]
    for i in range(cfg.num_layers):
        table.update(_hf_names(cfg, i))
    table["norm.weight"] = ["model.norm.weight"]
    if cfg.norm == "layer":
        table["norm.bias"] = ["model.norm.bias"]
    return table


def _part_shape(cfg: DecoderConfig, hf_name: str, total: tuple[int, ...]) -> tuple[int, ...]:
    """The shape one HF tensor must have, given the concatenated (HF-layout) shape."""
    rest = total[1:]
    if ".q_proj." in hf_name:
        return (cfg.q_dim, *rest)
    if ".k_proj." in hf_name or ".v_proj." in hf_name:
        return (cfg.kv_dim, *rest)
    if ".gate_proj." in hf_name or ".up_proj." in hf_name:
        return (cfg.intermediate_size, *rest)
    return total


def load_weights(model: Transformer, directory: Path, dtype: torch.dtype,
                 reader: _Reader | None = None,
                 rename: Callable[[str], str] | None = None, int8: bool = False) -> None:
    """Load the decoder's weights; `rename` maps a standalone checkpoint's tensor name
    (`model.layers.0...`, `lm_head.weight`) to its name in this file (LLaVA nests them).
    With `int8`, each linear layer is quantized as soon as its weight is read
    (models/quant.py), so no float copy of the whole model ever exists."""
    cfg = model.cfg
    reader = reader or _Reader(weight_files(directory))
    rename = rename or (lambda n: n)
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    state: dict[str, torch.Tensor] = {}
    table = hf_name_table(cfg)
    quantized: dict[str, nn.Module] = {}
    for ours, sources in table.items():
        owner_name, leaf = ours.rsplit(".", 1)
        owner = modules[owner_name]
        linear = isinstance(owner, Linear) and ours.endswith(".weight")
        hf_shape = ((owner.out_features, owner.in_features) if linear
                    else tuple(params[ours].shape))
        parts = [reader.get(rename(src), _part_shape(cfg, src, hf_shape) if len(sources) > 1
                            else hf_shape, dtype) for src in sources]
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        if int8 and isinstance(owner, Linear):
            _quantized_load(model, owner_name, leaf, tensor, quantized)
        else:
            state[ours] = owner.pack(tensor) if linear else tensor
        del parts, tensor
    used = {rename(src) for sources in table.values() for src in sources}
    extra = sorted(set(reader.names) - used - {rename("lm_head.weight")})
    if extra:
        log.debug("ignoring %d tensors not used by the model: %s", len(extra), extra[:5])
    model.load_state_dict(state, strict=False, assign=True)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise MissingWeightError(f"parameters left without weights: {missing[:5]}")


def _quantized_load(model: Transformer, name: str, leaf: str, tensor: torch.Tensor,
                    done: dict[str, nn.Module]) -> None:
    """Put an int8 layer in place of the (meta) linear layer `name` from its HF-layout
    weight; its bias, read later, is attached to it."""
    from .quant import Int8Linear

    if leaf == "weight":
        q = Int8Linear(tensor, None)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)
        done[name] = q
    else:
        done[name].bias = nn.Parameter(tensor.float(), requires_grad=False)


def load_model(path: str | Path, dtype: str | torch.dtype = "float32",
               device: str = "cpu") -> LoadedModel:
    """Load config, tokenizer and weights from a Hugging Face checkpoint directory."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise CheckpointNotFoundError(f"model directory {directory} does not exist")
    if not (directory / "config.json").is_file():
        raise CheckpointNotFoundError(f"{directory} has no config.json")
    if isinstance(dtype, str) and dtype not in (*DTYPES, "int8"):
        raise ConfigError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)}, int8)")
    quantize = dtype == "int8"  # float32 activations, int8 linear weights (models/quant.py)
    if quantize:
        from .quant import kernel

        kernel()  # no compiler: fail before reading gigabytes
        dtype = "float32"
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    raw = read_config(directory / "config.json")
    defaults = GenerationDefaults.from_file(directory / "generation_config.json")
    vision = None
    if is_llava(raw):
        llava = LlavaConfig.from_hf(raw)
        files = weight_files(directory)
        tokenizer = Tokenizer.from_dir(directory)
        reader = _Reader(files)
        prefix, head = text_layout(set(reader.names))
        cfg = tied(llava.text, head)
        tokenizer.check_against(cfg.vocab_size, (*cfg.eos_token_ids, *defaults.eos_token_ids))
        with torch.device("meta"):
            model = Transformer(cfg, layout_for(torch_dtype, device))

        def rename(name: str) -> str:
            if name == "lm_head.weight":
                return head or prefix + "embed_tokens.weight"
            return prefix + name.removeprefix("model.")

        load_weights(model, directory, torch_dtype, reader, rename, int8=quantize)
        vision = load_vision(directory, llava, reader, torch_dtype)
    else:
        cfg = DecoderConfig.from_hf(raw)
        tokenizer = Tokenizer.from_dir(directory)
        tokenizer.check_against(cfg.vocab_size, (*cfg.eos_token_ids, *defaults.eos_token_ids))
        weight_files(directory)  # fail fast on missing or pickle-only weights
        with torch.device("meta"):
            model = Transformer(cfg, layout_for(torch_dtype, device))
        load_weights(model, directory, torch_dtype, int8=quantize)
    model = model.to(device)
    model.setup_rope()
    model.eval()
    stops = set(cfg.eos_token_ids) | set(defaults.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        stops.add(tokenizer.eos_token_id)
    log.info("loaded %s (%s, %d layers, %.1fM parameters, %s)", directory.name, cfg.family,
             cfg.num_layers, sum(p.numel() for p in model.parameters()) / 1e6, torch_dtype)
    return LoadedModel(path=directory, config=cfg, model=model, tokenizer=tokenizer,
                       defaults=defaults, stop_token_ids=frozenset(stops), vision=vision)

