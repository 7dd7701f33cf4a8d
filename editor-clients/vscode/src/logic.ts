// The extension's logic that does not need VS Code: settings mapping, streamed ghost-text
// bookkeeping, languages, clipboard parsing. Unit-tested with node:test (src/test).

export interface Settings {
  serverCommand: string[];
  pythonPath: string;
  modelPath: string | null;
  backendUrl: string | null;
  maxTokens: number;
  temperature: number;
  languages: Record<string, boolean>;
  visionModelPath: string | null;
  allowedImageRoots: string[];
}

/** How to start the server: the explicit command, else `<python> -m codevista.server.cli serve`. */
export function serverCommand(s: Pick<Settings, "serverCommand" | "pythonPath">): {
  command: string;
  args: string[];
} {
  if (s.serverCommand.length > 0) {
    return { command: s.serverCommand[0], args: s.serverCommand.slice(1) };
  }
  return { command: s.pythonPath || "python3", args: ["-m", "codevista.server.cli", "serve"] };
}

/** The server's settings object (initializationOptions / didChangeConfiguration). */
export function serverSettings(s: Settings): Record<string, unknown> {
  const out: Record<string, unknown> = {
    maxTokens: s.maxTokens,
    temperature: s.temperature,
    languages: s.languages,
    allowedImageRoots: s.allowedImageRoots,
  };
  if (s.modelPath) out.modelPath = s.modelPath;
  if (s.visionModelPath) out.visionModelPath = s.visionModelPath;
  return out;
}

/** Settings whose change needs a new server process (the rest are sent to the running one). */
export const RESTART_KEYS = ["serverCommand", "pythonPath"];

export const LANGUAGES: { id: string; label: string; vscodeId: string }[] = [
  { id: "python", label: "Python", vscodeId: "python" },
  { id: "java", label: "Java", vscodeId: "java" },
  { id: "csharp", label: "C#", vscodeId: "csharp" },
  { id: "c", label: "C", vscodeId: "c" },
  { id: "cpp", label: "C++", vscodeId: "cpp" },
  { id: "javascript", label: "JavaScript", vscodeId: "javascript" },
  { id: "typescript", label: "TypeScript", vscodeId: "typescript" },
  { id: "go", label: "Go", vscodeId: "go" },
  { id: "rust", label: "Rust", vscodeId: "rust" },
];

/** One streamed suggestion: the newest text for a (document version, position) key. */
export interface Stream {
  key: string;
  text: string | null; // null until the first partial arrives
  done: boolean;
  shown: string | null; // what the editor last displayed
}

/**
 * Streams of ghost text, one live at a time: a new key (the user typed or moved) replaces
 * the old stream, whose late partials are then ignored.
 */
export class GhostStreams {
  current: Stream | null = null;

  static key(uri: string, version: number, line: number, character: number): string {
    return `${uri}@${version}:${line}:${character}`;
  }

  start(key: string): Stream {
    this.current = { key, text: null, done: false, shown: null };
    return this.current;
  }

  get(key: string): Stream | null {
    return this.current && this.current.key === key ? this.current : null;
  }

  /** Returns true when the editor should re-render (the text changed). */
  update(key: string, text: string): boolean {
    const s = this.get(key);
    if (!s || s.done) return false;
    s.text = text;
    return s.text !== s.shown;
  }

  finish(key: string, text: string | null): boolean {
    const s = this.get(key);
    if (!s) return false;
    s.done = true;
    s.text = text;
    return s.text !== s.shown;
  }
}

/** An image spec from clipboard text: a data URL, raw base64 of an image, or a file path. */
export function imageFromClipboard(text: string): { data: string } | { path: string } | null {
  const t = text.trim();
  if (!t) return null;
  const m = /^data:image\/[\w.+-]+;base64,([A-Za-z0-9+/=\s]+)$/.exec(t);
  if (m) return { data: m[1].replace(/\s+/g, "") };
  if (/^(iVBORw0KGgo|\/9j\/|R0lGOD|UklGR|Qk)[A-Za-z0-9+/=\s]+$/.test(t)) {
    return { data: t.replace(/\s+/g, "") };
  }
  if (/\.(png|jpe?g|webp|bmp|gif)$/i.test(t) && !t.includes("\n")) {
    return { path: t.replace(/^file:\/\//, "") };
  }
  return null;
}

/** Escape text for an HTML page. */
export function escapeHtml(text: string): string {
  return text
    .replace(/&/g, "&amp;")
    .replace(/</g, "&lt;")
    .replace(/>/g, "&gt;")
    .replace(/"/g, "&quot;");
}

/** A function that runs `fn` at most once per `ms`, always ending with the last call. */
export function throttle(fn: () => void, ms: number): () => void {
  let last = 0;
  let timer: ReturnType<typeof setTimeout> | null = null;
  return () => {
    const now = Date.now();
    if (now - last >= ms) {
      last = now;
      fn();
    } else if (!timer) {
      timer = setTimeout(() => {
        timer = null;
        last = Date.now();
        fn();
      }, ms - (now - last));
    }
  };
}

// -- image tasks ------------------------------------------------------------------------------

export type ImageTask = "explain" | "describe-diagram" | "transcribe" | "locate";

/** The tasks of `codevista.explainImage` as the image commands offer them; `asks`: whether
 * the task takes the user's words (a question; for locate, what to find). */
export const IMAGE_TASKS: { task: ImageTask; label: string; detail: string;
  asks: "optional" | "required" | "none"; prompt: string }[] = [
  { task: "explain", label: "Explain", detail: "what the image shows, or your question about it",
    asks: "optional", prompt: "Your question about the image (empty: explain it)" },
  { task: "describe-diagram", label: "Describe the diagram",
    detail: "its boxes and arrows: Nodes: … Edges: a -> b", asks: "none", prompt: "" },
  { task: "transcribe", label: "Transcribe the text", detail: "the text or code in the image (OCR)",
    asks: "none", prompt: "" },
  { task: "locate", label: "Locate…", detail: "box an object you name",
    asks: "required", prompt: "What to find (e.g. the red button)" },
];

/** What `codevista.explainImage` is asked besides the image. */
export type ImageRequest = { task: ImageTask; question?: string };

/** The command's task and question, or an error message (locate needs what to find). */
export function imageRequest(task: ImageTask, words?: string): ImageRequest | { error: string } {
  const spec = IMAGE_TASKS.find((t) => t.task === task);
  if (!spec) return { error: `unknown image task ${task}` };
  const q = (words ?? "").trim();
  if (spec.asks === "required" && !q) return { error: "say what to find in the image" };
  return spec.asks !== "none" && q ? { task, question: q } : { task };
}

/** A box's CSS position over the shown image, in percent of its size: boxes are
 * [x1, y1, x2, y2] in 0-1000 from the top left; malformed or empty ones are dropped. */
export function boxStyles(boxes: unknown): { left: number; top: number; width: number;
  height: number }[] {
  if (!Array.isArray(boxes)) return [];
  const out = [];
  for (const b of boxes) {
    if (!Array.isArray(b) || b.length !== 4 || !b.every((v) => typeof v === "number" && isFinite(v))) continue;
    const [x1, y1, x2, y2] = b.map((v: number) => Math.min(1000, Math.max(0, v)) / 10);
    if (x2 <= x1 || y2 <= y1) continue;
    out.push({ left: x1, top: y1, width: x2 - x1, height: y2 - y1 });
  }
  return out;
}
