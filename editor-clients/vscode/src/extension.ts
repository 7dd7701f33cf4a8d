// codevista for VS Code: a thin client of `codevista serve`. The server owns prompts and
// models; this file owns the experience: ghost text that grows while the model writes,
// translation into an editor beside the source, image explanations in a panel.

import { randomUUID } from "crypto";
import * as vscode from "vscode";
import {
  LanguageClient,
  LanguageClientOptions,
  ProgressType,
  ServerOptions,
  State,
  StaticFeature,
} from "vscode-languageclient/node";
import {
  GhostStreams,
  IMAGE_TASKS,
  ImageRequest,
  LANGUAGES,
  RESTART_KEYS,
  Settings,
  boxStyles,
  escapeHtml,
  imageFromClipboard,
  imageRequest,
  serverCommand,
  serverSettings,
  throttle,
} from "./logic";

let client: LanguageClient | undefined;
let output: vscode.OutputChannel;
let statusItem: vscode.StatusBarItem;
let lastStatus = { state: "stopped", model: "", message: "" };
const streams = new GhostStreams();
const anyProgress = new ProgressType<any>();

function settings(): Settings {
  const c = vscode.workspace.getConfiguration("codevista");
  return {
    serverCommand: c.get<string[]>("serverCommand", []),
    pythonPath: c.get<string>("pythonPath", "python3"),
    modelPath: c.get<string | null>("modelPath", null),
    backendUrl: c.get<string | null>("backendUrl", null),
    maxTokens: c.get<number>("maxTokens", 64),
    temperature: c.get<number>("temperature", 0),
    languages: c.get<Record<string, boolean>>("languages", {}),
    visionModelPath: c.get<string | null>("visionModelPath", null),
    allowedImageRoots: c.get<string[]>("allowedImageRoots", []),
  };
}

function showStatus(state: string, model = "", message = ""): void {
  lastStatus = { state, model, message };
  const icon = { loading: "$(sync~spin)", ready: "$(check)", busy: "$(loading~spin)",
    error: "$(error)", stopped: "$(circle-slash)" }[state] ?? "$(question)";
  statusItem.text = `${icon} codevista${model ? `: ${model}` : ""}`;
  statusItem.tooltip = message || state;
  statusItem.backgroundColor = state === "error"
    ? new vscode.ThemeColor("statusBarItem.errorBackground") : undefined;
  statusItem.show();
}

/** Advertises the streaming extension in the client capabilities. */
class StreamingCapability implements StaticFeature {
  fillClientCapabilities(caps: any): void {
    caps.experimental = { ...(caps.experimental ?? {}), codevista: { streaming: true } };
  }
  initialize(): void {}
  getState(): any { return { kind: "static" }; }
  clear(): void {}
}

async function startClient(): Promise<void> {
  const s = settings();
  const { command, args } = serverCommand(s);
  const serverOptions: ServerOptions = { command, args };
  const clientOptions: LanguageClientOptions = {
    documentSelector: [{ scheme: "file" }, { scheme: "untitled" }],
    outputChannel: output,
    initializationOptions: serverSettings(s),
  };
  client = new LanguageClient("codevista", "codevista", serverOptions, clientOptions);
  client.registerFeature(new StreamingCapability());
  client.onDidChangeState((e) => {
    if (e.newState === State.Stopped) showStatus("stopped", "", "the server stopped");
  });
  showStatus("loading", "", "starting the server");
  await client.start();
  client.onNotification("codevista/status", (p: any) =>
    showStatus(p.state, p.model, p.message));
}

async function restart(): Promise<void> {
  if (client) {
    try { await client.stop(); } catch (e) { output.appendLine(`stop failed: ${e}`); }
    client = undefined;
  }
  await startClient();
}

// -- ghost text ---------------------------------------------------------------------------

const retrigger = throttle(() => {
  void vscode.commands.executeCommand("editor.action.inlineSuggest.trigger");
}, 40);

function items(text: string | null, position: vscode.Position): vscode.InlineCompletionItem[] {
  if (!text) return [];
  const item = new vscode.InlineCompletionItem(text, new vscode.Range(position, position));
  item.command = { command: "codevista.didAccept", title: "accepted",
    arguments: [text.length] };
  return [item];
}

