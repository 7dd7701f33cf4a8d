"""Translation building blocks: languages, splitting, output clean-up, chat templates, and
the service's streaming over a scripted backend."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from codevista.models.chat import ChatTemplate, TemplateError
from codevista.server.translation import (
    LANGUAGES,
    OutputCutter,
    UnsupportedLanguageError,
    clean_output,
    count_blocks,
    looping_at,
    plan_pieces,
    resolve_language,
    split_units,
    suggested_file_name,
)
from hypothesis import given, settings
from hypothesis import strategies as st

L = LANGUAGES

JAVA = """package demo;

import java.util.*;

/** A stack. */
@Deprecated
public class Stack {
    private final List<Integer> items = new ArrayList<>();
    // adds one
    public void push(int x) {
        String s = "}";  // a brace in a string
        char c = '{';
        items.add(x);
    }

    public int pop() { if (items.isEmpty()) { throw new RuntimeException(); } return 1; }
}

class Other {
}
"""

PY = '''import os
from typing import (List,
                    Dict)


@cache
def f(x):
    """Doc with
def inside
"""
    return x


class C:
    def m(self):
        pass

    # about n
    def n(self):
        if self:
            pass
        else:
            pass


if __name__ == "__main__":
    f(1)
'''

RUST = """use std::collections::HashMap;

#[derive(Debug)]
struct Point<'a> {
    name: &'a str,
}

impl<'a> Point<'a> {
    fn new(name: &'a str) -> Self {
        let c = '}';
        Point { name }
    }
}

