"""Export a checkpoint as GGUF, so that llama.cpp (server, Ollama) can serve it.

    codevista export-gguf MODEL_DIR OUT.gguf [--type f32|f16|q8_0]

Writes the Llama and Qwen2 families (the embedded model is a Llama) with the `gguf`
package's writer: hyper-parameters, the byte-level BPE tokenizer (tokens, merges, token
types, the GPT-2 pre-tokenizer), then the tensors under llama.cpp's names. llama.cpp's
`llama` architecture rotates interleaved pairs where Hugging Face rotates halves, so the q
and k projections of Llama checkpoints are permuted, as llama.cpp's own converter does;
`qwen2` uses half rotation and needs no permutation. Norms and biases stay float32; with
f16 or q8_0 the 2-D weights are converted (q8_0 with the package's reference quantizer).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .config import DecoderConfig
from .errors import ConfigError, UnsupportedArchitectureError

TYPES = ("f32", "f16", "q8_0")


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """HF half-rotation rows -> llama.cpp interleaved rows (per head)."""
    return (w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


# GGUF key -> the marker's spelling in the families we load (Qwen / codevista, StarCoder,
# DeepSeek-Coder)
FIM_TOKENS = {
    "tokenizer.ggml.fim_pre_token_id": ("<|fim_prefix|>", "<fim_prefix>", "<｜fim▁begin｜>"),
    "tokenizer.ggml.fim_suf_token_id": ("<|fim_suffix|>", "<fim_suffix>", "<｜fim▁hole｜>"),
    "tokenizer.ggml.fim_mid_token_id": ("<|fim_middle|>", "<fim_middle>", "<｜fim▁end｜>"),
    "tokenizer.ggml.fim_pad_token_id": ("<|fim_pad|>", "<fim_pad>"),
    "tokenizer.ggml.fim_rep_token_id": ("<|repo_name|>", "<repo_name>"),
    "tokenizer.ggml.fim_sep_token_id": ("<|file_sep|>", "<file_sep>"),
}


def _tokenizer(writer, directory: Path, cfg: DecoderConfig) -> None:
    import gguf

    data = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    model = data.get("model", {})
    pre = data.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel":
        raise UnsupportedArchitectureError(
            "GGUF export handles byte-level BPE tokenizers (GPT-2 style) only")
    vocab: dict[str, int] = dict(model["vocab"])
    special = {}
    for t in data.get("added_tokens", []):
        vocab[t["content"]] = t["id"]
        if t.get("special"):
            special[t["id"]] = t["content"]
    n = cfg.vocab_size
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [gguf.TokenType.UNUSED] * n
    for tok, i in vocab.items():
        if i < n:
            tokens[i] = tok
            types[i] = gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges(merges)
    cfg_path = directory / "tokenizer_config.json"
    tcfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}

    def token_id(value) -> int | None:
        text = value.get("content") if isinstance(value, dict) else value
        return vocab.get(text) if isinstance(text, str) else None

    eos = token_id(tcfg.get("eos_token"))
    if eos is None and cfg.eos_token_ids:
        eos = cfg.eos_token_ids[0]
    if eos is not None:
        writer.add_eos_token_id(eos)
    bos = token_id(tcfg.get("bos_token"))
    if bos is not None:
        writer.add_bos_token_id(bos)
    writer.add_add_bos_token(bos is not None and bool(tcfg.get("add_bos_token", False)))
    writer.add_add_eos_token(False)
    # FIM markers by name, so that llama-server's /infill builds the model's own format
    for key, names in FIM_TOKENS.items():
        found = next((vocab[t] for t in names if t in vocab and vocab[t] < n), None)
        if found is not None:
            writer.add_uint32(key, found)
    if isinstance(tcfg.get("chat_template"), str):
        writer.add_chat_template(tcfg["chat_template"])


def export_gguf(model_dir: str | Path, out: str | Path, kind: str = "f32") -> Path:
    import gguf
    from safetensors import safe_open

    from .loader import weight_files

    if kind not in TYPES:
        raise ConfigError(f"unknown GGUF type {kind!r}; choose {', '.join(TYPES)}")
    directory, out = Path(model_dir), Path(out)
    cfg = DecoderConfig.from_file(directory / "config.json")
    if cfg.family not in ("llama", "qwen2"):
        raise UnsupportedArchitectureError(
            f"GGUF export supports Llama and Qwen2 checkpoints, not {cfg.family}")
    if any(w is not None for w in cfg.layer_windows):
        raise UnsupportedArchitectureError("GGUF export of sliding-window layers is not done")
    arch = cfg.family
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_name(directory.name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    if cfg.rope_scaling_factor != 1.0:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(cfg.rope_scaling_factor)
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind]
    writer.add_file_type(ftype)
    _tokenizer(writer, directory, cfg)

    names = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm.weight": "attn_norm.weight",
                 "post_attention_layernorm.weight": "ffn_norm.weight",
                 "self_attn.q_proj.weight": "attn_q.weight",
                 "self_attn.k_proj.weight": "attn_k.weight",
                 "self_attn.v_proj.weight": "attn_v.weight",
                 "self_attn.o_proj.weight": "attn_output.weight",
                 "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
                 "self_attn.v_proj.bias": "attn_v.bias",
                 "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
                 "mlp.down_proj.weight": "ffn_down.weight"}
    for i in range(cfg.num_layers):
        for hf, ours in per_layer.items():
            names[f"model.layers.{i}.{hf}"] = f"blk.{i}.{ours}"
    files = weight_files(directory)
    for path in sorted(set(files.values())):
        with safe_open(str(path), framework="np") as f:
            for key in f.keys():
                if key not in names:
                    continue
                if key == "lm_head.weight" and cfg.tie_word_embeddings:
                    continue
                w = f.get_tensor(key).astype(np.float32)
                if arch == "llama" and key.endswith("q_proj.weight"):
                    w = _permute(w, cfg.num_heads)
                elif arch == "llama" and key.endswith("k_proj.weight"):
                    w = _permute(w, cfg.num_kv_heads)
                name = names[key]
                if w.ndim == 2 and kind == "f16":
                    writer.add_tensor(name, w.astype(np.float16))
                elif w.ndim == 2 and kind == "q8_0" and w.shape[1] % 32 == 0:
                    q = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
                    writer.add_tensor(name, q, raw_shape=q.shape,
                                      raw_dtype=gguf.GGMLQuantizationType.Q8_0)
                else:
                    writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
