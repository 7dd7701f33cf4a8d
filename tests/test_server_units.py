"""Units of the language server: positions, settings, prompts, post-processing."""

from __future__ import annotations

import pytest
from codevista.models.tokenizer import Tokenizer
from codevista.server.documents import PositionError, Snapshot, line_starts, to_offset
from codevista.server.postprocess import Policy, finish
from codevista.server.prompts import ANCHOR_LINES, build_prompt, detect_family
from codevista.server.settings import Settings, parse_settings

TEXT = "a = 1\r\nb = '日本🎉!'\n\nend"


def test_line_starts_handle_crlf_and_trailing_lines():
    assert line_starts(TEXT) == [0, 7, 18, 19]
    assert line_starts("x\n") == [0, 2]


@pytest.mark.parametrize("enc,char,expected", [
    ("utf-16", 10, 16), ("utf-8", 16, 16), ("utf-32", 9, 16), ("utf-16", 7, 14)])
def test_positions_in_each_encoding(enc, char, expected):
    assert to_offset(TEXT, 1, char, enc) == expected


@pytest.mark.parametrize("line,char,enc", [
    (1, 8, "utf-16"),  # inside the surrogate pair of the emoji
    (1, 6, "utf-8"),  # inside the UTF-8 bytes of 日
    (0, 6, "utf-16"),  # past the end of line 0 (the \r\n is not part of it)
    (4, 0, "utf-16"),  # past the last line
    (0, -1, "utf-16")])
def test_impossible_positions_raise(line, char, enc):
    with pytest.raises(PositionError):
        to_offset(TEXT, line, char, enc)


def test_settings_apply_good_fields_and_report_bad_ones():
    s, errors = parse_settings({"codevista": {"maxTokens": 32, "temperature": 5,
                                              "languages": {"markdown": False}, "x": 1}},
                               Settings())
    assert s.max_tokens == 32 and s.temperature == 0.0
    assert not s.language_enabled("markdown") and s.language_enabled("python")
    assert len(errors) == 2 and any("temperature" in e for e in errors)
    same, errors = parse_settings("nonsense", s)
    assert same == s and errors


def _snap(text: str, cursor: str = "|") -> Snapshot:
    i = text.index(cursor)
    return Snapshot("file:///t.py", 1, text.replace(cursor, "", 1), "python", i)


def test_single_line_mid_line_and_block_at_line_end():
    mid = Policy.for_snapshot(_snap("x = foo(|)\n"))
    assert mid.single_line and mid.cut("a, b)\nmore") == ("a, b)", True)
    block = Policy.for_snapshot(_snap("def f(x):\n    |\n"))
    kept, done = block.cut("if x:\n        return 1\n    return 2\ndef g():\n")
    assert kept == "if x:\n        return 1\n    return 2" and done


def test_block_after_an_opening_line_is_its_body():
    p = Policy.for_snapshot(_snap("def f(x):|"))
    kept, done = p.cut("\n    return x\n\nprint(f(1))\n")
    assert done and kept == "\n    return x\n"


def test_finish_trims_suffix_repeat_trailing_space_and_neighbour_repeats():
    assert finish("a, b)", _snap("x = foo(|)\n")) == "a, b"
    assert finish("total += 1   \n", _snap("for i in r:\n    |")) == "total += 1"
    assert finish("y = 2", _snap("y = 2\n|\nz = 3")) == ""
    assert finish("   ", _snap("x = |")) == ""


def test_prompt_start_is_stable_while_typing(tokenizer_dir):
    tok = Tokenizer.from_dir(tokenizer_dir)
    family = detect_family(tok)
    assert family.name == "qwen"  # the tiny tokenizer has <|fim_prefix|> ... tokens
    body = "".join(f"value_{i} = compute({i})\n" for i in range(400))
    starts = set()
    for typed in ("r", "re", "ret", "retu"):
        snap = Snapshot("file:///t.py", 1, body + typed, "python", len(body) + len(typed))
        prompt = build_prompt(family, tok, snap, 512)
        assert len(prompt.ids) <= 512
        starts.add(snap.prefix[len(snap.prefix) - prompt.prefix_chars:][:40])
    assert len(starts) == 1  # the window begins at the same anchored line each time
    assert ANCHOR_LINES > 1


def test_block_stops_when_the_model_repeats_a_line():
    p = Policy.for_snapshot(_snap("|"))
    kept, done = p.cut("import os\nimport os\nimport os\n")
    assert done and kept == "import os"


def test_other_documents_come_first_within_budget(tokenizer_dir):
    from codevista.server.prompts import Family, context_block

    tok = Tokenizer.from_dir(tokenizer_dir)
    family = detect_family(tok)
    others = [("file:///recent.py", "def helper(x):\n    return x * 2\n"),
              ("file:///older.py", "CONSTANT = 42\n" * 200)]
    block = context_block(family, "python", others, 300)
    assert block.startswith("<|file_sep|>file:///recent.py\n")
    assert block.index("recent.py") < block.index("older.py") and len(block) <= 320
    plain = context_block(Family("codevista", True), "python", others[:1], 300)
    assert plain.startswith("# from file:///recent.py:\ndef helper")
    snap = Snapshot("file:///t.py", 1, "x = hel", "python", 7)
    with_ctx = build_prompt(family, tok, snap, 512, others=others)
    assert with_ctx.context_chars > 0 and len(with_ctx.ids) <= 512
    tight = build_prompt(family, tok, snap, 40, others=others)
    assert tight.context_chars == 0 and len(tight.ids) <= 40  # dropped before the file


