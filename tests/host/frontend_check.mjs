// Loads ComfyUI's real frontend in headless Chromium, opens each bundled UI workflow, and reports what
// the xMGIE web extension did. Usage: node frontend_check.mjs <server url> <workflow.json>...
// Prints one JSON object: {errors: [...], workflows: {name: {types, colours, before, after}}}.
import { chromium } from "playwright-core";
import fs from "fs";
import path from "path";

const [url, ...files] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium", headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
});
const page = await browser.newPage({ viewport: { width: 1600, height: 900 } });
const errors = [];
page.on("pageerror", (e) => errors.push(`pageerror: ${e.stack}`));
page.on("console", (m) => { if (m.type() === "error") errors.push(`console: ${m.text()}`); });
await page.goto(url, { waitUntil: "load" });
await page.waitForFunction(() => window.app?.graph && window.app.extensionManager, null, { timeout: 90000 });
await page.waitForTimeout(2000);
const workflows = {};
for (const file of files) {
  const graph = JSON.parse(fs.readFileSync(file, "utf8"));
  workflows[path.basename(file, ".json")] = await page.evaluate(async (graph) => {
    await window.app.loadGraphData(graph);
    const nodes = window.app.graph._nodes;
    const gb = nodes.find((n) => n.type === "XMGIEGBCompositor");
    const before = gb?.title;
    gb?.disconnectInput(gb.inputs.findIndex((i) => i.name === "source"));
    const cam = nodes.find((n) => n.type === "XMGIECrossAttentionMask");
    const camBefore = cam?.title;
    cam?.disconnectOutput(cam.outputs.findIndex((o) => o.name === "positive"));
    const region = nodes.find((n) => n.type === "XMGIERegionPredictor");
    const regionBefore = region?.title;
    region?.onExecuted?.({ xmgie_warning: ["The predicted region is empty for image(s) [0]"] });
    const regionWarned = region ? { title: region.title, warning: region.xmgieWarning, bg: region.bgcolor } : null;
    region?.onExecuted?.({ xmgie_warning: [] });
    await new Promise((resolve) => setTimeout(resolve, 50));
    return { regionBefore: regionBefore ?? null, regionWarned, regionCleared: region?.title ?? null, types: nodes.map((n) => n.type), colours: nodes.filter((n) => n.type.startsWith("XMGIE")).map((n) => n.color),
             before, after: gb?.title, camBefore: camBefore ?? null, camAfter: cam?.title ?? null };
  }, graph);
}
console.log(JSON.stringify({ errors, workflows }));
await browser.close();
