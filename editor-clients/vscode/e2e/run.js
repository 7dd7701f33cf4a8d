// Drives a real VS Code (code-server in headless Chromium) with the codevista extension:
// type in a Python file, see the ghost text, accept it with Tab, translate to C#, and
// (LOCATE set) box an object in scene.png with the image command's Locate task.
// Env: CS_URL (code-server), WORKSPACE (folder), SHOTS (screenshot folder),
// PLAYWRIGHT_CORE (module path), CHROMIUM (browser binary). Prints one JSON line.
const path = require("path");
const { chromium } = require(process.env.PLAYWRIGHT_CORE || "playwright-core");

const shots = process.env.SHOTS;
const result = { steps: [] };

async function shot(page, name) {
  await page.screenshot({ path: path.join(shots, `${name}.png`) });
  result.steps.push(name);
}

// The document's text as the editor shows it, without ghost text: an inline suggestion is
// drawn inside the same line elements, so reading them as they are would count it as text.
async function editorText(page) {
  const text = await page.locator(".monaco-editor .view-lines").first().evaluate((el) => {
    const copy = el.cloneNode(true);
    copy.querySelectorAll("[class*='ghost-text']").forEach((g) => g.remove());
    document.body.appendChild(copy); // innerText needs a rendered node
    const t = copy.innerText;
    copy.remove();
    return t;
  });
  return text.replace(/\u00a0/g, " ");
}

(async () => {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
  try {
    await page.goto(`${process.env.CS_URL}/?folder=${encodeURIComponent(process.env.WORKSPACE)}`);
    await page.waitForSelector(".monaco-workbench", { timeout: 90000 });
    await page.waitForTimeout(3000);
    for (let attempt = 0; ; attempt++) { // quick open can miss keys while the UI settles
      await page.keyboard.press("Control+P");
      await page.waitForTimeout(500);
      await page.keyboard.type("main.py");
      await page.waitForTimeout(800);
      await page.keyboard.press("Enter");
      try {
        await page.waitForSelector(".tab:has-text('main.py')", { timeout: 10000 });
        break;
      } catch (e) {
        if (attempt >= 3) throw e;
        await page.keyboard.press("Escape");
      }
    }
    await page.waitForSelector(".monaco-editor .view-lines", { timeout: 30000 });
    // the status bar item says the model is ready
    await page.waitForSelector(".statusbar-item:has-text('codevista: codevista-default')",
      { timeout: 90000 });
    await shot(page, "1-ready");
    await page.locator(".monaco-editor .view-lines").first().click();
    await page.keyboard.press("Control+End");
    await page.keyboard.type("\ndef area(width, height):\n", { delay: 60 });
    const ghost = page.locator(".monaco-editor [class*='ghost-text']").first();
    await ghost.waitFor({ timeout: 30000 });
    await page.waitForTimeout(1500); // let the stream finish
    result.ghost = (await page.locator(".monaco-editor [class*='ghost-text']").allInnerTexts())
      .join("\n").replace(/\u00a0/g, " ");
    await shot(page, "2-ghost-text");
    const before = await editorText(page);
    await page.keyboard.press("Tab");
    await page.waitForTimeout(800);
    const after = await editorText(page);
    result.accepted = after !== before;
    result.after = after;
    await shot(page, "3-accepted");
    await page.keyboard.press("F1");
    await page.keyboard.type("codevista: Translate selection to");
    await page.waitForTimeout(800);
    await page.keyboard.press("Enter");
    await page.waitForTimeout(800);
    await page.keyboard.type("C#");
    await page.waitForTimeout(500);
    await page.keyboard.press("Enter");
    await page.waitForSelector(".tab:has-text('Untitled')", { timeout: 30000 });
    await page.waitForTimeout(5000);
    const editors = page.locator(".monaco-editor .view-lines");
    result.translation = (await editors.last().innerText()).replace(/\u00a0/g, " ");
    await shot(page, "4-translation");
    if (process.env.LOCATE) { // an image: the file picker, the task picker, what to find
      await page.keyboard.press("Escape");
      await page.keyboard.press("F1");
      await page.keyboard.type("codevista: Explain image…");
      await page.waitForTimeout(800);
      await page.keyboard.press("Enter");
      await page.waitForTimeout(1500);
      await page.keyboard.press("Control+A"); // the simple file dialog's path field
      await page.keyboard.type(path.join(process.env.WORKSPACE, "scene.png"));
      for (let attempt = 0; ; attempt++) { // the dialog checks the path before it accepts
        await page.waitForTimeout(1500);
        await page.keyboard.press("Enter");
        try {
          await page.waitForSelector(".quick-input-widget :text('Describe the diagram')",
            { timeout: 5000 });
          break;
        } catch (e) {
          if (attempt >= 3) throw e;
        }
      }
      await page.keyboard.type("Locate");
      await page.waitForTimeout(500);
      await page.keyboard.press("Enter");
      await page.waitForTimeout(800);
      await page.keyboard.type(process.env.LOCATE);
      await page.keyboard.press("Enter");
      // the panel is a webview: a frame inside a frame; wait for its answer and boxes
      for (let i = 0; i < 240 && result.located === undefined; i++) {
        await page.waitForTimeout(500);
        for (const f of page.frames()) {
          const got = await f.evaluate(() => {
            const out = document.getElementById("out");
            const boxes = document.getElementById("boxes");
            return out && boxes && document.body.dataset.done // the final answer
              ? { text: out.textContent, boxes: boxes.children.length } : null;
          }).catch(() => null);
          if (got) { result.located = got; break; }
        }
      }
      await shot(page, "5-locate");
    }
    result.ok = true;
  } catch (e) {
    result.ok = false;
    result.error = String(e && e.stack || e);
    try { await shot(page, "error"); } catch (_) { /* the page is gone */ }
  } finally {
    await browser.close();
    console.log(JSON.stringify(result));
  }
})();
