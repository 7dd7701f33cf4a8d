from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import FAMILIES, VISION, VLM_SPECIAL, make_checkpoint, make_llava, train_tokenizer


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path
                ) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {name: make_checkpoint(name, root / name, tokenizer_dir) for name in FAMILIES}


@pytest.fixture(scope="session")
def qwen_dir(checkpoints: dict[str, Path]) -> Path:
    return checkpoints["qwen2"]


@pytest.fixture(scope="session")
def loaded_qwen(qwen_dir: Path):
    from codevista.models.loader import load_model

    return load_model(qwen_dir)


@pytest.fixture
def engine(loaded_qwen):
    from codevista.models.engine import Engine

    with Engine(loaded_qwen) as eng:
        yield eng


@pytest.fixture(scope="session")
def llava_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random LLaVA checkpoints: CLIP + Llama and SigLIP + Qwen2."""
    tok = tmp_path_factory.mktemp("vlm-tokenizer")
    train_tokenizer(tok, VLM_SPECIAL)
    root = tmp_path_factory.mktemp("llava")
    return {kind: make_llava(kind, root / kind, tok) for kind in VISION}
