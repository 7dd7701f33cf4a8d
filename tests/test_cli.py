"""`codevista generate`: only the generated text on stdout, deterministic when greedy."""

from __future__ import annotations

import subprocess
import sys

from codevista.models.engine import Engine, SamplingParams


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "codevista.server.cli", *args],
                          capture_output=True, text=True, timeout=120)


def test_greedy_generation_is_deterministic_and_matches_the_engine(qwen_dir, loaded_qwen):
    args = ("generate", "--model", str(qwen_dir), "--prompt", "def add(a, b):",
            "--max-tokens", "24", "--temperature", "0")
    first, second = _cli(*args), _cli(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    with Engine(loaded_qwen) as engine:
        expected = engine.generate("def add(a, b):", SamplingParams(max_new_tokens=24)).text
    assert first.stdout == expected + "\n"


def test_stats_go_to_stderr(qwen_dir):
    proc = _cli("generate", "--model", str(qwen_dir), "--prompt", "x", "--max-tokens", "4",
                "--temperature", "0.7", "--seed", "3", "--stats")
    assert proc.returncode == 0
    assert "prompt_tokens=" in proc.stderr and "prompt_tokens=" not in proc.stdout


def test_bad_arguments_exit_nonzero():
    assert _cli("generate", "--model", "/nonexistent", "--prompt", "x").returncode != 0
    assert _cli("generate").returncode != 0


JAVA = ("public class Box {\n    private int v;\n\n    public int get() {\n        return v;\n"
        "    }\n\n    public void set(int x) {\n        v = x;\n    }\n}\n")


def test_translate_streams_the_services_text_to_stdout(tmp_path):
    import asyncio

    from codevista.server.backend import LocalBackend
    from codevista.server.features.translate import TranslationService
    from codevista.server.translation import LANGUAGES

    src = tmp_path / "Box.java"
    src.write_text(JAVA)
    proc = _cli("translate", str(src), "--to", "C#", "--stats")
    assert proc.returncode == 0, proc.stderr
    assert "pieces=4" in proc.stderr and "pieces=" not in proc.stdout

    async def expected() -> str:
        backend = LocalBackend()
        await backend.load(None, "float32", lambda m: None)
        try:
            r = await TranslationService(backend).translate(JAVA, LANGUAGES["java"],
                                                            LANGUAGES["csharp"])
            return r.text
        finally:
            backend.close()

    assert proc.stdout == asyncio.run(expected())
    piped = subprocess.run([sys.executable, "-m", "codevista.server.cli", "translate", "-",
                            "--from", "java", "--to", "cs"], input=JAVA, capture_output=True,
                           text=True, timeout=120)
    assert piped.returncode == 0 and piped.stdout == proc.stdout


def test_translate_errors_are_one_line_and_exit_2(tmp_path):
    src = tmp_path / "a.py"
    src.write_text("x = 1\n")
    for args, needle in [((str(src), "--to", "cobol"), "unsupported target language"),
                         ((str(tmp_path / "a.kt"), "--to", "go"), "pass --from"),
                         ((str(tmp_path / "missing.py"), "--to", "go"), "cannot read"),
                         ((str(src), "--to", "go", "--model", "/nonexistent"), "error")]:
        proc = _cli("translate", *args)
        assert proc.returncode == 2 and needle in proc.stderr, (args, proc.stderr)
        assert proc.stdout == ""


def test_explain_image_on_a_generated_diagram(llava_dirs, tmp_path):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (120, 60), "white")
    d = ImageDraw.Draw(img)
    d.rectangle((5, 20, 45, 40), outline="black")
    d.rectangle((75, 20, 115, 40), outline="black")
    d.line((45, 30, 75, 30), fill="black")
    d.text((10, 24), "parse", fill="black")
    d.text((80, 24), "save", fill="black")
    path = tmp_path / "flow.png"
    img.save(path)
    args = ("explain-image", str(path), "--model", str(llava_dirs["siglip_qwen2"]),
            "--task", "describe-diagram", "--max-tokens", "12", "--stats")
    first, second = _cli(*args), _cli(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.endswith("\n")
    assert "generated=" in first.stderr
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    proc = _cli("explain-image", str(bad), "--model", str(llava_dirs["siglip_qwen2"]))
    assert proc.returncode == 2 and "codevista: error:" in proc.stderr and proc.stdout == ""
