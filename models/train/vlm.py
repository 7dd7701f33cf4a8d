"""The training recipe of the default vision model: LLaVA-shaped, from generated images.

    python -m codevista.models.train.vlm train --run DIR [--init models/default/code]
        [--init-vlm models/default/vlm] [--steps N] [--batch B] [--compile]
        [--device cpu|cuda] [--amp none|bf16] [--workers N] [--time-budget SECONDS]
        [--export-to DIR]
    python -m codevista.models.train.vlm export --run DIR --out models/default/vlm

A small SigLIP-style tower (no class token) and a two-layer GELU projector feed the
embedded code model's decoder, which is loaded as the starting point, so the vision model
shares the code tokenizer and its `<|image|>` token. Every sample is drawn by vlm_data.py
from a seed that is a function of (step, index): a resumed run sees the same data. The
prompt is `formats.vision_prompt(formats.vision_question(task, question))`, exactly what
the server sends; the loss covers the answer and its end-of-text token only.

`--ocr-rate R` puts simulated OCR lines (from the drawn text, with OCR-like noise) in the
prompt of that share of diagrams, as the server gives real OCR lines; `--novel-words R`
labels that share of training flowcharts with made-up words, which the model can only get
right by copying them from the OCR lines (the held-out words stay unseen either way).
`--restart STEP` continues a finished run with a new warm-up and cosine schedule.

`--init-vlm DIR` continues an exported vision model (the `export` layout) instead of
starting the tower and projector from scratch on `--init`'s code model.

`--keep-tower W` (with `--read-weight` and `--read-batch`) trains the tower alone to read, at
a fraction of a whole step's cost: no decoder runs; the answers' loss is replaced by W times
how far the projected features of the batch's pictures moved from the starting tower's
(so what the decoder relies on stays), and the decoder and projector are frozen. A
continuation with `--init-vlm` of its export then teaches the decoder to use what it reads.

`--workers N` draws the batches in N spawned processes, a few steps ahead; the batch of a
step is the same as in-process. `--time-budget S` times ~20 steps (after a few warm-up
ones), then fixes the number of steps (at most `--steps`) so that the run, its periodic
and final held-out evaluations and checkpoints end within S seconds of the start; the
cosine schedule runs to that total (recorded in the state JSON as `total`, kept on resume).
`--amp bf16` (the default on CUDA) runs the forward under bfloat16 autocast; weights,
optimizer and loss stay float32. `--compile` falls back to the eager model if compiling
fails.

Checkpoints (safetensors weights and optimizer state, JSON state) every --save-every
steps and at the end; resume after any interruption; a loss plot at every checkpoint (and
with `--export-to DIR` an exported model there). `export` writes the Hugging Face Llava
layout that both codevista and transformers load.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import queue
import random
import re
import shutil
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .. import formats
from ..tokenizer import Tokenizer
from ..vision.image import ImageProcessor
from ..vision.tower import Projector, VisionConfig, VisionTower
from .model import CodeLM, ModelShape, shape_of
from .plot import plot_losses
from .read_data import CHARSET, patch_targets, reading, slots_for
from .train import amp_context, checked_restart, load_checkpoint, lr_at, save_checkpoint
from .vlm_data import (
    FONT_DIRS,
    FONTS,
    IMAGE_SIZE,
    MONO_FONTS,
    SCENE_QUESTIONS,
    TRAIN_SCENE_QUESTIONS,
    Sample,
    bar_chart,
    error_dialog,
    sample,
    shapes,
    simulated_ocr,
)

# the kinds a scene of shapes answers
SCENE_KINDS = frozenset({"count", "color", "shape", "locate", "describe"})

log = logging.getLogger("codevista.train.vlm")
PLACEHOLDER = -2
SEQ_LEN = 232
PREPROCESSOR = {"image_processor_type": "SiglipImageProcessor", "do_resize": True,
                "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "resample": 3,
                "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                "do_convert_rgb": True}
VISION = dict(model_type="siglip_vision_model", hidden_size=192, intermediate_size=768,
              num_hidden_layers=4, num_attention_heads=4, image_size=IMAGE_SIZE,
              patch_size=16, num_channels=3, hidden_act="gelu_pytorch_tanh",
              layer_norm_eps=1e-6)


class TrainVLM(nn.Module):
    """Parameter names are the Llava checkpoint's (tied LM head, so none for it)."""

    def __init__(self, vision: VisionConfig, shape: ModelShape) -> None:
        super().__init__()
        self.vision_tower = VisionTower(vision)
        self.multi_modal_projector = Projector(vision.hidden_size, shape.hidden_size, "gelu",
                                               True)
        self.language_model = CodeLM(shape)
        for m in list(self.vision_tower.modules()) + list(self.multi_modal_projector.modules()):
            if isinstance(m, nn.Linear | nn.Conv2d):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.vision_tower.embeddings.position_embedding.weight, std=0.02)

        # (weight, id of "[", id of ","): the loss of a box answer's first coordinate
        # weighted (first_coord_weights); None: every answer token alike
        self.first_coord: tuple[float, int, int] | None = None
        # the reading head (`with_reading`): training only, never exported
        self.read_head: nn.Linear | None = None
        self.read_weight = 0.0
        self.last_read_loss: torch.Tensor | None = None
        # tower-only training (`with_keep`): a frozen copy of the starting tower, whose
        # projected features the tower keeps on the batch's pictures; never exported
        self.keep_teacher: VisionTower | None = None
        self.keep_weight = 0.0
        self.last_keep_loss: torch.Tensor | None = None

    def with_reading(self, weight: float) -> None:
        """Adds the per-patch reading head: from the tower's last layer, the character
        classes of each patch's slots (read_data.patch_targets, slots_for the patch size),
        its loss added with `weight`."""
        self.read_head = nn.Linear(self.vision_tower.cfg.hidden_size,
                                   slots_for(self.vision_tower.cfg.patch_size)
                                   * (len(CHARSET) + 1))
        nn.init.normal_(self.read_head.weight, std=0.02)
        nn.init.zeros_(self.read_head.bias)
        self.read_weight = weight

    def with_keep(self, weight: float) -> None:
        """Trains the tower alone: the decoder and projector are frozen and the answers'
        loss is replaced by `weight` times the keep loss, how far the projected features of
        the batch's pictures moved from those of a frozen copy of the tower as it is now
        (mean squared difference over the teacher's mean square), plus the reading loss.
        What the tower learns to read it must fit beside what the decoder already uses."""
        self.keep_teacher = copy.deepcopy(self.vision_tower).requires_grad_(False)
        self.keep_weight = weight
        self.language_model.requires_grad_(False)
        self.multi_modal_projector.requires_grad_(False)

    def keep_loss(self, feats: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        """The keep loss of tower features `feats` of `pixels` (see `with_keep`)."""
        assert self.keep_teacher is not None
        with torch.no_grad():
            want = self.multi_modal_projector(self.keep_teacher(pixels)[-1]).float()
        got = self.multi_modal_projector(feats).float()
        return (got - want).pow(2).mean() / want.pow(2).mean().clamp(min=1e-8)

    def read_loss(self, feats: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The reading head's loss on tower features (B, GRID*GRID, D) against
        `patch_targets` (B, GRID*GRID, SLOTS): the mean cross-entropy of the slots that hold
        a character plus half that of the empty ones (most slots are empty; an even mean
        would teach little more than "no text here")."""
        return slot_loss(self.read_logits(feats, targets.shape), targets)

    def read_logits(self, feats: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """The reading head's logits of tower features, as `shape` (B, patches, slots)
        by class."""
        assert self.read_head is not None
        return self.read_head(feats).float().view(*shape, -1)

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor, targets: torch.Tensor,
                read_pixels: torch.Tensor | None = None,
                read_targets: torch.Tensor | None = None) -> torch.Tensor:
        """The answers' loss; with reading pictures and the reading head, plus
        `read_weight` times the reading loss (kept in `last_read_loss`)."""
        if read_pixels is None or self.read_head is None:
            return self._answer_loss(self.vision_tower(pixels)[-1], ids, targets)
        both = self.vision_tower(torch.cat([pixels, read_pixels]))[-1]
        read = self.read_loss(both[len(pixels):], read_targets)
        self.last_read_loss = read.detach()
        if self.keep_teacher is not None:  # tower only: no answers, the features kept
            keep = self.keep_loss(both[:len(pixels)], pixels)
            self.last_keep_loss = keep.detach()
            return self.keep_weight * keep + self.read_weight * read
        return self._answer_loss(both[:len(pixels)], ids, targets) + self.read_weight * read

    def _answer_loss(self, tower_out: torch.Tensor, ids: torch.Tensor, targets: torch.Tensor
                     ) -> torch.Tensor:
        feats = self.multi_modal_projector(tower_out)  # (B, P, H)
        mask = ids == PLACEHOLDER
        x = self.language_model.model.embed_tokens(ids.clamp(min=0))
        x = x.masked_scatter(mask.unsqueeze(-1), feats.to(x.dtype))
        if self.first_coord is None:
            return self.language_model(ids.clamp(min=0), targets, embeds=x)[1]
        logits = self.language_model(ids.clamp(min=0), None, embeds=x)[0]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                             ignore_index=-1, reduction="none").view_as(targets)
        valid = targets >= 0
        w = first_coord_weights(ids, targets, *self.first_coord)
        # divided by the token count, not the weights: the other tokens' gradient is as before
        return (ce * w * valid).sum() / valid.sum().clamp(min=1)


def resize_tower(weights: dict[str, torch.Tensor], patch: int, prefix: str = "vision_tower."
                 ) -> dict[str, torch.Tensor]:
    """A tower's weights for a smaller patch size (a divisor of its own): what the tower saw
    of an image it now sees of the image enlarged by the ratio, with as many more patches.
    Each patch kernel is sum-pooled by the ratio (exact for an image enlarged by repeating
    pixels) and the position embeddings are interpolated bicubically onto the finer grid.
    The other weights do not depend on the patch size."""
    out = dict(weights)
    kernel = weights[prefix + "embeddings.patch_embedding.weight"]  # (D, C, P, P)
    r, rem = divmod(kernel.shape[-1], patch)
    if rem or r < 1:
        raise ValueError(f"patch size {patch} does not divide {kernel.shape[-1]}")
    if r == 1:
        return out
    out[prefix + "embeddings.patch_embedding.weight"] = (
        kernel.unflatten(-1, (patch, r)).unflatten(-3, (patch, r)).sum((-1, -3)))
    pos = weights[prefix + "embeddings.position_embedding.weight"]  # (G*G, D)
    g = math.isqrt(pos.shape[0])
    grid = pos.T.reshape(1, -1, g, g).float()
    fine = F.interpolate(grid, size=(g * r, g * r), mode="bicubic", align_corners=False)
    out[prefix + "embeddings.position_embedding.weight"] = (
        fine.reshape(pos.shape[1], -1).T.contiguous().to(pos.dtype))
    return out


def slot_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Reading slots' loss: `logits` (..., classes) against character classes `targets`
    (..., 0 for an empty slot): the mean cross-entropy of the slots that hold a character
    plus half that of the empty ones."""
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                         reduction="none")
    char = (targets.reshape(-1) > 0).float()
    return ((ce * char).sum() / char.sum().clamp(min=1)
            + 0.5 * (ce * (1 - char)).sum() / (1 - char).sum().clamp(min=1))


def first_coord_weights(ids: torch.Tensor, targets: torch.Tensor, weight: float, open_id: int,
                        comma_id: int) -> torch.Tensor:
    """Per-target loss weights: `weight` for the tokens of a box answer's first coordinate
    (the one or two targets after the answer's "[" up to its ","), 1 elsewhere. The
    shipped model writes that coordinate from a prior rather than from the named object
    (benchmarks/locate_probe.py), and it is 1-2 of the answer's 14 targets."""
    answer = targets >= 0
    starts = answer.clone()  # the answer's first target (the "[" of a box answer)
    starts[:, 1:] &= ~answer[:, :-1]
    first = torch.zeros_like(answer)  # the answer's "[" as input: its target is x1's first
    first[:, 1:] = starts[:, :-1] & (ids[:, 1:] == open_id) & answer[:, 1:]
    second = torch.zeros_like(first)
    second[:, 1:] = first[:, :-1] & answer[:, 1:] & (targets[:, 1:] != comma_id)
    return 1.0 + (weight - 1.0) * (first | second).float()


_BOX = re.compile(r"\[(\d{1,4}), (\d{1,4}), (\d{1,4}), (\d{1,4})\]")


def box_ids(tok: Tokenizer, answer: str) -> list[int] | None:
    """A box answer "[x1, y1, x2, y2]" as the same text in regular number tokens: each
    coordinate of three digits as its hundreds digit and then its last two digits (the
    first one bare, the others with the space before them: "3" "75", " 8" "12").

    The tokenizer's own split of a number depends on its neighbours: the first coordinate
    comes as "37" "5" about as often as "3" "75", the others mostly as " 8" "12". One split
    for every coordinate makes position the same two choices in each of them (a piece the
    vocabulary lacks, "71", comes in the tokenizer's tokens). Tried on CPU against the
    shipped model's weak first coordinate, it did not fix it: the weakness is the decoder's
    lookup of the named object (benchmarks/locate_probe.py; the VLM's model card). None
    when the answer is not a box (the caller encodes it as usual); the decoded text is the
    answer, unchanged."""
    m = _BOX.fullmatch(answer)
    if m is None:
        return None
    pieces = ["["]
    for i, g in enumerate(m.groups()):
        sp = " " if i else ""
        if i:
            pieces.append(",")
        if len(g) == 3:
            pieces += [sp + g[0], g[1:]]
        elif len(g) == 2 and sp:
            pieces += [sp, g]
        else:
            pieces.append(sp + g)
    pieces.append("]")
    ids = [i for piece in pieces for i in tok.encode(piece, add_special_tokens=False)]
    return ids if tok.decode(ids) == answer else None


# the tasks trained with OCR lines in the prompt (at --ocr-rate)
OCR_TASKS = ("describe-diagram",)
VISION_TASK_NAMES = ("explain", "describe-diagram", "transcribe", "locate")


def ocr_tasks_arg(value: str | tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
    """The tasks whose training prompts may carry OCR lines, from `--ocr-tasks` ("a,b"; a
    run's state keeps it as the string of a tuple); None: OCR_TASKS."""
    if value is None or value == "None":
        return OCR_TASKS
    if isinstance(value, str):
        value = [t.strip(" ()'\"") for t in value.split(",")]
    tasks = tuple(t for t in value if t)
    unknown = [t for t in tasks if t not in VISION_TASK_NAMES]
    if unknown or not tasks:
        raise ValueError(f"--ocr-tasks: unknown vision task(s) {unknown or value!r}; "
                         f"choose from {', '.join(VISION_TASK_NAMES)}")
    return tasks


class Batcher:
    def __init__(self, tok: Tokenizer, tokens_per_image: int, ocr_rate: float = 0.0,
                 ocr_tasks: tuple[str, ...] = OCR_TASKS,
                 novel_words: float = 0.0, novel_text: float = 0.0,
                 diagram_share: float = 0.0,
                 scene_share: float = 0.0, scene_weights: dict[str, float] | None = None,
                 pad_to_longest: bool = False, regular_boxes: bool = False,
                 sample_offset: int = 0, error_share: float = 0.0,
                 novel_vocab: float = 0.4, novel_pieces: float = 0.0,
                 read_batch: int = 0, read_transcribe: float = 0.0,
                 spell: bool = False, chart_share: float = 0.0) -> None:
        self.tok = tok
        # that share of the train samples that stay neither scenes nor charts becomes a bar
        # chart (charts asked with OCR lines: which bar is highest, a bar's value); drawn
        # after scene_share, before error_share
        self.chart_share = chart_share
        # answers read off the picture (transcriptions; diagram descriptions without OCR
        # lines) trained one character per token (`spelled_ids`) rather than in the
        # tokenizer's pieces, in both splits
        self.spell = spell
        # reading pictures (read_data.reading) added to each train batch, with their
        # per-patch character targets, for the tower's reading head
        self.read_batch = read_batch
        # that share of the train samples that are not scenes becomes a reading picture to
        # transcribe (any text, not the code lines' few templates); drawn first
        self.read_transcribe = read_transcribe
        # train sample k is drawn from seed k + sample_offset: a continuation past the
        # pictures an earlier run of the same mix trained on
        self.sample_offset = sample_offset
        # locate answers as regular number tokens (box_ids) rather than the tokenizer's
        self.regular_boxes = regular_boxes
        self.novel_words = novel_words  # share of train diagrams with made-up labels
        self.novel_vocab = novel_vocab  # share of vocabulary words among made-up labels
        self.novel_pieces = novel_pieces  # share of labels made of any vocabulary tokens
        self.novel_text = novel_text  # share of train code and error pictures with such words
        # that share of the train samples that stay neither scenes nor error dialogs becomes
        # an error dialog (half explained, half transcribed); drawn after scene_share
        self.error_share = error_share
        # at least this share of each train batch is flowcharts (0: the generators' mix)
        self.diagram_share = diagram_share
        # that share of the other train samples becomes a scene of shapes (a continuation
        # for counting, colour, shape and grounding); drawn before diagram_share
        self.scene_share = scene_share
        # the train scenes' question kinds by these weights (None: uniform, as held out)
        self.scene_weights = scene_weights
        # pad each batch to its longest sequence rather than to seq_len (eager CPU runs of
        # short scene samples; a compiled model wants the one fixed shape)
        self.pad_to_longest = pad_to_longest
        # share of samples (of the tasks named) whose prompt carries OCR lines, simulated
        # from the drawn text; their sequences are longer
        self.ocr_rate = ocr_rate
        self.ocr_tasks = ocr_tasks
        self.seq_len = sequence_length(tokens_per_image, ocr_rate > 0)
        self.patch = IMAGE_SIZE // math.isqrt(tokens_per_image)
        self.proc = ImageProcessor.from_dict(PREPROCESSOR, IMAGE_SIZE)
        self.eot = tok.token_to_id(formats.EOT)
        self.image_id = tok.token_to_id(formats.IMAGE)
        self.p = tokens_per_image
        assert self.eot is not None and self.image_id is not None

    def encode(self, task: str, question: str | None, answer: str | None, ocr: str = ""
               ) -> tuple[list[int], int]:
        """(ids with the image expanded to placeholders, length of the prompt part)."""
        prompt = formats.vision_prompt(formats.vision_question(task, question), ocr=ocr)
        ids: list[int] = []
        for t in self.tok.encode(prompt, add_special_tokens=False):
            ids.extend([PLACEHOLDER] * self.p if t == self.image_id else [t])
        n = len(ids)
        if answer is not None:
            own = None  # the answer's ids where not the tokenizer's own pieces
            if self.spell and (task == "transcribe" or task == "describe-diagram" and not ocr):
                own = spelled_ids(self.tok, answer)
            elif task == "locate" and self.regular_boxes:
                own = box_ids(self.tok, answer)
            ids += (own or self.tok.encode(answer, add_special_tokens=False)) + [self.eot]
        return ids, n

    def draw(self, split: str, seed: int):
        if split != "train":
            return sample(split, seed)
        seed += self.sample_offset
        s = sample(split, seed, self.novel_words, self.novel_text, self.novel_vocab,
                   self.novel_pieces)
        if (self.read_transcribe > 0 and s.kind not in SCENE_KINDS
                and random.Random(seed * 43 + 3).random() < self.read_transcribe):
            r = reading(random.Random(f"train-read-transcribe:{seed}"))
            return Sample(r.image, "transcribe", None, r.text, "transcribe")
        if self.scene_weights is not None and s.kind in SCENE_KINDS:
            return shapes(random.Random(f"train-scene-w:{seed}"), split, self.scene_weights)
        if (self.scene_share > 0 and s.kind not in SCENE_KINDS
                and random.Random(seed * 37 + 11).random() < self.scene_share):
            # a scene from its own namespace of seeds, never a held-out one
            return shapes(random.Random(f"train-scene:{seed}"), split, self.scene_weights)
        if (self.chart_share > 0 and s.kind not in SCENE_KINDS | {"chart"}
                and random.Random(seed * 47 + 13).random() < self.chart_share):
            return bar_chart(random.Random(f"train-chart:{seed}"), split, self.novel_words,
                             random.Random(f"train-chart-novel:{seed}"))
        if (self.error_share > 0 and s.kind not in SCENE_KINDS | {"error"}
                and random.Random(seed * 41 + 7).random() < self.error_share):
            return error_dialog(random.Random(f"train-error:{seed}"), split, self.novel_text,
                                random.Random(f"train-error-novel:{seed}"))
        if s.kind != "diagram" and random.Random(seed * 31 + 5).random() < self.diagram_share:
            # the first flowchart among this seed's own block of seeds (disjoint per seed)
            for k in range(1, 200):
                t = sample(split, 10_000_000 + seed * 200 + k, self.novel_words,
                           novel_vocab=self.novel_vocab, novel_pieces=self.novel_pieces)
                if t.kind == "diagram":
                    return t
        return s

    def batch(self, split: str, seeds: list[int]) -> tuple[torch.Tensor, ...]:
        pixels, inputs, targets = [], [], []
        for seed in seeds:
            s = self.draw(split, seed)
            ocr = ""
            if self.ocr_rate > 0 and s.task in self.ocr_tasks:
                rng = random.Random(seed * 7919 + 17)
                if rng.random() < self.ocr_rate:
                    ocr = formats.ocr_context(simulated_ocr(s, rng))
            ids, n = self.encode(s.task, s.question, s.answer, ocr)
            ids = ids[:self.seq_len + 1]
            x, y = ids[:-1], ids[1:]
            inputs.append(x)
            targets.append([-1] * (n - 1) + y[n - 1:])
            pixels.append(self.proc(s.image))
        width = max(map(len, inputs)) if self.pad_to_longest else self.seq_len
        inputs = [x + [self.eot] * (width - len(x)) for x in inputs]
        targets = [y + [-1] * (width - len(y)) for y in targets]
        out = (torch.stack(pixels), torch.tensor(inputs), torch.tensor(targets))
        if split != "train" or self.read_batch <= 0:
            return out
        first = seeds[0] + self.sample_offset
        return out + read_batch("train", (f"{first}:{i}" for i in range(self.read_batch)),
                                proc=self.proc, patch=self.patch)


def spelled_ids(tok: Tokenizer, text: str) -> list[int]:
    """`text` one character per token (a character outside the byte-level alphabet in its
    bytes' tokens): it decodes to `text`. A new word read off a picture is then written with
    the tokens every transcription trains, letter by letter, instead of with pieces of the
    tokenizer that a held-out word may be the only one to use ("trim" is one token, never
    an answer in training)."""
    return [i for c in text for i in tok.encode(c, add_special_tokens=False)]


def sequence_length(tokens_per_image: int, ocr: bool) -> int:
    """The longest training sequence: SEQ_LEN holds 100 image tokens (16 px patches), smaller
    patches take more room, OCR lines in the prompt 112 tokens more (a bar chart's ten
    lines, or a five-node flowchart's, with the longest answer)."""
    return SEQ_LEN + tokens_per_image - 100 + (112 if ocr else 0)


def run_vision(run: Path) -> dict[str, Any]:
    """The vision_config of a run (its vision.json, written by `build`; VISION for a run
    made before the patch size could change)."""
    path = run / "vision.json"
    return json.loads(path.read_text()) if path.is_file() else dict(VISION)


def build(run: Path, init: Path, init_vlm: Path | None = None, patch: int | None = None
          ) -> tuple[TrainVLM, Tokenizer]:
    """The model and tokenizer of a run. A new run starts from the code model `init` (new
    tower and projector) or, given `init_vlm`, from an exported VLM (all of it); the run's
    tokenizer/config.json is the decoder's config (a Llava config's text_config), which
    `export` writes back as text_config. `patch`: the tower's patch size for a new run
    (when None, the init_vlm's, else VISION's 16); an `init_vlm` with larger patches is
    resized to it (`resize_tower`), and the decoder's positions are raised to hold the longer
    image."""
    from safetensors.torch import load_file

    src = init_vlm if init_vlm is not None else init
    src_cfg = json.loads((src / "config.json").read_text())
    run.mkdir(parents=True, exist_ok=True)
    if not (run / "vision.json").is_file():
        if patch is None:  # the init VLM's own, or the recipe's
            patch = src_cfg.get("vision_config", {}).get("patch_size", VISION["patch_size"])
        (run / "vision.json").write_text(json.dumps(dict(VISION, patch_size=patch), indent=1))
    vision_cfg = run_vision(run)
    if patch is not None and patch != vision_cfg["patch_size"]:
        raise SystemExit(f"{run}: the run's patch size is {vision_cfg['patch_size']}, "
                         f"not {patch}")
    if not (run / "tokenizer").is_dir():
        tmp = run / "tokenizer.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(src / name, tmp / name)
        cfg = src_cfg["text_config"] if src_cfg.get("model_type") == "llava" else src_cfg
        cfg = dict(cfg)
        # room for the image's tokens, the prompt with OCR lines and the answer (RoPE: the
        # decoder has no position weights to grow)
        need = sequence_length(VisionConfig.from_hf(vision_cfg).num_patches, ocr=True)
        if cfg.get("max_position_embeddings", 0) < need:
            cfg["max_position_embeddings"] = 1 << (need - 1).bit_length()
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
        tmp.rename(run / "tokenizer")
    tok = Tokenizer.from_dir(run / "tokenizer")
    model = TrainVLM(VisionConfig.from_hf(vision_cfg), shape_of(run / "tokenizer"))
    if not (run / "ckpt" / "state.json").is_file():
        weights = load_file(str(src / "model.safetensors"))
        if init_vlm is None:
            model.language_model.load_state_dict(weights)
        else:
            vision = {k: v for k, v in src_cfg.get("vision_config", {}).items()
                      if k != "vision_use_head"}
            if dict(vision, patch_size=0) != dict(VISION, patch_size=0) or (
                    vision.get("patch_size", 0) % vision_cfg["patch_size"]):
                raise SystemExit(f"{init_vlm}: vision_config {vision} is not this recipe's "
                                 f"{VISION} with patches of a multiple of "
                                 f"{vision_cfg['patch_size']} px")
            weights = resize_tower(weights, vision_cfg["patch_size"])
            # export adds an identity post_layernorm for transformers; with
            # vision_feature_layer -1 neither engine applies it, and TrainVLM has none
            for name, want in (("weight", 1.0), ("bias", 0.0)):
                t = weights.pop(f"vision_tower.post_layernorm.{name}", None)
                if t is not None and not bool((t == want).all()):
                    log.warning("%s: vision_tower.post_layernorm.%s is not the identity; "
                                "it is dropped (unused with vision_feature_layer -1)",
                                init_vlm, name)
            model.load_state_dict(weights)
    return model, tok


def train_seeds(step: int, batch: int) -> list[int]:
    """The sample seeds of a training step: a function of the step alone."""
    return [step * batch + i for i in range(batch)]


def _batch_worker(tok_dir: str, batcher_kw: dict[str, Any], batch: int, tasks: Any,
                  results: Any, shm: bool) -> None:
    """A spawned process: draws the train batch of each step it is sent (None: stop), as
    tensors in shared memory (`shm`), else as arrays through the pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent shuts the workers down
    torch.set_num_threads(1)
    step = None
    try:
        batcher = Batcher(Tokenizer.from_dir(Path(tok_dir)), **batcher_kw)
        while (step := tasks.get()) is not None:
            tensors: tuple[Any, ...] = batcher.batch("train", train_seeds(step, batch))
            if shm:
                try:  # here, so that a full /dev/shm is not lost in the queue's thread
                    for t in tensors:
                        t.share_memory_()
                except Exception:
                    shm = False
            if not shm:
                tensors = tuple(t.numpy() for t in tensors)
            results.put((step, tensors, None))
    except BaseException:
        results.put((step, None, traceback.format_exc()))


def _shm_room(batch: int, batches: int) -> bool:
    """Whether /dev/shm holds `batches` train batches of `batch` samples (twice over)."""
    per_sample = 3 * IMAGE_SIZE * IMAGE_SIZE * 4 + 2 * 8 * (SEQ_LEN + 48)
    try:
        return shutil.disk_usage("/dev/shm").free > 2 * batches * batch * per_sample
    except OSError:
        return False


class BatchPool:
    """Train batches drawn by `workers` spawned processes, at most `depth` steps ahead of
    the one asked for; `get(step)` returns exactly `Batcher.batch("train",
    train_seeds(step, batch))`. A context manager: the workers stop at its end, also on
    an exception."""

    def __init__(self, tok_dir: Path, batcher_kw: dict[str, Any], batch: int, workers: int,
                 depth: int | None = None, shm: bool | None = None,
                 timeout: float = 120.0) -> None:
        ctx = torch.multiprocessing.get_context("spawn")
        self.tasks, self.results = ctx.Queue(), ctx.Queue()
        self.depth = depth or 2 * workers
        self.timeout = timeout  # no batch at all for that long: an error
        self.last = time.time()
        if shm is None:
            shm = _shm_room(batch + batcher_kw.get("read_batch", 0), self.depth + 4)
            if not shm:
                log.warning("/dev/shm is too small for %d batches in flight: the workers "
                            "send them through pipes", self.depth)
        self.submitted: set[int] = set()
        self.ready: dict[int, tuple[torch.Tensor, ...]] = {}
        self.procs = [ctx.Process(target=_batch_worker, daemon=True, name=f"vlm-batch-{i}",
                                  args=(str(tok_dir), batcher_kw, batch, self.tasks,
                                        self.results, shm))
                      for i in range(workers)]
        for p in self.procs:
            p.start()

    def __enter__(self) -> BatchPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get(self, step: int, limit: int | None = None, stop: threading.Event | None = None
            ) -> tuple[torch.Tensor, ...]:
        """The batch of `step`; steps up to `step + depth - 1` (below `limit`) are queued.
        `stop`, once set, ends the wait (InterruptedError)."""
        for s in range(step, step + self.depth):
            if limit is not None and s >= limit and s != step:
                break
            if s not in self.submitted:
                self.submitted.add(s)
                self.tasks.put(s)
        for s in [s for s in self.submitted if s < step]:  # skipped steps: not awaited
            self.submitted.discard(s)
            self.ready.pop(s, None)
        waiting = time.time()
        while step not in self.ready:
            try:
                s, tensors, error = self.results.get(timeout=0.2)
                self.last = time.time()
            except queue.Empty:
                if stop is not None and stop.is_set():
                    raise InterruptedError("stopped") from None
                if time.time() - max(self.last, waiting) > self.timeout:
                    raise RuntimeError(f"no batch from the workers for {self.timeout:.0f} s"
                                       ) from None
                dead = [p for p in self.procs if not p.is_alive()]
                if dead:
                    raise RuntimeError(f"batch worker {dead[0].name} died (exit code "
                                       f"{dead[0].exitcode})") from None
                continue
            if error is not None:
                raise RuntimeError(f"batch worker failed at step {s}:\n{error}")
            if s in self.submitted:
                self.ready[s] = tuple(t if isinstance(t, torch.Tensor) else
                                      torch.from_numpy(t) for t in tensors)
        self.submitted.discard(step)
        return self.ready.pop(step)

    def close(self) -> None:
        self.ready.clear()
        for _ in self.procs:
            with contextlib.suppress(Exception):
                self.tasks.put(None)
        deadline = time.time() + 10.0
        while any(p.is_alive() for p in self.procs) and time.time() < deadline:
            try:  # drain, so that the workers' queue threads can flush and exit
                self.results.get(timeout=0.05)
            except queue.Empty:
                pass
            except Exception:  # a batch whose sender already exited
                pass
        for p in self.procs:
            p.join(timeout=0.5)
            if p.is_alive():
                p.terminate()
                p.join(timeout=2.0)
            if p.is_alive():
                p.kill()
                p.join()
        for q in (self.tasks, self.results):
            q.cancel_join_thread()
            q.close()
        self.procs = []


class Prefetcher:
    """A thread that takes the batches of steps `start`, `start + 1`, ... (below `limit`,
    which may be lowered) from a BatchPool ahead of the training loop, in page-locked
    memory when `pin` (for non-blocking copies to the GPU). A context manager."""

    def __init__(self, pool: BatchPool, start: int, limit: int, pin: bool,
                 depth: int = 2) -> None:
        self.limit = limit
        self.ready: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(pool, start, pin),
                                       name="vlm-prefetch", daemon=True)
        self.thread.start()

    def _put(self, item: tuple) -> None:
        while not self.stop.is_set():
            if item[2] is None and item[0] >= self.limit:  # no longer wanted
                return
            try:
                self.ready.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _run(self, pool: BatchPool, step: int, pin: bool) -> None:
        try:
            while not self.stop.is_set() and step < self.limit:
                batch = pool.get(step, limit=self.limit, stop=self.stop)
                if pin:
                    batch = tuple(t.pin_memory() for t in batch)
                self._put((step, batch, None))
                step += 1
        except InterruptedError:
            pass
        except BaseException as e:  # handed to the training loop
            self._put((step, None, e))

    def get(self, step: int) -> tuple[torch.Tensor, ...]:
        while True:
            try:
                s, batch, error = self.ready.get(timeout=0.5)
            except queue.Empty:
                if self.thread.is_alive() or not self.ready.empty():
                    continue
                raise RuntimeError(f"the prefetch thread ended before step {step}") from None
            if error is not None:
                raise RuntimeError(f"drawing the batch of step {s} failed: {error}"
                                   ) from error
            if s != step:
                raise RuntimeError(f"prefetched step {s}, expected {step}")
            return batch

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=30.0)


# the held-out batch of every checkpoint
HELD_OUT_SEEDS = range(10_000, 10_000 + 64)
# the held-out reading pictures of every checkpoint of a run with a reading head
HELD_OUT_READ_SEEDS = range(200)


def read_batch(split: str, seeds: Any, proc: ImageProcessor | None = None, patch: int = 16
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reading pictures of `split` (seeded by name, apart from every other picture) as
    (pixels, per-patch character targets for the tower's `patch` size); `proc`: the
    batcher's image processor."""
    proc = proc or ImageProcessor.from_dict(PREPROCESSOR, IMAGE_SIZE)
    read = [reading(random.Random(f"{split}-read:{seed}"), split) for seed in seeds]
    return (torch.stack([proc(r.image) for r in read]),
            torch.tensor([patch_targets(r.chars, patch, slots_for(patch)) for r in read]))


@torch.no_grad()
def reading_accuracy(model: TrainVLM, pixels: torch.Tensor, targets: torch.Tensor) -> float:
    """The share of the characters in `targets` (slots that hold one) that the reading
    head names, in their slot."""
    was = model.training
    model.eval()
    pred = model.read_logits(model.vision_tower(pixels)[-1], targets.shape).argmax(-1)
    model.train(was)
    char = targets > 0
    return float((pred[char] == targets[char]).float().mean())


# --time-budget: steps skipped (compilation, warm-up), then steps timed
CALIBRATION_SKIP = 5
CALIBRATION_STEPS = 20


def planned_total(step: int, step_seconds: float, save_seconds: float, elapsed: float,
                  budget: float, save_every: int, upper: int) -> int:
    """The last step of a run at `step` after `elapsed` of `budget` seconds, when a step
    takes `step_seconds` and a held-out evaluation and checkpoint `save_seconds` (one at the
    end and one every `save_every` steps), with a 2 % + 2 s margin."""
    left = budget - elapsed - save_seconds - (0.02 * budget + 2.0)
    per_step = step_seconds + save_seconds / max(1, save_every)
    return max(step, min(upper, step + math.floor(max(0.0, left) / max(per_step, 1e-9))))


def missing_fonts() -> list[str]:
    """The fonts vlm_data draws with that this machine lacks (it would draw those texts
    with Pillow's default font instead: other pictures than the evaluation's)."""
    return [f for f in dict.fromkeys(FONTS + MONO_FONTS)
            if not any((d / f).is_file() for d in FONT_DIRS)]


def amp_of(device: str, amp: str | None) -> str:
    """--amp's value: bfloat16 autocast by default on CUDA only."""
    return amp or ("bf16" if torch.device(device).type == "cuda" else "none")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train(args: argparse.Namespace) -> None:
    t0 = time.time()
    run: Path = args.run
    torch.manual_seed(args.seed)
    device = args.device
    amp = amp_of(device, getattr(args, "amp", None))
    init_vlm = getattr(args, "init_vlm", None)
    model, tok = build(run, args.init, init_vlm, getattr(args, "patch", None))
    model.to(device)
    coord_weight = getattr(args, "first_coord_weight", 1.0)
    if coord_weight != 1.0:
        model.first_coord = (coord_weight, tok.token_to_id("["), tok.token_to_id(","))
    read_weight = getattr(args, "read_weight", 0.0)
    if read_weight > 0:
        model.with_reading(read_weight)
        model.read_head.to(device)
    keep_weight = getattr(args, "keep_tower", 0.0)
    if keep_weight > 0:
        if read_weight <= 0 or getattr(args, "read_batch", 0) <= 0:
            raise SystemExit("--keep-tower trains the tower to read: it needs --read-weight "
                             "and --read-batch")
        model.with_keep(keep_weight)
        model.keep_teacher.to(device)
    lm = list(model.language_model.parameters())
    # the kept tower is a frozen copy for training only: neither optimised nor counted
    frozen_copy = model.keep_teacher.parameters() if model.keep_teacher is not None else ()
    skip = {id(p) for p in lm} | {id(p) for p in frozen_copy}
    new = [p for p in model.parameters() if id(p) not in skip]
    opt = torch.optim.AdamW([{"params": new, "lr": args.lr},
                             {"params": lm, "lr": args.lr * args.lm_lr_scale}],
                            betas=(0.9, 0.95), weight_decay=0.05)
    loaded = load_checkpoint(run, model, opt)
    state = loaded or {
        "step": 0, "train_loss": [], "valid_loss": [], "seconds": 0.0,
        "args": {k: str(v) for k, v in vars(args).items()}, "device": device}
    batcher_kw = dict(tokens_per_image=model.vision_tower.cfg.num_patches,
                      ocr_rate=args.ocr_rate, novel_words=args.novel_words,
                      novel_text=getattr(args, "novel_text", 0.0),
                      diagram_share=args.diagram_share, scene_share=args.scene_share,
                      scene_weights=getattr(args, "scene_weights", None),
                      pad_to_longest=getattr(args, "pad", "fixed") == "longest",
                      regular_boxes=getattr(args, "box_tokens", "tokenizer") == "regular",
                      sample_offset=getattr(args, "sample_offset", 0),
                      error_share=getattr(args, "error_share", 0.0),
                      novel_vocab=getattr(args, "novel_vocab", 0.4),
                      novel_pieces=getattr(args, "novel_pieces", 0.0),
                      read_batch=getattr(args, "read_batch", 0) if read_weight > 0 else 0,
                      read_transcribe=getattr(args, "read_transcribe", 0.0),
                      spell=getattr(args, "spell", False),
                      ocr_tasks=ocr_tasks_arg(getattr(args, "ocr_tasks", None)),
                      chart_share=getattr(args, "chart_share", 0.0))
    batcher = Batcher(tok, **batcher_kw)
    # --steps 0: only initialise, evaluate and save (e.g. --init-vlm, then export)
    restart = checked_restart(args) if args.steps > 0 or args.restart else 0
    # the schedule's total: --steps, or the one a time budget fixed (kept on resume)
    total = args.steps
    fixed = args.time_budget is None
    if "total" in state and state.get("total_restart", 0) == restart:
        total, fixed = min(state["total"], args.steps), True
    budget = args.time_budget
    export_to = getattr(args, "export_to", None)
    copy_bias = getattr(args, "ocr_copy_bias", None)
    if copy_bias is None:
        copy_bias = 0.0
        if init_vlm is not None:
            copy_bias = json.loads((init_vlm / "config.json").read_text()).get(
                "ocr_copy_bias", 0.0)
    autocast = amp_context(amp, device)
    step_fn = torch.compile(model) if args.compile else model
    log.info("VLM: %.2fM parameters (%.2fM new); resuming at step %d; amp %s; %d batch "
             "workers; %s", sum(p.numel() for p in lm + new) / 1e6,
             sum(p.numel() for p in new) / 1e6, state["step"], amp, args.workers,
             f"{total} steps" if fixed else f"time budget {budget:.0f} s, at most "
                                               f"{args.steps} steps")
    if missing := missing_fonts():
        log.warning("MISSING FONTS %s (looked in %s): those texts are drawn with Pillow's "
                    "default font", missing, ", ".join(map(str, FONT_DIRS)))
    held_out: list[torch.Tensor] = []
    held_out_read: list[torch.Tensor] = []
    save_seconds = [0.0, 0.0]  # the longest checkpoint, all of them together
    last_saved = state["step"] if loaded else None

    def checkpoint() -> None:
        t = time.time()
        if not held_out:
            held_out.extend(batcher.batch("test", list(HELD_OUT_SEEDS)))
        model.eval()
        with torch.no_grad():  # float32, eager: comparable with earlier held-out losses
            vl = float(model(*(v.to(device) for v in held_out)))
        model.train()
        state["valid_loss"].append([state["step"], vl])
        read = ""
        if model.read_head is not None:
            if not held_out_read:
                held_out_read.extend(read_batch("test", HELD_OUT_READ_SEEDS, batcher.proc,
                                                batcher.patch))
            acc = reading_accuracy(model, *(v.to(device) for v in held_out_read))
            state.setdefault("read_accuracy", []).append([state["step"], acc])
            read = f", reading: {100 * acc:.1f} % of held-out characters"
        print(f"step {state['step']} held-out loss {vl:.3f}{read}", file=sys.stderr,
              flush=True)
        save_checkpoint(run, model, opt, state)
        plot_losses({"train": [tuple(p) for p in state["train_loss"]],
                     "held-out": [tuple(p) for p in state["valid_loss"]]},
                    run / "loss.png", "default VLM")
        if export_to is not None:
            export(run, export_to, copy_bias)
        save_seconds[0] = max(save_seconds[0], time.time() - t)
        save_seconds[1] += time.time() - t

    def one_step(*tensors: torch.Tensor) -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = step_fn(*tensors)
        loss.backward()
        return loss

    def refit(step_seconds: float) -> None:
        """The total fitted to the budget at this step rate; the prefetcher and the saved
        state follow it."""
        nonlocal total
        total = planned_total(state["step"], step_seconds, save_seconds[0], time.time() - t0,
                              budget, args.save_every, args.steps)
        if ahead is not None:
            ahead.limit = total
        state["total"], state["total_restart"] = total, restart
        _write_state(run, state)

    start_step = state["step"]
    calib_from, calib_to = start_step + CALIBRATION_SKIP, (start_step + CALIBRATION_SKIP +
                                                           CALIBRATION_STEPS)
    t_calib = None
    recal: tuple[int, float, int] | None = None  # (step, time, step to measure again at)
    t_last, losses, read_losses, keep_losses = time.time(), [], [], []
    with contextlib.ExitStack() as stack:
        ahead = None
        if args.workers > 0:
            pool = stack.enter_context(BatchPool(run / "tokenizer", batcher_kw, args.batch,
                                                 args.workers))
            ahead = stack.enter_context(Prefetcher(pool, state["step"], total,
                                                   pin=device.startswith("cuda")))
        while state["step"] < total:
            step = state["step"]
            if fixed:
                scale = lr_at(step, total, 1.0, args.warmup, 0.1, restart)
            elif step - restart < args.warmup:  # the warm-up does not depend on the total
                scale = lr_at(step, args.steps, 1.0, args.warmup, 0.1, restart)
            else:  # past the warm-up before the total is fixed: the peak
                scale = 1.0
            opt.param_groups[0]["lr"] = args.lr * scale
            opt.param_groups[1]["lr"] = args.lr * args.lm_lr_scale * scale
            cpu = None
            if ahead is not None:
                try:
                    cpu = ahead.get(step)
                except RuntimeError as e:  # the same batches, slower: the run goes on
                    log.error("the batch workers failed (%s); drawing the batches in this "
                              "process from step %d on", e, step)
                    stack.close()
                    ahead = None
            if cpu is None:
                cpu = batcher.batch("train", train_seeds(step, args.batch))
            tensors = tuple(t.to(device, non_blocking=True) for t in cpu)
            try:
                loss = one_step(*tensors)
            except Exception as e:
                if step_fn is model:
                    raise
                log.error("the compiled model failed (%s: %s); continuing with the eager "
                          "model", type(e).__name__, str(e)[-2000:])
                step_fn = model
                loss = one_step(*tensors)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.detach())
            if model.last_read_loss is not None:
                read_losses.append(model.last_read_loss)
            if model.last_keep_loss is not None:
                keep_losses.append(model.last_keep_loss)
            state["step"] = step + 1
            if state["step"] % args.log_every == 0:
                dt = time.time() - t_last
                t_last = time.time()
                state["seconds"] += dt
                avg = float(torch.stack(losses).float().mean())
                losses = []
                state["train_loss"].append([state["step"], avg])
                parts = []
                for key, name, kept in (("read_loss", "reading {:.3f}", read_losses),
                                        ("keep_loss", "kept {:.4f}", keep_losses)):
                    if kept:
                        v = float(torch.stack(kept).float().mean())
                        state.setdefault(key, []).append([state["step"], v])
                        parts.append(name.format(v))
                        kept.clear()
                read = f" ({', '.join(parts)})" if parts else ""
                print(f"step {state['step']}/{total} loss {avg:.3f}{read} "
                      f"{args.batch * args.log_every / dt:.1f} samples/s", file=sys.stderr,
                      flush=True)
            if not fixed and state["step"] in (calib_from, calib_to):
                _sync(device)
                if state["step"] == calib_from:  # (checkpoints in between not counted)
                    t_calib = time.time() - save_seconds[1]
                else:
                    step_seconds = (time.time() - save_seconds[1] - t_calib) / CALIBRATION_STEPS
                    checkpoint()  # also times a held-out evaluation and checkpoint
                    last_saved = state["step"]
                    refit(step_seconds)
                    fixed = True
                    msg = (f"time budget {budget:.0f} s: {step_seconds * 1000:.1f} ms a "
                           f"step, {save_seconds[0]:.1f} s a checkpoint -> {total} steps")
                    print(msg, file=sys.stderr, flush=True)
                    # measured once more over a longer stretch (the first steps can run
                    # beside other start-up work on a shared machine)
                    if total - state["step"] > 40:
                        recal = (state["step"], time.time() - save_seconds[1],
                                 state["step"] + (total - state["step"]) // 3)
                    continue
            if recal is not None and state["step"] == recal[2]:
                _sync(device)
                step_seconds = ((time.time() - save_seconds[1] - recal[1])
                                / (state["step"] - recal[0]))
                refit(step_seconds)
                recal = None
                print(f"time budget {budget:.0f} s, measured again: {step_seconds * 1000:.1f}"
                      f" ms a step -> {total} steps", file=sys.stderr, flush=True)
            if state["step"] % args.save_every == 0 and state["step"] < total:
                checkpoint()
                last_saved = state["step"]
            if (budget is not None and fixed and state["step"] < total
                    and time.time() - t0 + save_seconds[0] > budget):
                msg = (f"time budget {budget:.0f} s reached at step {state['step']} of "
                       f"{total}: stopping")
                print(msg, file=sys.stderr, flush=True)
                break
    if losses:
        state["seconds"] += time.time() - t_last
    if last_saved != state["step"]:
        checkpoint()
    log.info("done at step %d, %.0f s after the start", state["step"], time.time() - t0)


def _write_state(run: Path, state: dict) -> None:
    """Rewrite the last checkpoint's state JSON (after the total was fixed)."""
    path = run / "ckpt" / "state.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path)


def export(run: Path, out: Path, ocr_copy_bias: float = 0.0) -> None:
    """The last checkpoint as a Hugging Face Llava checkpoint directory. `ocr_copy_bias`
    (for a model trained to copy labels from OCR lines) goes into config.json, where the
    server reads it for `describe-diagram` (server/features/vision.py), with
    `ocr_prompt_tasks`, the tasks it was trained to read OCR lines in, and
    `ocr_label_constraint`."""
    from safetensors.torch import load_file, save_file

    tok_dir = run / "tokenizer"
    text = json.loads((tok_dir / "config.json").read_text())
    state = {k: v for k, v in load_file(str(run / "ckpt" / "model.safetensors")).items()
             # the reading head and the kept tower are for training only
             if not k.startswith(("read_head.", "keep_teacher."))}
    vision_cfg = run_vision(run)
    vision = VisionConfig.from_hf(vision_cfg)
    state["vision_tower.post_layernorm.weight"] = torch.ones(vision.hidden_size)
    state["vision_tower.post_layernorm.bias"] = torch.zeros(vision.hidden_size)
    tok = Tokenizer.from_dir(tok_dir)
    st = json.loads((run / "ckpt" / "state.json").read_text())
    ocr_tasks = ocr_tasks_arg(st.get("args", {}).get("ocr_tasks"))
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    eos = tok.token_to_id(formats.EOT)
    text_config = {k: v for k, v in text.items() if k not in ("architectures", "torch_dtype")}
    config = {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "image_token_index": tok.token_to_id(formats.IMAGE),
        "image_seq_length": vision.num_patches, "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full", "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True, "tie_word_embeddings": True,
        "text_config": text_config,
        "vision_config": {**vision_cfg, "vision_use_head": False},
    }
    if ocr_copy_bias > 0:
        config["ocr_copy_bias"] = ocr_copy_bias
        # the tasks whose prompts carried OCR lines in training: the server puts the lines
        # only into those (an explanation asked with lines it never saw goes astray)
        config["ocr_prompt_tasks"] = list(ocr_tasks)
        # its diagram answers ("Nodes: ... . Edges: ... .") may keep their labels to the
        # words the OCR read (models/constrain.py)
        config["ocr_label_constraint"] = True
    (out / "config.json").write_text(json.dumps(config, indent=1))
    (out / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": eos, "pad_token_id": eos, "do_sample": False}, indent=1))
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / name, out / name)
    if (run / "loss.png").is_file():
        shutil.copy(run / "loss.png", out / "loss.png")
    (out / "training.json").write_text(json.dumps(
        {k: st[k] for k in ("step", "seconds", "device", "args")} |
        {"final_held_out_loss": st["valid_loss"][-1][1] if st["valid_loss"] else None},
        indent=1))


def scene_weights(text: str) -> dict[str, float]:
    """`--scene-weights`: "kind=weight,..." over the scene question kinds (vlm_data's
    SCENE_QUESTIONS and TRAIN_SCENE_QUESTIONS)."""
    out: dict[str, float] = {}
    kinds = set(SCENE_QUESTIONS) | set(TRAIN_SCENE_QUESTIONS)
    for part in text.split(","):
        kind, eq, w = part.strip().partition("=")
        if not eq or kind not in kinds:
            raise argparse.ArgumentTypeError(
                f"{part!r}: expected kind=weight with kind one of {', '.join(sorted(kinds))}")
        try:
            out[kind] = float(w)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r}: the weight is not a number") from None
        if not out[kind] >= 0:
            raise argparse.ArgumentTypeError(f"{part!r}: the weight must be >= 0")
    if sum(out.values()) <= 0:
        raise argparse.ArgumentTypeError("at least one weight must be > 0")
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--run", type=Path, required=True)
    t.add_argument("--init", type=Path, default=Path(__file__).resolve().parents[1] /
                   "default" / "code")
    t.add_argument("--init-vlm", type=Path, default=None,
                   help="start from an exported VLM directory (e.g. models/default/vlm) "
                        "instead of --init's code model")
    t.add_argument("--steps", type=int, default=3000,
                   help="the number of steps (an upper bound with --time-budget)")
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--lm-lr-scale", type=float, default=0.5)
    t.add_argument("--warmup", type=int, default=100)
    t.add_argument("--log-every", type=int, default=10)
    t.add_argument("--save-every", type=int, default=100)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--compile", action="store_true",
                   help="torch.compile the model (the eager one if compiling fails)")
    t.add_argument("--amp", choices=("none", "bf16"), default=None,
                   help="bfloat16 autocast of the forward (default: bf16 on CUDA, else none)")
    t.add_argument("--workers", type=int, default=0,
                   help="draw the batches in that many spawned processes (0: in-process)")
    t.add_argument("--time-budget", type=float, default=None,
                   help="seconds from the start: time ~20 steps, then fix the number of "
                        "steps (at most --steps) so that the run ends within them")
    t.add_argument("--export-to", type=Path, default=None,
                   help="also export the model there at every checkpoint and at the end")
    t.add_argument("--ocr-copy-bias", type=float, default=None,
                   help="for --export-to (default: --init-vlm's, else 0)")
    t.add_argument("--ocr-rate", type=float, default=0.0,
                   help="share of samples trained with simulated OCR lines in the prompt")
    t.add_argument("--novel-words", type=float, default=0.0,
                   help="share of train diagrams labelled with made-up words, so that the "
                        "labels must be copied from the OCR lines rather than memorised")
    t.add_argument("--novel-vocab", type=float, default=0.4,
                   help="share of code-vocabulary words among the made-up diagram labels "
                        "(the rest random letters and made-up syllables, which a long run "
                        "cannot learn by heart from the pixels)")
    t.add_argument("--novel-pieces", type=float, default=0.0,
                   help="share of the made-up diagram labels made of one or two tokens of "
                        "the whole vocabulary (any case), drawn before --novel-vocab: every "
                        "token stays one the model can copy from the OCR lines")
    t.add_argument("--novel-text", type=float, default=0.0,
                   help="the same for train code screenshots and error dialogs: their "
                        "words are read, not memorised (a long run learns the training "
                        "words' answers by heart otherwise)")
    t.add_argument("--error-share", type=float, default=0.0,
                   help="turn that share of the other samples into error dialogs (an "
                        "error-reading continuation); drawn after --scene-share")
    t.add_argument("--sample-offset", type=int, default=0,
                   help="draw train sample k from seed k + this (a continuation that should "
                        "not see the pictures of an earlier run again)")
    t.add_argument("--restart", type=int, default=None,
                   help="start a new warm-up and cosine schedule at this step (a "
                        "continued run)")
    t.add_argument("--diagram-share", type=float, default=0.0,
                   help="turn that share of the other samples into flowcharts (a "
                        "diagram-reading continuation)")
    t.add_argument("--scene-share", type=float, default=0.0,
                   help="turn that share of the other samples into scenes of shapes (a "
                        "counting and grounding continuation)")
    kinds = ", ".join(sorted(set(SCENE_QUESTIONS) | set(TRAIN_SCENE_QUESTIONS)))
    t.add_argument("--scene-weights", type=scene_weights, default=None,
                   help="draw the train scenes' questions by these weights, e.g. "
                        f"count=3,locate=3,color=1 (kinds: {kinds}; default: uniform)")
    t.add_argument("--pad", choices=("fixed", "longest"), default="fixed",
                   help="pad batches to the fixed sequence length (default; what a compiled "
                        "model wants) or to each batch's longest sample (faster eager runs "
                        "of short samples)")
    t.add_argument("--box-tokens", choices=("tokenizer", "regular"), default="tokenizer",
                   help="train locate answers in the tokenizer's own tokens, or in regular "
                        "number tokens (hundreds digit, then two digits; see box_ids)")
    t.add_argument("--first-coord-weight", type=float, default=1.0,
                   help="weight of the loss of a box answer's first coordinate (its one or "
                        "two tokens; 1: as every other answer token)")
    t.add_argument("--read-weight", type=float, default=0.0,
                   help="weight of the tower's per-patch reading loss on reading pictures "
                        "(read_data.py); 0: no reading head")
    t.add_argument("--read-batch", type=int, default=0,
                   help="reading pictures added to each train batch for that loss")
    t.add_argument("--read-transcribe", type=float, default=0.0,
                   help="share of the train samples that are not scenes replaced by a "
                        "reading picture to transcribe")
    t.add_argument("--ocr-tasks", default=None,
                   help="the tasks whose prompts carry OCR lines at --ocr-rate, comma "
                        "separated (describe-diagram); export writes them as the "
                        "checkpoint's ocr_prompt_tasks")
    t.add_argument("--chart-share", type=float, default=0.0,
                   help="share of train samples that are neither scenes nor charts made "
                        "a bar chart (after --scene-share, before --error-share)")
    t.add_argument("--spell", action="store_true",
                   help="train transcriptions, and diagram descriptions without OCR lines, "
                        "one character per token (held-out answers too)")
    t.add_argument("--keep-tower", type=float, default=0.0,
                   help="train the tower alone to read (needs --read-weight, --read-batch): "
                        "the answers' loss replaced by this weight times how far the "
                        "projected features of the batch's pictures moved from the starting "
                        "tower's; the decoder and projector frozen")
    t.add_argument("--patch", type=int, default=None,
                   help="the tower's patch size for a new run (16; 8: 400 image tokens, the "
                        "--init-vlm tower resized to them, for reading small text)")
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    e = sub.add_parser("export")
    e.add_argument("--run", type=Path, required=True)
    e.add_argument("--out", type=Path, required=True)
    e.add_argument("--ocr-copy-bias", type=float, default=0.0,
                   help="logit bias the server puts on OCR tokens for describe-diagram")
    return p


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    args = parser().parse_args()
    if args.cmd == "train":
        if args.workers < 0:
            raise SystemExit("--workers must be >= 0")
        train(args)
    else:
        export(args.run, args.out, args.ocr_copy_bias)


if __name__ == "__main__":
    main()