const provider: vscode.InlineCompletionItemProvider = {
  async provideInlineCompletionItems(document, position) {
    if (!client || client.state !== State.Running) return [];
    const key = GhostStreams.key(document.uri.toString(), document.version, position.line,
      position.character);
    const live = streams.get(key);
    if (live) { // re-render of a stream in progress: show its newest text
      live.shown = live.text;
      return items(live.text, position);
    }
    const stream = streams.start(key);
    const token = randomUUID();
    const c = client;
    const first = new Promise<void>((resolve) => {
      const sub = c.onProgress(anyProgress, token, (value: any) => {
        const text = value?.items?.[0]?.insertText;
        if (typeof text === "string" && streams.update(key, text)) retrigger();
        resolve();
      });
      c.sendRequest("textDocument/inlineCompletion", {
        textDocument: { uri: document.uri.toString() },
        position: { line: position.line, character: position.character },
        context: { triggerKind: 2 },
        partialResultToken: token,
      }).then((result: any) => {
        const list = Array.isArray(result) ? result : result?.items ?? [];
        const text = list[0]?.insertText;
        if (streams.finish(key, typeof text === "string" ? text : null)) retrigger();
      }, (err) => output.appendLine(`inline completion failed: ${err?.message ?? err}`))
        .finally(() => { sub.dispose(); resolve(); });
    });
    await Promise.race([first, new Promise((r) => setTimeout(r, 1500))]);
    stream.shown = stream.text;
    return items(stream.text, position);
  },
};

// -- translation ----------------------------------------------------------------------------

async function translate(): Promise<void> {
  const editor = vscode.window.activeTextEditor;
  if (!editor || !client) {
    void vscode.window.showWarningMessage("codevista: open a file to translate first");
    return;
  }
  const pick = await vscode.window.showQuickPick(
    LANGUAGES.map((l) => ({ label: l.label, description: l.id, lang: l })),
    { placeHolder: "Translate to…" });
  if (!pick) return;
  const sel = editor.selection;
  const args: any = { uri: editor.document.uri.toString(), targetLanguage: pick.lang.id };
  if (!sel.isEmpty) {
    args.range = { start: { line: sel.start.line, character: sel.start.character },
      end: { line: sel.end.line, character: sel.end.character } };
  }
  const doc = await vscode.workspace.openTextDocument({ language: pick.lang.vscodeId, content: "" });
  const target = await vscode.window.showTextDocument(doc, vscode.ViewColumn.Beside, true);
  let pending = Promise.resolve();
  const replace = (text: string) => {
    pending = pending.then(async () => {
      const all = new vscode.Range(0, 0, target.document.lineCount, 0);
      await target.edit((e) => e.replace(all, text), { undoStopBefore: false, undoStopAfter: false });
    });
  };
  const token = randomUUID();
  args.partialResultToken = token;
  const sub = client.onProgress(anyProgress, token, (v: any) => {
    if (typeof v?.text === "string") replace(v.text);
  });
  showStatus("busy", lastStatus.model, `translating to ${pick.lang.label}`);
  try {
    const result: any = await client.sendRequest("workspace/executeCommand",
      { command: "codevista.translate", arguments: [args] });
    replace(result.text);
    await pending;
  } catch (e: any) {
    void vscode.window.showErrorMessage(`codevista: ${e?.message ?? e}`);
  } finally {
    sub.dispose();
    showStatus(lastStatus.state === "busy" ? "ready" : lastStatus.state, lastStatus.model);
  }
}

// -- images -------------------------------------------------------------------------------

async function explainImage(spec: { path?: string; data?: string }, imageSrc: string,
  label: string, request: ImageRequest = { task: "explain" }
): Promise<void> {
  if (!client) return;
  const title = (IMAGE_TASKS.find((t) => t.task === request.task)?.label ?? "Explain").replace("…", "");
  const panel = vscode.window.createWebviewPanel("codevistaImage", `${title}: ${label}`,
    vscode.ViewColumn.Beside, { enableScripts: true,
      localResourceRoots: spec.path ? [vscode.Uri.file(require("path").dirname(spec.path))] : [] });
  const src = spec.path ? panel.webview.asWebviewUri(vscode.Uri.file(spec.path)).toString() : imageSrc;
  // boxes (locate) are drawn over the image, positioned in percent of its size
  panel.webview.html = `<!DOCTYPE html><html><body>
    <div style="position:relative;display:inline-block">
      <img src="${escapeHtml(src)}" style="max-width:100%;max-height:40vh;display:block"/>
      <div id="boxes"></div></div>
    <pre id="out" style="white-space:pre-wrap">…</pre>
    <script>window.addEventListener('message', e => {
      document.getElementById('out').textContent = e.data.text;
      const layer = document.getElementById('boxes');
      for (const b of e.data.boxes || []) {
        const d = document.createElement('div');
        d.style.cssText = 'position:absolute;border:2px solid #e5484d;box-sizing:border-box;'
          + 'left:' + b.left + '%;top:' + b.top + '%;width:' + b.width + '%;height:' + b.height + '%';
        layer.appendChild(d);
      }
      if (e.data.done) document.body.dataset.done = '1'; });</script></body></html>`;
  await streamExplanation(panel, spec, request);
}

