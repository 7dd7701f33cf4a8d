"""Tiny seeded checkpoints in the Hugging Face layout, made offline with `transformers`.

Every engine test runs on these: 2 layers, hidden 64, a byte-level BPE tokenizer trained
here on a few lines of code. They are saved exactly as `save_pretrained` writes them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

SPECIAL = ["<|endoftext|>", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"]
VOCAB = 384  # model vocabulary (>= tokenizer size, padded as real checkpoints are)

_TEXT = """
def add(a, b):
    return a + b

class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

for i in range(10):
    print(i, "hello world")

public static int max(int a, int b) { return a > b ? a : b; }
func main() { fmt.Println("hi") }
fn main() { let x = vec![1, 2, 3]; println!("{:?}", x); }
"""


def train_tokenizer(out: Path, special: list[str] | None = None, texts: list[str] | None = None,
                    vocab_size: int = 320) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special or SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts or [_TEXT] * 20, trainer)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "tokenizer.json"
    tok.save(str(path))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|endoftext|>", "bos_token": None}))
    return path


FAMILIES: dict[str, dict[str, Any]] = {
    # Llama with linear RoPE scaling, like DeepSeek-Coder; untied head; GQA.
    "llama": dict(cls="LlamaForCausalLM", num_key_value_heads=2, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 1e5}),
    # Llama without GQA, with every bias on.
    "llama_bias": dict(cls="LlamaForCausalLM", num_key_value_heads=4, attention_bias=True,
                       mlp_bias=True, tie_word_embeddings=False),
    # Qwen2: QKV bias, tied embeddings, theta 1e6, as Qwen2.5-Coder.
    "qwen2": dict(cls="Qwen2ForCausalLM", num_key_value_heads=2, tie_word_embeddings=True,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    # Qwen2 with sliding-window layers from layer 1 on.
    "qwen2_window": dict(cls="Qwen2ForCausalLM", num_key_value_heads=2, tie_word_embeddings=True,
                         use_sliding_window=True, sliding_window=16, max_window_layers=1),
    # Starcoder2: LayerNorm with bias, GELU-tanh MLP, biases, tied, sliding window.
    "starcoder2": dict(cls="Starcoder2ForCausalLM", num_key_value_heads=2,
                       tie_word_embeddings=True, sliding_window=16, use_bias=True),
}


def make_checkpoint(family: str, out: Path, tokenizer_dir: Path, seed: int = 0,
                    max_positions: int = 4096, **overrides: Any) -> Path:
    """Save a random tiny model of `family` to `out` with the shared tokenizer."""
    import torch
    import transformers

    spec = dict(FAMILIES[family])
    cls = getattr(transformers, spec.pop("cls"))
    config_cls = cls.config_class
    kwargs: dict[str, Any] = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=max_positions, initializer_range=0.1,
        eos_token_id=0, bos_token_id=None, pad_token_id=None)
    kwargs.update(spec)
    kwargs.update(overrides)
    config = config_cls(**kwargs)
    torch.manual_seed(seed)
    model = cls(config).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, out / name)
    return out


def load_reference(path: Path):  # -> transformers PreTrainedModel
    import torch
    import transformers

    cfg = json.loads((path / "config.json").read_text())
    cls = getattr(transformers, cfg["architectures"][0])
    return cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


IMAGE_TOKEN = "<image>"
VLM_SPECIAL = [*SPECIAL, IMAGE_TOKEN]

VISION: dict[str, dict[str, Any]] = {
    # CLIP tower (class token, pre-layernorm, quick-GELU), LLaVA-1.5 feature choice:
    # the second-to-last layer, class token dropped; processor: shortest edge + crop.
    "clip_llama": dict(vision="CLIPVisionConfig", text="llama", feature_layer=-2,
                       strategy="default", image_size=32, patch_size=8,
                       processor=dict(image_processor_type="CLIPImageProcessor",
                                      size={"shortest_edge": 32},
                                      crop_size={"height": 32, "width": 32},
                                      do_center_crop=True, resample=3,
                                      image_mean=[0.48145466, 0.4578275, 0.40821073],
                                      image_std=[0.26862954, 0.26130258, 0.27577711])),
    # SigLIP tower (no class token, tanh-GELU), llava-interleave-qwen's choice: the last
    # layer, all patches; processor: a plain resize to the square size.
    "siglip_qwen2": dict(vision="SiglipVisionConfig", text="qwen2", feature_layer=-1,
                         strategy="full", image_size=28, patch_size=7,
                         processor=dict(image_processor_type="SiglipImageProcessor",
                                        size={"height": 28, "width": 28}, resample=3,
                                        do_center_crop=False,
                                        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])),
}


def make_llava(kind: str, out: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A random tiny LlavaForConditionalGeneration with `tokenizer_dir`'s tokenizer, which
    must hold IMAGE_TOKEN (its id is the image token index)."""
    import torch
    import transformers
    from tokenizers import Tokenizer

    spec = VISION[kind]
    image_id = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).token_to_id(
        IMAGE_TOKEN)
    assert image_id is not None
    text_spec = dict(FAMILIES[spec["text"]])
    text_cls = getattr(transformers, text_spec.pop("cls"))
    text = text_cls.config_class(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=1024, initializer_range=0.1,
        eos_token_id=0, bos_token_id=None, pad_token_id=None, **text_spec)
    vision = getattr(transformers, spec["vision"])(
        hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        image_size=spec["image_size"], patch_size=spec["patch_size"])
    n_patches = (spec["image_size"] // spec["patch_size"]) ** 2
    config = transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=image_id,
        vision_feature_layer=spec["feature_layer"],
        vision_feature_select_strategy=spec["strategy"],
        image_seq_length=n_patches if spec["strategy"] == "full" else n_patches,
        projector_hidden_act="gelu", tie_word_embeddings=text.tie_word_embeddings)
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # random weights large enough that the image matters
        for p in model.model.vision_tower.parameters():
            p.normal_(0, 0.1) if p.dim() > 1 else None
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, out / name)
    proc = {"do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "do_convert_rgb": True, **spec["processor"]}
    (out / "preprocessor_config.json").write_text(json.dumps(proc, indent=1))
    return out
