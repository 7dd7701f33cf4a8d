"""The training recipe end to end on a tiny corpus: prepare, train, checkpoint, resume,
export; the export loads in codevista and transformers with identical greedy output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from codevista.models.engine import Engine, SamplingParams
from codevista.models.loader import load_model
from codevista.models.train import train as recipe
from tiny_models import load_reference

CODE = {
    "python": "def add(a, b):\n    return a + b\n\n\nclass Stack:\n    def push(self, x):\n"
              "        self.items.append(x)\n",
    "java": "public class Max {\n    static int max(int a, int b) {\n        return a > b ? a : b;"
            "\n    }\n}\n",
    "go": "package main\n\nfunc main() {\n\tfmt.Println(\"hi\")\n}\n",
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("recipe")
    corpus, pairs, run = root / "corpus", root / "pairs", root / "run"
    corpus.mkdir()
    pairs.mkdir()
    for split in ("train", "valid", "test"):
        rows = [{"lang": lang, "source": "t", "path": f"{lang}{i}", "text": text * (i + 1)}
                for i in range(12) for lang, text in CODE.items()]
        (corpus / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for split in ("train", "valid"):
        (pairs / f"{split}.java-cs.txt.java").write_text("public int f() { return 1; }\n" * 20)
        (pairs / f"{split}.java-cs.txt.cs").write_text("public int F() { return 1; }\n" * 20)
    recipe.main(["prepare", "--corpus", str(corpus), "--pairs", str(pairs), "--run", str(run),
                 "--vocab", "400", "--scale", "0.001"])
    return run


TINY = ["--dim", "32", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--ffn", "64",
        "--batch", "2", "--seq-len", "64", "--log-every", "1", "--save-every", "3",
        "--device", "cpu"]


def test_prepare_writes_token_streams(prepared: Path):
    import numpy as np

    tokens = np.load(prepared / "train.tokens.npy")
    starts = np.load(prepared / "train.starts.npy")
    assert tokens.dtype == np.uint16 and len(tokens) > 1000
    assert starts[0] == 0 and (np.diff(starts) > 0).all()
    assert (prepared / "tokenizer" / "tokenizer.json").is_file()


def test_resume_continues_exactly(prepared: Path, tmp_path: Path):
    import shutil

    a = tmp_path / "a"
    shutil.copytree(prepared, a)
    recipe.main(["train", "--run", str(a), "--steps", "6", *TINY])
    # The same run interrupted at step 3, then resumed to 6.
    c = tmp_path / "c"
    shutil.copytree(prepared, c)
    recipe.main(["train", "--run", str(c), "--steps", "3", *TINY])
    state = json.loads((c / "ckpt" / "state.json").read_text())
    assert state["step"] == 3
    recipe.main(["train", "--run", str(c), "--steps", "6", *TINY])
    from safetensors.torch import load_file

    wa = load_file(str(a / "ckpt" / "model.safetensors"))
    wc = load_file(str(c / "ckpt" / "model.safetensors"))
    assert all(torch.allclose(wa[k], wc[k], atol=1e-6) for k in wa)
    assert (a / "loss.png").is_file()


def test_export_loads_in_codevista_and_transformers(prepared: Path, tmp_path: Path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(prepared, run)
    recipe.main(["train", "--run", str(run), "--steps", "3", *TINY])
    export = run / "latest-hf"
    ref = load_reference(export)
    ids = [5, 17, 33, 9, 40]
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12,
                           min_new_tokens=12, pad_token_id=0)
    with Engine(load_model(export)) as engine:
        ours = engine.generate(ids, SamplingParams(max_new_tokens=12, ignore_eos=True))
    assert ours.token_ids == out[0, len(ids):].tolist()
