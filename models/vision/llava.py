"""The LLaVA composition: vision tower -> projector -> the engine's decoder.

A `LlavaForConditionalGeneration` checkpoint is the decoder of `text_config` (Llama or
Qwen2, loaded by the engine's own loader) plus a CLIP or SigLIP tower and a two-layer MLP
projector. An image becomes `tokens_per_image` vectors in the decoder's embedding space:
the tower's hidden state at `vision_feature_layer` (a list of layers is concatenated), the
class token dropped under the "default" selection strategy, then projected. In the prompt,
the one `image_token_index` token per image stands for all of them.

Both key layouts load: the hub's (`vision_tower.vision_model.*`, `multi_modal_projector.*`,
`language_model.model.*`, `language_model.lm_head.weight`) and the newer one
(`model.vision_tower.*`, `model.multi_modal_projector.*`, `model.language_model.*`,
`lm_head.weight`), with or without the `vision_model.` level.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..config import DecoderConfig
from ..errors import ConfigError, MissingWeightError
from .image import ImageProcessor
from .tower import Projector, VisionConfig, VisionTower

TEXT_DEFAULTS = {  # transformers' defaults for keys a nested text_config may leave out
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                  num_hidden_layers=32, num_attention_heads=32, max_position_embeddings=2048,
                  rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=False),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                  max_position_embeddings=32768, rms_norm_eps=1e-6, hidden_act="silu",
                  tie_word_embeddings=False),
}


def is_llava(data: dict[str, Any]) -> bool:
    archs = data.get("architectures") or []
    return data.get("model_type") == "llava" or "LlavaForConditionalGeneration" in archs


@dataclass(frozen=True)
class LlavaConfig:
    text: DecoderConfig
    vision: VisionConfig
    image_token_id: int
    feature_layers: tuple[int, ...]
    strategy: str  # "default" (drop the class token) | "full"
    projector_act: str
    projector_bias: bool

    @classmethod
    def from_hf(cls, data: dict[str, Any]) -> LlavaConfig:
        text = dict(data.get("text_config") or {})
        text.setdefault("model_type", "llama")
        text = {**TEXT_DEFAULTS.get(text["model_type"], {}), **text}
        text.pop("architectures", None)
        layers = data.get("vision_feature_layer", -2)
        layers = tuple(int(x) for x in layers) if isinstance(layers, list) else (int(layers),)
        strategy = data.get("vision_feature_select_strategy", "default")
        if strategy not in ("default", "full"):
            raise ConfigError(f"unknown vision_feature_select_strategy {strategy!r}")
        image_id = data.get("image_token_index", data.get("image_token_id", 32000))
        return cls(text=DecoderConfig.from_hf(text),
                   vision=VisionConfig.from_hf(data.get("vision_config") or {}),
                   image_token_id=int(image_id), feature_layers=layers, strategy=strategy,
                   projector_act=str(data.get("projector_hidden_act", "gelu")),
                   projector_bias=bool(data.get("multimodal_projector_bias", True)))


class VisionEncoder:
    """Image -> decoder-space vectors, for one loaded LLaVA checkpoint."""

    def __init__(self, cfg: LlavaConfig, tower: VisionTower, projector: Projector,
                 processor: ImageProcessor) -> None:
        self.cfg = cfg
        self.tower = tower
        self.projector = projector
        self.processor = processor
        n_states = cfg.vision.num_layers + 1  # the embeddings, then every layer
        self.state_ids = [layer % n_states for layer in cfg.feature_layers]
        if any(not -n_states <= layer < n_states for layer in cfg.feature_layers):
            raise ConfigError(f"vision_feature_layer {cfg.feature_layers} is out of range")
        has_cls = cfg.vision.kind == "clip"
        self.drop_first = has_cls and cfg.strategy == "default"
        self.tokens_per_image = cfg.vision.num_patches + (1 if has_cls and not
                                                          self.drop_first else 0)

    @property
    def image_token_id(self) -> int:
        return self.cfg.image_token_id

    def preprocess(self, img) -> torch.Tensor:
        return self.processor(img)

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(tokens_per_image, text hidden) for pixels (3, H, W)."""
        states = self.tower(pixels[None], upto=max(self.state_ids))
        feats = torch.cat([states[i] for i in self.state_ids], dim=-1)
        if self.drop_first:
            feats = feats[:, 1:]
        return self.projector(feats)[0]


def _find(names: set[str], candidates: list[str], probe: str, what: str) -> str:
    for prefix in candidates:
        if prefix + probe in names:
            return prefix
    raise MissingWeightError(f"no {what} in the checkpoint (looked for "
                             f"{', '.join(p + probe for p in candidates)})")


def text_layout(names: set[str]) -> tuple[str, str | None]:
    """(prefix of the decoder's `model.*` tensors, name of the LM head or None if tied)."""
    prefix = _find(names, ["language_model.model.", "model.language_model.",
                           "model.language_model.model."], "embed_tokens.weight",
                   "language model embeddings")
    for head in ("language_model.lm_head.weight", "lm_head.weight"):
        if head in names:
            return prefix, head
    return prefix, None


def load_vision(directory: Path, cfg: LlavaConfig, reader, dtype: torch.dtype
                ) -> VisionEncoder:
    names = set(reader.names)
    tower_prefix = _find(names, ["vision_tower.vision_model.", "model.vision_tower.vision_model.",
                                 "vision_tower.", "model.vision_tower."],
                         "embeddings.patch_embedding.weight", "vision tower")
    proj_prefix = _find(names, ["multi_modal_projector.", "model.multi_modal_projector."],
                        "linear_1.weight", "projector")
    with torch.device("meta"):
        tower = VisionTower(cfg.vision)
        in_features = cfg.vision.hidden_size * len(cfg.feature_layers)
        projector = Projector(in_features, cfg.text.hidden_size, cfg.projector_act,
                              cfg.projector_bias)
    for module, prefix in ((tower, tower_prefix), (projector, proj_prefix)):
        state = {n: reader.get(prefix + n, tuple(p.shape), dtype)
                 for n, p in module.state_dict().items()}
        module.load_state_dict(state, assign=True)
        module.eval()
    processor = ImageProcessor.from_dir(directory, cfg.vision.image_size)
    if (processor.height, processor.width) != (cfg.vision.image_size,) * 2:
        raise ConfigError(f"preprocessor_config.json makes {processor.height}x"
                          f"{processor.width} images; the vision tower takes "
                          f"{cfg.vision.image_size}x{cfg.vision.image_size}")
    return VisionEncoder(cfg, tower, projector, processor)


def tied(cfg: DecoderConfig, head: str | None) -> DecoderConfig:
    """The decoder config, tied exactly when the checkpoint has no separate LM head."""
    return replace(cfg, tie_word_embeddings=head is None)
