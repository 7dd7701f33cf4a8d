"""The HumanEval-X translation harness judges right: canonical solutions pass, broken code
fails, and programs stay inside their sandbox (time, memory, network)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import humaneval_x as hx  # noqa: E402

DATA = hx.shared_data() / "humaneval-x"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="HumanEval-X data not present")
TOOL = {"python": "python3", "javascript": "node", "cpp": "g++", "java": "javac",
        "rust": "rustc"}


@pytest.fixture(scope="module")
def problems():
    return hx.load_problems(DATA)


@pytest.fixture(scope="module")
def sandbox():
    return hx.Sandbox(timeout_s=5)


@pytest.mark.parametrize("lang,numbers", [
    ("python", [0, 12, 142 - 1, 163]), ("javascript", [0, 33, 161]), ("cpp", [0, 1, 162]),
    ("java", [0]), ("rust", [0, 10])])
def test_perfect_translator_passes(problems, sandbox, lang, numbers):
    if shutil.which(TOOL[lang]) is None:
        pytest.skip(f"{TOOL[lang]} not installed")
    for n in numbers:
        p = problems[lang][n]
        if not hx.runnable(p):
            continue
        outcome = hx.check(sandbox, p, p.source)
        assert outcome.passed, (p.task, outcome)


def test_known_defects_are_not_judged(problems):
    assert not hx.runnable(problems["python"][142])
    assert hx.unrunnable_reason(problems["cpp"][38])
    assert all(hx.runnable(problems["java"][n]) for n in range(10))


@pytest.mark.parametrize("lang,broken,stage", [
    ("python", "from typing import List\n\ndef has_close_elements(numbers, threshold):\n"
               "    return False\n", "run"),
    ("javascript", "const hasCloseElements = (numbers, threshold) => false\n", "run"),
    ("cpp", "bool has_close_elements(vector<float> numbers, float threshold) {\n"
            "    return false\n}\n", "compile"),
    ("python", "def something_else():\n    pass\n", "run")])
def test_wrong_translations_fail(problems, sandbox, lang, broken, stage):
    if shutil.which(TOOL[lang]) is None:
        pytest.skip(f"{TOOL[lang]} not installed")
    outcome = hx.check(sandbox, problems[lang][0], broken)
    assert not outcome.passed and outcome.stage == stage


def test_java_method_without_its_class_is_wrapped(problems, sandbox):
    if shutil.which("javac") is None:
        pytest.skip("javac not installed")
    p = problems["java"][0]
    body = p.declaration.split("class Solution {", 1)[1] + p.solution
    body = body.rstrip().removesuffix("}")  # the method alone, without the class
    assert hx.check(sandbox, p, "import java.util.*;\n" + body).passed


def test_sandbox_limits(problems, sandbox):
    p = problems["python"][0]
    loop = "def has_close_elements(numbers, threshold):\n    while True:\n        pass\n"
    assert hx.check(sandbox, p, loop).stage == "timeout"
    hog = ("def has_close_elements(numbers, threshold):\n"
           "    x = bytearray(8 << 30)\n    return True\n")
    assert hx.check(sandbox, p, hog).stage == "run"  # MemoryError, not 8 GiB
    if sandbox.network_isolated:  # a fresh network namespace: loopback only, and down
        only_lo = ("import socket\nassert [n for _, n in socket.if_nameindex()] == ['lo']\n"
                   + p.declaration + p.solution)
        assert hx.check(sandbox, p, only_lo).passed