/** Asks for the image's task (and the words it takes); undefined when the user cancels. */
async function pickImageTask(): Promise<ImageRequest | undefined> {
  const picked = await vscode.window.showQuickPick(
    IMAGE_TASKS.map((t) => ({ label: t.label, detail: t.detail, task: t })),
    { placeHolder: "What should codevista do with the image?" });
  if (!picked) return undefined;
  let words: string | undefined;
  if (picked.task.asks !== "none") {
    words = await vscode.window.showInputBox({ prompt: picked.task.prompt });
    if (words === undefined) return undefined;
  }
  const request = imageRequest(picked.task.task, words);
  if ("error" in request) {
    void vscode.window.showWarningMessage(`codevista: ${request.error}`);
    return undefined;
  }
  return request;
}

/** Explains the image, streaming the text so far into the panel as `{text}` messages. */
async function streamExplanation(panel: vscode.WebviewPanel, spec: object,
  request: ImageRequest = { task: "explain" }): Promise<void> {
  if (!client) return;
  const token = randomUUID();
  const sub = client.onProgress(anyProgress, token, (v: any) => {
    if (typeof v?.text === "string") void panel.webview.postMessage({ text: v.text });
  });
  try {
    const result: any = await client.sendRequest("workspace/executeCommand",
      { command: "codevista.explainImage",
        arguments: [{ image: spec, ...request, partialResultToken: token }] });
    void panel.webview.postMessage({ text: result.text, boxes: boxStyles(result.boxes), done: true });
  } catch (e: any) {
    void panel.webview.postMessage({ text: `codevista: ${e?.message ?? e}`, done: true });
  } finally {
    sub.dispose();
  }
}

async function explainImageCommand(uri?: vscode.Uri): Promise<void> {
  let target = uri;
  if (!target) {
    const picked = await vscode.window.showOpenDialog({ canSelectMany: false,
      filters: { Images: ["png", "jpg", "jpeg", "webp", "bmp", "gif"] } });
    target = picked?.[0];
  }
  if (!target) return;
  const request = await pickImageTask();
  if (!request) return;
  await explainImage({ path: target.fsPath }, "", require("path").basename(target.fsPath), request);
}

async function explainClipboard(): Promise<void> {
  const spec = imageFromClipboard(await vscode.env.clipboard.readText());
  if (!spec) {
    void vscode.window.showWarningMessage(
      "codevista: the clipboard holds no image (a data: URL, base64 image or image path)");
    return;
  }
  const request = await pickImageTask();
  if (!request) return;
  if ("data" in spec) await explainImage(spec, `data:image/png;base64,${spec.data}`, "clipboard", request);
  else await explainImage(spec, "", spec.path, request);
}

// -- a screenshot of an error: transcription (OCR) first, then the explanation streamed ------

let lastTranscription: { text: string; language?: string; editor?: vscode.TextEditor } | undefined;

/** An image on the system clipboard as base64 PNG, through the platform's clipboard tool. */
function clipboardImageBytes(): Promise<string | undefined> {
  const { execFile } = require("child_process");
  const tools: [string, string[]][] = process.platform === "darwin"
    ? [["pngpaste", ["-"]]]
    : process.platform === "win32"
      ? [["powershell", ["-NoProfile", "-Command", "Add-Type -AssemblyName System.Windows.Forms;" +
        "$i=[Windows.Forms.Clipboard]::GetImage();if($i){$m=New-Object IO.MemoryStream;" +
        "$i.Save($m,[Drawing.Imaging.ImageFormat]::Png);[Convert]::ToBase64String($m.ToArray())}"]]]
      : [["wl-paste", ["--no-newline", "--type", "image/png"]],
        ["xclip", ["-selection", "clipboard", "-target", "image/png", "-out"]]];
  const attempt = (i: number): Promise<string | undefined> => i >= tools.length
    ? Promise.resolve(undefined)
    : new Promise((resolve) => {
      const [cmd, args] = tools[i];
      execFile(cmd, args, { encoding: "buffer", maxBuffer: 32 << 20, timeout: 5000 },
        (err: any, stdout: Buffer) => {
          if (err || !stdout || stdout.length < 8) return resolve(attempt(i + 1));
          resolve(process.platform === "win32" ? stdout.toString().trim()
            : stdout.toString("base64"));
        });
    });
  return attempt(0);
}