def test_block_stops_when_the_model_repeats_a_group_of_lines():
    p = Policy.for_snapshot(_snap("def f(file):\n    |"))
    kept, done = p.cut("if not file:\n        return None\n    if not file:\n        return None\n"
                       "    x = 1\n")
    assert done and kept == "if not file:\n        return None"


def test_repeat_with_blank_lines_between():
    p = Policy.for_snapshot(_snap("|"))
    kept, done = p.cut("a = 1\n\nb = 2\na = 1\n\nb = 2\nc\n")
    assert done and kept == "a = 1\n\nb = 2"


def test_end_of_definition_for_brace_languages():
    from codevista.server.postprocess import end_of_definition

    assert end_of_definition('int f() { if (a) { return "}"; } return 1; } int g() {}') == \
        'int f() { if (a) { return "}"; } return 1; }'
    assert end_of_definition("public abstract void Run(); void x() {}") == \
        "public abstract void Run();"
    assert end_of_definition("no braces here") == "no braces here"


def test_backend_setting_is_local_or_a_valid_remote():
    from codevista.server.remote import RemoteConfig
    from codevista.server.settings import Settings, parse_settings

    remote = {"kind": "openai", "url": "http://gpu:8000/", "model": "m",
              "apiKeyEnv": "CV_KEY", "timeoutMs": 5000, "contextTokens": 8192}
    s, errors = parse_settings({"backend": remote}, Settings())
    assert not errors and s.backend == remote
    cfg = RemoteConfig.from_setting(remote)
    assert (cfg.url, cfg.timeout_s, cfg.max_positions) == ("http://gpu:8000", 5.0, 8192)
    for bad in ({"kind": "openai", "url": "gpu:8000", "model": "m"},
                {"kind": "openai", "url": "http://gpu", "model": ""},
                {"kind": "grpc", "url": "http://gpu", "model": "m"}, "remote"):
        s2, errors = parse_settings({"backend": bad}, s)
        assert errors and "backend" in errors[0] and s2.backend == remote


def test_remote_api_key_comes_from_the_environment_only(monkeypatch):
    pytest.importorskip("httpx")
    from codevista.server.remote import OpenAIBackend, RemoteConfig

    b = OpenAIBackend(RemoteConfig.from_setting(
        {"kind": "openai", "url": "http://127.0.0.1:9", "model": "m", "apiKeyEnv": "CV_K"}))
    monkeypatch.delenv("CV_K", raising=False)
    assert b.headers() == {}
    monkeypatch.setenv("CV_K", "s3cret")
    assert b.headers() == {"Authorization": "Bearer s3cret"}
    err = b.http_error(401, "bad key")
    assert "s3cret" not in str(err) and "$CV_K" in str(err)


def test_embedded_model_is_asked_with_the_prefix_alone_at_a_line_end():
    """The codevista family: at the end of a line the prompt is the plain left-to-right
    format (tag + text before the cursor) with the whole budget; with text after the
    cursor on its line, the suffix-first FIM prompt; an unknown language keeps FIM."""
    from codevista.models import formats
    from codevista.models.loader import DEFAULT_MODEL_DIR

    tok = Tokenizer.from_dir(DEFAULT_MODEL_DIR)
    family = detect_family(tok)
    assert family.name == "codevista" and family.prefix_only_at_line_end
    text = "def area(r):\n    return 3.14 * r\n\nprint(area(2))\n"
    at_end = Snapshot("file:///a.py", 1, text, "python", text.index("3.14"))
    cut = at_end.text[:at_end.offset] + at_end.text[text.index("\n\nprint"):]
    line_end = Snapshot("file:///a.py", 1, cut, "python", at_end.offset)
    prefix = "def area(r):\n    return "
    p = build_prompt(family, tok, line_end, 256)
    assert p.heal and prefix.endswith(p.heal)  # token healing as everywhere
    assert tok.decode(p.ids, skip_special_tokens=False) == formats.plain(
        "python", prefix[:len(prefix) - len(p.heal)])
    assert p.suffix_chars == 0 and p.fim_suffix == ""
    mid = build_prompt(family, tok, at_end, 256)  # "3.14 * r" follows the cursor
    assert tok.decode(mid.ids, skip_special_tokens=False) == formats.fim_spm(
        "python", prefix[:len(prefix) - len(mid.heal)], "3.14 * r\n\nprint(area(2))\n")
    unknown = build_prompt(family, tok, Snapshot("file:///a.x", 1, cut, "zig", at_end.offset),
                           256)
    assert formats.FIM_MIDDLE in tok.decode(unknown.ids, skip_special_tokens=False)


def test_a_model_can_cap_its_prompt_budget(tmp_path):
    from codevista.models.loader import DEFAULT_MODEL_DIR
    from codevista.server.prompts import model_prompt_tokens, prompt_budget

    assert model_prompt_tokens(DEFAULT_MODEL_DIR) == 512  # the embedded model's card says why
    assert prompt_budget(1024, 1024, 48, 512) == 512
    assert prompt_budget(1024, 1024, 48, None) == 976  # room left for the answer
    assert prompt_budget(300, 1024, 48, 512) == 300  # the setting, when smaller
    for bad in ('{"codevista_prompt_tokens": "512"}', '{"codevista_prompt_tokens": 3}',
                '{"codevista_prompt_tokens": true}', "not json", "[]"):
        (tmp_path / "config.json").write_text(bad)
        assert model_prompt_tokens(tmp_path) is None
    assert model_prompt_tokens(tmp_path / "missing") is None and model_prompt_tokens(None) is None
