// Loads ComfyUI's real frontend in headless Chromium, opens each bundled UI workflow, and reports what
// the xMGIE web extension did. Usage: node frontend_check.mjs <server url> <workflow.json>...
// Prints one JSON object: {errors: [...], workflows: {name: {types, missing, colours, before, after, ...}},
// runs: {name: {...}}}.
//
// Runs (optional): XMGIE_RUNS is a JSON list of {file, widgets: {node type: {widget name: value}}, wait_images:
// [node type], screenshot: path, closeups: {node type: path}, timeout_s}. Each file is loaded, the named widgets are set on the page (as a user
// would), the graph is queued from the frontend (app.queuePrompt, what the Queue button calls), and once ComfyUI
// reports the run finished the report says, per node type, what the node shows: its drawn images (node.imgs), the
// outputs the frontend stored for it (app.nodeOutputs) and its widgets; then the canvas is screenshotted (the whole
// graph, and each node named in closeups at 100 %).
import { chromium } from "playwright-core";
import fs from "fs";
import path from "path";

const [url, ...files] = process.argv.slice(2);
const runs = JSON.parse(process.env.XMGIE_RUNS || "[]");
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

// node types of the loaded graph that the frontend does not know (what its "missing nodes" dialog lists)
const MISSING = () => window.app.graph._nodes.filter((n) => !window.LiteGraph.registered_node_types[n.type])
  .map((n) => n.type);

const workflows = {};
for (const file of files) {
  const graph = JSON.parse(fs.readFileSync(file, "utf8"));
  workflows[path.basename(file, ".json")] = await page.evaluate(async ([graph, missingSrc]) => {
    await window.app.loadGraphData(graph);
    const missing = eval(missingSrc)();
    const nodes = window.app.graph._nodes;
    // widgets_values is positional: a file that lacks a value the frontend expects (e.g. the control widget it adds
    // after every INT named 'seed') shifts every later value into the wrong widget
    const misaligned = [];
    for (const saved of graph.nodes) {
      const node = window.app.graph.getNodeById(saved.id);
      const count = (node?.widgets ?? []).filter((w) => w.serialize !== false).length;
      if (node && saved.widgets_values && !Array.isArray(saved.widgets_values)) continue;
      if (node && (saved.widgets_values ?? []).length !== count) {
        misaligned.push({ id: saved.id, type: saved.type, file: (saved.widgets_values ?? []).length, frontend: count,
                          widgets: node.widgets.map((w) => w.name) });
      }
    }
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
             before, after: gb?.title, camBefore: camBefore ?? null, camAfter: cam?.title ?? null, missing, misaligned };
  }, [graph, MISSING.toString()]);
}

async function closeDialogs() {
  // e.g. the "missing models" dialog a bundled workflow opens (it names the full-size checkpoint)
  for (let i = 0; i < 5 && await page.locator(".p-dialog").count(); i++) {
    await page.keyboard.press("Escape");
    await page.waitForTimeout(300);
  }
}

async function fitView() {
  await page.evaluate(async () => {
    await window.app.extensionManager.command.execute("Comfy.Canvas.FitView");
    window.app.graph.setDirtyCanvas(true, true);
  });
  await page.waitForTimeout(500);
}