async function screenshotSource(uri?: vscode.Uri):
  Promise<{ spec: { path?: string; data?: string }; src: string; label: string } | undefined> {
  if (uri) return { spec: { path: uri.fsPath }, src: "", label: require("path").basename(uri.fsPath) };
  const pick = await vscode.window.showQuickPick(
    [{ label: "$(clippy) Paste from the clipboard", id: "clip" },
      { label: "$(file-media) Pick an image file…", id: "file" }],
    { title: "codevista: Explain a screenshot of an error" });
  if (!pick) return undefined;
  if (pick.id === "file") {
    const picked = await vscode.window.showOpenDialog({ canSelectMany: false,
      filters: { Images: ["png", "jpg", "jpeg", "webp", "bmp", "gif"] } });
    if (!picked?.[0]) return undefined;
    return { spec: { path: picked[0].fsPath }, src: "", label: require("path").basename(picked[0].fsPath) };
  }
  const fromText = imageFromClipboard(await vscode.env.clipboard.readText());
  if (fromText && "data" in fromText) {
    return { spec: fromText, src: `data:image/png;base64,${fromText.data}`, label: "clipboard" };
  }
  if (fromText) return { spec: fromText, src: "", label: fromText.path };
  const data = await clipboardImageBytes();
  if (data) return { spec: { data }, src: `data:image/png;base64,${data}`, label: "clipboard" };
  void vscode.window.showWarningMessage("codevista: the clipboard holds no image");
  return undefined;
}

async function insertTranscription(): Promise<void> {
  const t = lastTranscription;
  if (!t?.text) {
    void vscode.window.showWarningMessage("codevista: no transcription yet");
    return;
  }
  const editor = t.editor && !t.editor.document.isClosed ? t.editor : vscode.window.activeTextEditor;
  if (!editor) {
    void vscode.window.showWarningMessage("codevista: no editor to insert into");
    return;
  }
  await editor.edit((b) => b.insert(editor.selection.active, t.text));
}

async function explainScreenshot(uri?: vscode.Uri): Promise<void> {
  if (!client) return;
  const editor = vscode.window.activeTextEditor;
  const source = await screenshotSource(uri);
  if (!source) return;
  const { spec, label } = source;
  const panel = vscode.window.createWebviewPanel("codevistaScreenshot", `Error: ${label}`,
    vscode.ViewColumn.Beside, { enableScripts: true,
      localResourceRoots: spec.path ? [vscode.Uri.file(require("path").dirname(spec.path))] : [] });
  const src = spec.path ? panel.webview.asWebviewUri(vscode.Uri.file(spec.path)).toString() : source.src;
  panel.webview.html = `<!DOCTYPE html><html><body>
    <img src="${escapeHtml(src)}" style="max-width:100%;max-height:30vh"/>
    <h3 id="head">Transcription</h3>
    <pre id="code" style="white-space:pre;overflow-x:auto">reading the image…</pre>
    <button id="insert" disabled>Insert at cursor</button>
    <h3>Explanation</h3>
    <pre id="out" style="white-space:pre-wrap">…</pre>
    <script>const vscode = acquireVsCodeApi();
      document.getElementById('insert').onclick = () => vscode.postMessage({ type: 'insert' });
      window.addEventListener('message', e => {
        const m = e.data;
        if (m.code !== undefined) { document.getElementById('code').textContent = m.code;
          document.getElementById('head').textContent = 'Transcription' + (m.language ? ' (' + m.language + ')' : '');
          document.getElementById('insert').disabled = !m.code; }
        if (m.text !== undefined) document.getElementById('out').textContent = m.text; });
    </script></body></html>`;
  panel.webview.onDidReceiveMessage((m: any) => { if (m?.type === "insert") void insertTranscription(); });
  try {
    const t: any = await client.sendRequest("workspace/executeCommand",
      { command: "codevista.explainImage", arguments: [{ image: spec, task: "transcribe" }] });
    lastTranscription = { text: t.text ?? "", language: t.language ?? undefined, editor };
    void panel.webview.postMessage({ code: t.text ?? "", language: t.language ?? "" });
  } catch (e: any) {
    void panel.webview.postMessage({ code: `codevista: ${e?.message ?? e}`, text: "" });
    return;
  }
  await streamExplanation(panel, spec);
}