fn main() {}
"""


def test_languages_and_aliases():
    for alias, lang in [("C#", "csharp"), ("cs", "csharp"), ("c++", "cpp"), ("Golang", "go"),
                        ("typescriptreact", "typescript"), ("PY", "python"), ("rs", "rust")]:
        assert resolve_language(alias).id == lang
    with pytest.raises(UnsupportedLanguageError) as info:
        resolve_language("COBOL")
    for lang in L.values():
        assert lang.name in str(info.value)
    with pytest.raises(UnsupportedLanguageError):
        resolve_language(None)


def test_suggested_file_names():
    assert suggested_file_name("file:///home/u/Stack.java", L["csharp"]) == "Stack.cs"
    assert suggested_file_name("file:///home/u/my%20file.py", L["go"]) == "my file.go"
    assert suggested_file_name("untitled:Untitled-1", L["rust"]) == "translation.rs"


def test_java_units_at_top_level_and_inside_the_class():
    units = split_units(JAVA, L["java"])
    assert "".join(units) == JAVA
    assert [u.strip().split("\n")[0] for u in units] == [
        "package demo;", "import java.util.*;", "/** A stack. */", "class Other {"]
    members = split_units(units[2], L["java"], level=1)
    assert "".join(members) == units[2]
    assert [m.strip().split("\n")[0] for m in members] == [
        "/** A stack. */", "private final List<Integer> items = new ArrayList<>();",
        "// adds one", "public int pop() { if (items.isEmpty()) { throw "
        "new RuntimeException(); } return 1; }"]


def test_python_units_keep_decorators_comments_and_strings():
    units = split_units(PY, L["python"])
    assert "".join(units) == PY
    firsts = [u.strip().split("\n")[0] for u in units]
    assert firsts == ["import os", "from typing import (List,", "@cache", "class C:",
                      'if __name__ == "__main__":']
    members = split_units(units[3], L["python"], level=1)
    assert [m.strip().split("\n")[0] for m in members] == ["class C:", "def m(self):",
                                                            "# about n"]


def test_rust_lifetimes_are_not_character_literals():
    units = split_units(RUST, L["rust"])
    assert [u.strip().split("\n")[0] for u in units] == [
        "use std::collections::HashMap;", "#[derive(Debug)]", "impl<'a> Point<'a> {",
        "fn main() {}"]
    assert count_blocks(RUST, L["rust"]) == 3


def test_leaf_pieces_split_a_class_into_header_members_and_closing_brace():
    pieces = plan_pieces(JAVA, L["java"], lambda p: len(p) < 10_000, leaf=True)
    assert "".join(pieces) == JAVA
    assert pieces[0].startswith("package demo;") and "public class Stack {" in pieces[0]
    assert "public void push" in pieces[1] and pieces[1].count("public") == 1
    assert pieces[2].strip().startswith("public int pop()")
    assert pieces[3].strip() == "}"
    assert pieces[4].strip().startswith("class Other")
    whole = plan_pieces(JAVA, L["java"], lambda p: len(p) < 10_000)
    assert "".join(whole) == JAVA and len(whole) == 1


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab {}()\"'#/*\n\t:;")), max_size=300),
       st.sampled_from(["java", "python", "rust"]), st.integers(8, 60))
def test_pieces_always_join_back_and_fit(text, lang, limit):
    pieces = plan_pieces(text, L[lang], lambda p: len(p) <= limit, leaf=lang != "rust")
    assert "".join(pieces) == text
    assert all(0 < len(p) <= limit for p in pieces)


def test_clean_output_strips_fences_and_chatter():
    fenced = "Sure! Here is the C# code:\n\n```csharp\nint Add(int a) {\n  return a;\n}\n```\n" \
             "This code adds."
    assert clean_output(fenced) == "int Add(int a) {\n  return a;\n}\n"
    streaming = "```go\nfunc f() {\n"
    assert clean_output(streaming, final=False) == "func f() {\n"
    plain = "Here is the translation:\nfn f() {}\n\nThis version uses Rust idioms."
    assert clean_output(plain) == "fn f() {}\n"
    code_then_block = "x = 1\ny = 2\nprint(x)\n\nExample:\n```\n>>> f()\n```"
    assert clean_output(code_then_block).startswith("x = 1\ny = 2\nprint(x)\n")
    assert clean_output("   \n") == ""


def test_cutter_stops_after_the_source_count_of_definitions():
    one_line = "public int F() { return \"}\"; } public int G() { return 2; }"
    kept, done = OutputCutter(L["csharp"], 1).cut(one_line)
    assert done and kept == 'public int F() { return "}"; }'
    assert OutputCutter(L["csharp"], 2).cut(one_line) == (one_line, True)
    assert OutputCutter(L["csharp"], 1).cut("int f() {\n  if (x) {") == (
        "int f() {\n  if (x) {", False)
    py = "def f(x):\n    return x\n\ndef g():\n"
    assert OutputCutter(L["python"], 1).cut(py) == ("def f(x):\n    return x\n\n", True)
    assert OutputCutter(L["python"], 1).cut("def f(x):\n    return x\n") == (
        "def f(x):\n    return x\n", False)


def test_loops_are_cut_to_one_copy():
    lines = "int f() {\n    x = 0;\n    x = 0;\n    x = 0;\n"
    assert lines[:looping_at(lines)] == "int f() {\n    x = 0;\n"
    inline = "return a + b" + " + b" * 20
    cut = inline[:looping_at(inline)]
    assert cut.startswith("return a + b") and len(cut) < 24
    one_line = 'public R(): base("a", "b")' + '{Method = "openAPI")' * 4
    assert one_line[:looping_at(one_line)] == 'public R(): base("a", "b"){Method = "openAPI")'
    assert looping_at('if (a) {x = f("long argument");} else {y = g("other one");}') is None
    assert looping_at("}\n}\n}\n}\n") is None  # closing braces are not a loop
    assert looping_at("a = 1\nb = 2\nc = 3\n") is None


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_chat_template_from_tokenizer_config_and_files(tmp_path: Path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHATML, "eos_token": {"content": "<|im_end|>"}}))
    t = ChatTemplate.from_dir(tmp_path)
    assert t is not None and t.eos_token == "<|im_end|>"
    text = t.render([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "T"},
                           {"name": "default", "template": "D{{ bos_token }}"}],
         "bos_token": "<s>"}))
    assert ChatTemplate.from_dir(tmp_path).render([]) == "D<s>"
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert ChatTemplate.from_dir(tmp_path) is None  # a base model
    (tmp_path / "chat_template.jinja").write_text("J{{ messages|length }}")
    assert ChatTemplate.from_dir(tmp_path).render([{"role": "user", "content": ""}]) == "J1"


def test_chat_template_is_sandboxed_and_errors_are_clear(tmp_path: Path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{{ ''.__class__.__mro__[1].__subclasses__() }}"}))
    with pytest.raises(TemplateError):
        ChatTemplate.from_dir(tmp_path).render([])
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{% if %}"}))
    with pytest.raises(TemplateError, match="does not parse"):
        ChatTemplate.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{{ raise_exception('only user and assistant roles') }}"}))
    with pytest.raises(TemplateError, match="only user and assistant"):
        ChatTemplate.from_dir(tmp_path).render([])


# -- the service over a scripted backend --------------------------------------------------

class _Gen:
    def __init__(self, text: str) -> None:
        self.chunks = [text[i:i + 3] for i in range(0, len(text), 3)]
        self.cancelled = False

    async def astream(self):
        for c in self.chunks:
            if self.cancelled:
                return
            await asyncio.sleep(0)
            yield c

    async def aresult(self):
        from codevista.models.engine import GenerationResult

        return GenerationResult("", [1] * len(self.chunks),
                                "cancelled" if self.cancelled else "stop", 5, 0, 0.0, 0.0)

    def cancel(self) -> None:
        self.cancelled = True


class ScriptedBackend:
    """Answers each prompt with the next scripted text; records the prompts."""

    def __init__(self, tokenizer, family, answers: list[str], chat_template=None) -> None:
        self.state, self.error = "ready", None
        self.tokenizer, self.family, self.chat_template = tokenizer, family, chat_template
        self.answers, self.prompts, self.max_positions = list(answers), [], 512

    def stop_ids(self, tokens):
        return (0,)

    def submit(self, ids, params):
        self.prompts.append((self.tokenizer.decode(ids, skip_special_tokens=False), params))
        return _Gen(self.answers.pop(0))


@pytest.fixture(scope="module")
def default_tokenizer():
    from codevista.models.loader import DEFAULT_MODEL_DIR
    from codevista.models.tokenizer import Tokenizer

    return Tokenizer.from_dir(DEFAULT_MODEL_DIR)


def test_service_streams_pieces_in_order_with_the_embedded_template(default_tokenizer):
    from codevista.server.features.translate import TranslationService
    from codevista.server.prompts import detect_family

    src = ("public class A {\n    int x;\n\n    public int f() {\n        return 1;\n    }\n\n"
           "    public int g() {\n        return 2;\n    }\n}\n")
    answers = ["public class A\n{\n    int x;\n",
               "public int F()\n{\n    return 1;\n}\npublic int Extra() {}",
               "public int G() { return 2; }<junk"]
    backend = ScriptedBackend(default_tokenizer, detect_family(default_tokenizer), answers)
    seen: list[str] = []
    result = asyncio.run(TranslationService(backend).translate(
        src, L["java"], L["csharp"], seen.append))
    assert result.pieces == 4
    assert result.text == ("public class A\n{\n    int x;\n\n"
                           "public int F()\n{\n    return 1;\n}\n\n"
                           "public int G() { return 2; }\n}\n")
    assert seen[-1].rstrip("\n") == result.text.rstrip("\n")
    # every partial is a prefix-consistent snapshot: finished pieces never change
    for a, b in zip(seen, seen[1:], strict=False):
        done = a[: a.rfind("\n\n") + 2] if "\n\n" in a else ""
        assert b.startswith(done)
    prompt = backend.prompts[1][0]
    assert prompt.startswith("<|lang:java|>") and prompt.endswith("<|translate|><|lang:csharp|>")
    assert "public int f()" in prompt and "class A" not in prompt


def test_service_uses_the_chat_template_and_strips_the_fence(default_tokenizer, tmp_path):
    from codevista.server.features.translate import TranslationService
    from codevista.server.prompts import Family

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    backend = ScriptedBackend(default_tokenizer, Family("qwen", False),
                              ["func Add(a, b int) int {\n\treturn a + b\n}\n```\nDone."],
                              ChatTemplate.from_dir(tmp_path))
    result = asyncio.run(TranslationService(backend).translate(
        "def add(a, b):\n    return a + b\n", L["python"], L["go"]))
    assert result.text == "func Add(a, b int) int {\n\treturn a + b\n}\n"
    prompt, params = backend.prompts[0]
    assert "<|im_start|>user\nTranslate the following Python code to idiomatic Go" in prompt
    assert prompt.endswith("<|im_start|>assistant\n```go\n")
    assert params.stop == ("```",)


def test_service_tags_languages_for_base_models(default_tokenizer):
    from codevista.server.features.translate import TranslationService
    from codevista.server.prompts import Family

    backend = ScriptedBackend(default_tokenizer, Family("plain", False),
                              ["fn add(a: i32) -> i32 {\n    a\n}\n"])
    result = asyncio.run(TranslationService(backend).translate(
        "int add(int a) {\n    return a;\n}\n", L["c"], L["rust"]))
    assert result.text == "fn add(a: i32) -> i32 {\n    a\n}\n"
    prompt, params = backend.prompts[0]
    assert prompt == "// language: C\nint add(int a) {\n    return a;\n}\n\n// language: Rust\n"
    assert "\n// language:" in params.stop


def test_embedded_model_refuses_unknown_source_languages(default_tokenizer):
    from codevista.server.features.translate import TranslationService
    from codevista.server.prompts import detect_family
    from codevista.server.translation import other_language

    backend = ScriptedBackend(default_tokenizer, detect_family(default_tokenizer), [])
    with pytest.raises(UnsupportedLanguageError, match="Kotlin"):
        asyncio.run(TranslationService(backend).translate(
            "fun f() = 1\n", other_language("kotlin"), L["java"]))
