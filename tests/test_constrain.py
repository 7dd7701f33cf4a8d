"""Constrained decoding (models/constrain.py): the engine's hook and the diagram labels
kept to the words the OCR read."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from codevista.models.constrain import DiagramLabels, label_slot
from codevista.models.engine import Engine, SamplingParams
from codevista.models.errors import RequestError
from codevista.models.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
VLM = ROOT / "models/default/vlm"
needs_vlm = pytest.mark.skipif(not (VLM / "model.safetensors").is_file(),
                               reason="the default VLM is not shipped in this checkout")


class Only:
    """Allows `ids` (None: any); records what it was asked with."""

    def __init__(self, ids):
        self.ids = ids
        self.asked: list[list[int]] = []

    def allowed(self, generated):
        self.asked.append(list(generated))
        return self.ids


def test_the_engine_samples_only_allowed_tokens(loaded_qwen):
    prompt = list(range(5, 35))
    with Engine(loaded_qwen) as eng:
        free = eng.generate(prompt, SamplingParams(max_new_tokens=12, ignore_eos=True))
        allowed = sorted(set(range(40, 60)) - set(free.token_ids))
        c = Only(allowed)
        kept = eng.generate(prompt, SamplingParams(max_new_tokens=12, ignore_eos=True,
                                                   constraint=c))
        assert set(kept.token_ids) <= set(allowed)  # free decoding picks none of them
        assert [len(a) for a in c.asked] == list(range(12))  # asked before each token
        assert c.asked[-1] == kept.token_ids[:-1]
        # None (or nothing allowed) leaves the model free: never a dead end
        for ids in (None, [], [10 ** 6]):
            r = eng.generate(prompt, SamplingParams(max_new_tokens=12, ignore_eos=True,
                                                    constraint=Only(ids)))
            assert r.token_ids == free.token_ids


def test_a_failing_constraint_fails_its_request_only(loaded_qwen):
    class Broken:
        def allowed(self, generated):
            raise ValueError("boom")

    with Engine(loaded_qwen) as eng:
        bad = eng.submit(list(range(5, 20)), SamplingParams(max_new_tokens=5,
                                                            constraint=Broken()))
        r = bad.result()
        assert r.finish_reason == "error" and "boom" in str(r.error)
        ok = eng.generate(list(range(5, 20)), SamplingParams(max_new_tokens=5,
                                                            ignore_eos=True))
        assert ok.finish_reason == "length"
    with pytest.raises(RequestError):
        SamplingParams(constraint=object())


@pytest.mark.parametrize("text,slot", [
    ("", None), ("Nodes", None), ("The diagram", None),
    ("Nodes:", ("", True, ())),
    ("Nodes: du", (" du", True, ())),
    ("Nodes: dump, ju", (" ju", False, ("dump",))),
    ("Nodes: dump, jump.", None),  # the node list has ended
    ("Nodes: dump, jump. Ed", None),
    ("Nodes: dump, jump. Edges:", ("", True, ())),
    ("Nodes: dump, jump. Edges: dump -> ju", (" ju", False, ())),
    ("Nodes: dump, jump. Edges: dump -> jump, jump ->", ("", False, ())),
    ("Nodes: dump, jump. Edges: dump -> jump.", None),
])
def test_label_slot(text, slot):
    assert label_slot(text) == slot


@pytest.fixture(scope="module")
def vlm_tok() -> Tokenizer:
    if not (VLM / "tokenizer.json").is_file():
        pytest.skip("the default VLM is not shipped in this checkout")
    return Tokenizer.from_dir(VLM)


def _texts(tok: Tokenizer, ids) -> set[str]:
    return {tok.token_texts()[i] for i in ids}


def test_diagram_labels_allow_only_the_read_words(vlm_tok):
    tok = vlm_tok
    c = DiagramLabels(tok, ["dump", "jump", "load config"])

    def after(text: str):
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
        return c.allowed(ids)

    assert after("The picture shows") is None  # not the diagram format: free
    first = _texts(tok, after("Nodes:"))
    labels = ["dump", "jump", "load config", "load", "config"]
    for t in first:  # each goes on with a label (spaced or not) or closes the empty list
        s = t.lstrip() if t.startswith(" ") else t
        assert (any(w.startswith(s) or (s.startswith(w) and not s[len(w)].isalnum())
                    for w in labels) or s.startswith(".")), t
    assert {" d", " j", " l", "d", "j"} <= first  # " jump" is " j" + "ump" here
    assert " k" not in first and " the" not in first and "," not in first
    inside = _texts(tok, after("Nodes: ju"))
    assert inside and all("jump".startswith("ju" + t) or ("ju" + t).startswith("jump")
                          for t in inside), inside
    done = after("Nodes: jump")
    assert tok.token_to_id(",") in done and tok.eos_token_id in done
    assert tok.token_to_id("ing") not in done  # "jumping" was not read
    # a token that closes this label and begins another must begin a read word
    begins = {i: t for i, t in enumerate(tok.token_texts()) if t in ("->_", ",__")}
    assert begins and not set(begins) & set(done)
    # the node list names each box once; edges may repeat labels
    listed = _texts(tok, after("Nodes: jump,"))
    assert " j" not in listed and " d" in listed
    assert " j" in _texts(tok, after("Nodes: jump, dump. Edges: jump -> dump, jump ->"))
    assert after("Nodes: jump, kic") is None  # a word the constraint did not write: free
    assert DiagramLabels(tok, []).allowed(tok.encode("Nodes:")) is None
    # the vocabulary's tables are built once per tokenizer, not per request
    assert DiagramLabels(tok, ["other"])._by_text is c._by_text


@needs_vlm
def test_the_default_vlm_names_only_the_read_labels_of_held_out_diagrams():
    """With the labels given as the OCR lines, every node and edge end the model writes is
    one of them; on the same pictures the copy bias alone lets it write others."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from codevista.models import formats
    from codevista.models.loader import load_model
    from codevista.server.features.vision import ocr_copy_bias, ocr_logit_bias
    from vision_quality import held_out, parse_diagram

    loaded = load_model(VLM)
    tok, vision = loaded.tokenizer, loaded.vision
    image = tok.tok.id_to_token(vision.image_token_id)
    diagrams = list(held_out(12, ("diagram",)))
    assert len(diagrams) == 12
    strays = {"bias": 0, "kept": 0}
    with Engine(loaded) as eng:
        for s in diagrams:
            words = s.meta["nodes"]
            lines = [(w, [0, 0, 100, 100]) for w in words]
            ids = tok.encode(formats.vision_prompt(
                formats.vision_question(s.task, s.question), image,
                formats.ocr_context(lines)), add_special_tokens=False)
            bias = ocr_logit_bias(tok, lines, ocr_copy_bias(loaded))
            for mode, constraint in (("bias", None), ("kept", DiagramLabels(tok, words))):
                out = eng.generate(ids, SamplingParams(max_new_tokens=96, logit_bias=bias,
                                                       constraint=constraint),
                                   images=[vision.preprocess(s.image)]).text
                nodes, edges = parse_diagram(out)
                named = nodes | {w for e in edges for w in e}
                assert out.startswith("Nodes:") and named
                strays[mode] += len(named - set(words))
                if mode == "kept":
                    assert sorted(nodes) == sorted(set(nodes)) and nodes <= set(words), out
    assert strays["kept"] == 0 < strays["bias"]