const runReports = {};
for (const run of runs) {
  const name = path.basename(run.file, ".json");
  const graph = JSON.parse(fs.readFileSync(run.file, "utf8"));
  const started = Date.now();
  const setup = await page.evaluate(async ([graph, widgets, missingSrc]) => {
    const { app } = window;
    const api = window.comfyAPI.api.api;
    await app.loadGraphData(graph);
    const missing = eval(missingSrc)();
    const set = [];
    const unknown = [];
    for (const [type, values] of Object.entries(widgets)) {
      const nodes = app.graph._nodes.filter((n) => n.type === type);
      if (!nodes.length) unknown.push(type);
      for (const node of nodes) {
        for (const [wname, value] of Object.entries(values)) {
          const widget = node.widgets?.find((w) => w.name === wname);
          if (!widget) { unknown.push(`${type}.${wname}`); continue; }
          widget.value = value;
          widget.callback?.(value, app.canvas, node);
          set.push(`${type}.${wname}=${widget.value}`);
        }
      }
    }
    // what the frontend sends: wrap api.queuePrompt (the Queue button -> app.queuePrompt -> api.queuePrompt)
    window.xmgieRun = { events: [], queued: null, queueError: null, sent: null };
    if (!api.xmgieWrapped) {
      const queue = api.queuePrompt.bind(api);
      api.queuePrompt = async (number, data, options) => {
        window.xmgieRun.sent = data.output;
        try {
          const res = await queue(number, data, options);
          window.xmgieRun.queued = res;
          return res;
        } catch (e) {
          window.xmgieRun.queueError = { message: String(e?.message ?? e), response: e?.response ?? null };
          throw e;
        }
      };
      for (const type of ["execution_success", "execution_error", "execution_interrupted"]) {
        api.addEventListener(type, (e) => window.xmgieRun.events.push({ type, detail: e.detail }));
      }
      api.xmgieWrapped = true;
    }
    await app.queuePrompt(0, 1);
    return { missing, set, unknown, queued: window.xmgieRun.queued, queueError: window.xmgieRun.queueError,
             sent: window.xmgieRun.sent };
  }, [graph, run.widgets || {}, MISSING.toString()]);
  const report = { ...setup, seconds: null, status: null, error: null, nodes: {}, screenshot: null };
  runReports[name] = report;
  const promptId = setup.queued?.prompt_id;
  // app.queuePrompt's own result is not usable here: it is !node_errors, and a good prompt has node_errors {}
  if (!promptId || Object.keys(setup.queued.node_errors ?? {}).length) {
    report.status = "not queued";
    continue;
  }
  try {
    await page.waitForFunction((id) => window.xmgieRun.events.some((e) => e.detail?.prompt_id === id), promptId,
                               { timeout: (run.timeout_s || 600) * 1000, polling: 500 });
  } catch (e) {
    report.status = "timeout";
    continue;
  }
  const done = await page.evaluate((id) => window.xmgieRun.events.find((e) => e.detail?.prompt_id === id), promptId);
  report.seconds = (Date.now() - started) / 1000;
  report.status = done.type;
  if (done.type !== "execution_success") report.error = done.detail;
  await closeDialogs();
  await fitView();
  // the frontend loads a node's output images when it draws the node (onDrawBackground): wait until it has
  for (const type of run.wait_images || []) {
    try {
      await page.waitForFunction((type) => {
        window.app.graph.setDirtyCanvas(true, true);
        const node = window.app.graph._nodes.find((n) => n.type === type);
        return node?.imgs?.length && node.imgs.every((img) => img.complete && img.naturalWidth > 0);
      }, type, { timeout: 30000, polling: 250 });
    } catch (e) {
      errors.push(`run ${name}: ${type} never showed its images`);
    }
  }
  await page.waitForTimeout(1000); // let the multiline widget resize and the canvas repaint
  report.nodes = await page.evaluate(async () => {
    // what the page would save and queue now, after the run (a result widget must be in neither)
    const again = (await window.app.graphToPrompt()).output;
    const out = {};
    for (const node of window.app.graph._nodes) {
      const stored = window.app.nodeOutputs[String(node.id)];
      (out[node.type] ??= []).push({
        id: node.id, title: node.title,
        imgs: (node.imgs || []).map((img) => ({ src: img.src, width: img.naturalWidth, height: img.naturalHeight })),
        outputs: stored ?? null,
        widgets: (node.widgets || []).map((w) => ({ name: w.name, type: w.type, value: typeof w.value === "string" ||
          typeof w.value === "number" || typeof w.value === "boolean" ? w.value : null,
          readOnly: w.inputEl?.readOnly ?? null })),
        saved: node.serialize().widgets_values ?? null,
        queuedAgain: again[String(node.id)]?.inputs ?? null,
      });
    }
    return out;
  });
  report.closeups = {};
  if (run.screenshot || run.closeups) {
    // a bigger page, so that the whole graph fits at a zoom where litegraph still draws text and DOM widgets
    await page.setViewportSize({ width: 2560, height: 1440 });
    await page.evaluate(async () => {
      const settings = window.app.extensionManager.setting;
      try {
        await settings.set("LiteGraph.Canvas.LowQualityRenderingZoomThreshold", 0.2);
        await settings.set("Comfy.Minimap.Visible", false);
      } catch (e) { /* an older frontend: keep its defaults */ }
    });
    await fitView();
    await page.waitForTimeout(1000);
  }
  if (run.screenshot) {
    await page.locator("#graph-canvas").screenshot({ path: run.screenshot });
    report.screenshot = run.screenshot;
  }
  for (const [type, file] of Object.entries(run.closeups || {})) {
    // the node at 100 %, in front of its neighbours, in the middle of the page
    const found = await page.evaluate((type) => {
      const { app } = window;
      const node = app.graph._nodes.find((n) => n.type === type);
      if (!node) return false;
      app.canvas.bringToFront(node);
      const canvas = app.canvas.canvas;
      const scale = 1;
      app.canvas.ds.scale = scale;
      const [w, h] = [canvas.width / (window.devicePixelRatio || 1), canvas.height / (window.devicePixelRatio || 1)];
      app.canvas.ds.offset = [w / 2 / scale - node.pos[0] - node.size[0] / 2,
                              h / 2 / scale - node.pos[1] - node.size[1] / 2];
      app.graph.setDirtyCanvas(true, true);
      return true;
    }, type);
    if (!found) continue;
    await page.waitForTimeout(1000);
    await page.locator("#graph-canvas").screenshot({ path: file });
    report.closeups[type] = file;
  }
  if (run.screenshot || run.closeups) await page.setViewportSize({ width: 1600, height: 900 });
}
console.log(JSON.stringify({ errors, workflows, runs: runReports }));
await browser.close();
