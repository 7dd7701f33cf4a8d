import { strict as assert } from "assert";
import { test } from "node:test";
import {
  GhostStreams,
  IMAGE_TASKS,
  ImageTask,
  LANGUAGES,
  boxStyles,
  escapeHtml,
  imageFromClipboard,
  imageRequest,
  serverCommand,
  serverSettings,
  throttle,
} from "../logic";

const base = {
  serverCommand: [], pythonPath: "/venv/bin/python", modelPath: null, backendUrl: null,
  maxTokens: 48, temperature: 0, languages: { markdown: false }, visionModelPath: null,
  allowedImageRoots: [],
};

test("the server starts with the configured python unless a command is given", () => {
  assert.deepEqual(serverCommand(base),
    { command: "/venv/bin/python", args: ["-m", "codevista.server.cli", "serve"] });
  assert.deepEqual(serverCommand({ ...base, serverCommand: ["codevista", "serve", "--tcp", "9"] }),
    { command: "codevista", args: ["serve", "--tcp", "9"] });
});

test("settings map to the server's keys; unset paths are left out", () => {
  assert.deepEqual(serverSettings(base),
    { maxTokens: 48, temperature: 0, languages: { markdown: false }, allowedImageRoots: [] });
  const s = serverSettings({ ...base, modelPath: "/m", visionModelPath: "/v" });
  assert.equal(s.modelPath, "/m");
  assert.equal(s.visionModelPath, "/v");
});

test("ghost streams: partials update the live stream; old keys are ignored", () => {
  const g = new GhostStreams();
  const k1 = GhostStreams.key("file:///a.py", 3, 1, 4);
  g.start(k1);
  assert.equal(g.update(k1, "ret"), true);
  g.get(k1)!.shown = "ret";
  assert.equal(g.update(k1, "ret"), false); // nothing new to draw
  assert.equal(g.update(k1, "return x"), true);
  const k2 = GhostStreams.key("file:///a.py", 4, 1, 5);
  g.start(k2); // the user typed: the first stream is dead
  assert.equal(g.update(k1, "return xy"), false);
  assert.equal(g.get(k1), null);
  assert.equal(g.finish(k2, "eturn"), true);
  assert.equal(g.update(k2, "late partial"), false); // after the final, partials are stale
  assert.equal(g.get(k2)!.text, "eturn");
});

test("translation languages are the server's nine", () => {
  assert.deepEqual(LANGUAGES.map((l) => l.id),
    ["python", "java", "csharp", "c", "cpp", "javascript", "typescript", "go", "rust"]);
});

test("clipboard text becomes an image spec or nothing", () => {
  assert.deepEqual(imageFromClipboard("data:image/png;base64,iVBORw0KGgo=\n"),
    { data: "iVBORw0KGgo=" });
  assert.deepEqual(imageFromClipboard("iVBORw0KGgoAAAANSUhEUgAAAAEAAAAB"),
    { data: "iVBORw0KGgoAAAANSUhEUgAAAAEAAAAB" });
  assert.deepEqual(imageFromClipboard("/home/u/shot.PNG"), { path: "/home/u/shot.PNG" });
  assert.deepEqual(imageFromClipboard("file:///tmp/a.jpg"), { path: "/tmp/a.jpg" });
  assert.equal(imageFromClipboard("def f(): pass"), null);
  assert.equal(imageFromClipboard(""), null);
});

test("html escaping", () => {
  assert.equal(escapeHtml(`<img src="x" onerror=1>&`), "&lt;img src=&quot;x&quot; onerror=1&gt;&amp;");
});

test("throttle runs at once, then once more with the last call", async () => {
  let n = 0;
  const t = throttle(() => { n += 1; }, 30);
  t(); t(); t();
  assert.equal(n, 1);
  await new Promise((r) => setTimeout(r, 60));
  assert.equal(n, 2);
});

test("image tasks: locate needs what to find; the words go only where a task takes them", () => {
  assert.deepEqual(imageRequest("explain"), { task: "explain" });
  assert.deepEqual(imageRequest("explain", "  why red? "), { task: "explain", question: "why red?" });
  assert.deepEqual(imageRequest("describe-diagram", "ignored"), { task: "describe-diagram" });
  assert.deepEqual(imageRequest("locate", "the red circle"), { task: "locate", question: "the red circle" });
  assert.ok("error" in imageRequest("locate", "  "));
  assert.ok("error" in imageRequest("paint" as ImageTask));
  assert.deepEqual(IMAGE_TASKS.map((t) => t.task), ["explain", "describe-diagram", "transcribe", "locate"]);
});

test("boxes (0-1000) become percent positions over the image; bad ones are dropped", () => {
  assert.deepEqual(boxStyles([[100, 200, 400, 700]]), [{ left: 10, top: 20, width: 30, height: 50 }]);
  assert.deepEqual(boxStyles([[-50, 0, 1200, 1000]]), [{ left: 0, top: 0, width: 100, height: 100 }]);
  assert.deepEqual(boxStyles([[500, 500, 400, 600], [1, 2, 3], ["a", 0, 1, 1], null]), []);
  assert.deepEqual(boxStyles("nope"), []);
});