async function generateImage(): Promise<void> {
  if (!client) return;
  const prompt = await vscode.window.showInputBox({
    title: "codevista: Generate image",
    prompt: "Describe the picture (it is written to generated-images/ in the workspace)",
    placeHolder: "2 shapes: a red circle top left, a blue square centre",
  });
  if (!prompt?.trim()) return;
  const token = randomUUID();
  await vscode.window.withProgress({ location: vscode.ProgressLocation.Notification,
    title: "codevista: drawing", cancellable: true }, async (progress, cancelled) => {
    let shown = 0;
    const sub = client!.onProgress(anyProgress, token, (v: any) => {
      if (typeof v?.rows !== "number" || typeof v?.totalRows !== "number") return;
      progress.report({ message: `row ${v.rows}/${v.totalRows}`,
        increment: (100 * (v.rows - shown)) / v.totalRows });
      shown = v.rows;
    });
    try {
      const result: any = await client!.sendRequest("workspace/executeCommand",
        { command: "codevista.generateImage", arguments: [{ prompt, partialResultToken: token }] },
        cancelled);
      await vscode.commands.executeCommand("vscode.open", vscode.Uri.parse(result.uri),
        vscode.ViewColumn.Beside);
    } catch (e: any) {
      if (!cancelled.isCancellationRequested) {
        void vscode.window.showErrorMessage(`codevista: ${e?.message ?? e}`);
      }
    } finally {
      sub.dispose();
    }
  });
}

// -- activation ---------------------------------------------------------------------------

export async function activate(context: vscode.ExtensionContext): Promise<void> {
  output = vscode.window.createOutputChannel("codevista");
  statusItem = vscode.window.createStatusBarItem(vscode.StatusBarAlignment.Right, 100);
  statusItem.command = "codevista.showStatus";
  context.subscriptions.push(output, statusItem,
    vscode.languages.registerInlineCompletionItemProvider({ pattern: "**" }, provider),
    vscode.commands.registerCommand("codevista.restartServer", restart),
    // (the server's own commands, codevista.translate and codevista.explainImage, are
    // registered by the language client: the UI commands need other names)
    vscode.commands.registerCommand("codevista.translateSelection", translate),
    vscode.commands.registerCommand("codevista.explainImageFile", explainImageCommand),
    vscode.commands.registerCommand("codevista.explainImageClipboard", explainClipboard),
    vscode.commands.registerCommand("codevista.explainErrorScreenshot", explainScreenshot),
    vscode.commands.registerCommand("codevista.insertTranscription", insertTranscription),
    vscode.commands.registerCommand("codevista.generateImageFromPrompt", generateImage),
    vscode.commands.registerCommand("codevista.showStatus", () => {
      output.show(true);
      void vscode.window.showInformationMessage(
        `codevista: ${lastStatus.state}${lastStatus.model ? ` (${lastStatus.model})` : ""}` +
        `${lastStatus.message ? ` — ${lastStatus.message}` : ""}`);
    }),
    vscode.commands.registerCommand("codevista.didAccept", (length: number) => {
      void client?.sendRequest("workspace/executeCommand",
        { command: "codevista.didAcceptCompletion", arguments: [{ length }] });
    }),
    vscode.workspace.onDidChangeConfiguration(async (e) => {
      if (!e.affectsConfiguration("codevista")) return;
      if (RESTART_KEYS.some((k) => e.affectsConfiguration(`codevista.${k}`))) {
        await restart();
      } else if (client) {
        await client.sendNotification("workspace/didChangeConfiguration",
          { settings: { codevista: serverSettings(settings()) } });
      }
    }));
  try {
    await startClient();
  } catch (e: any) {
    showStatus("error", "", `the server did not start: ${e?.message ?? e}`);
    output.appendLine(`start failed: ${e?.stack ?? e}`);
  }
}

export async function deactivate(): Promise<void> {
  await client?.stop();
}
