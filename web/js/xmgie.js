// xMGIE frontend extension: colours the pack's nodes and flags wiring that would fail when queued:
// a GB Compositor in composite mode without a source image, and a Cross-Attention Mask whose own
// encoded prompt ('positive') feeds no sampler (the sampler would then never see the masked prompt).
// After a run, a node that reports a warning (`xmgie_warning` in its UI output, e.g. the Region
// Predictor finding an empty region) shows it in its title and, in full, in its tooltip-like description.
// A node of SHOWS_TEXT that reports text (`text` in its UI output: the Identity Score's IPS report, the Drift Map's
// and Edit Metrics' reports) shows it in a read-only multiline widget, created on the first run and updated on every
// later one. Images a node reports (the Region Predictor's preview, the heat maps, ComfyUI's `images` UI key) are
// drawn on the node by the frontend itself.
import { app } from "../../../scripts/app.js";
import { ComfyWidgets } from "../../../scripts/widgets.js";

const COLOR = "#2b3a55";
const BGCOLOR = "#1d2638";
const WARN_BGCOLOR = "#5a4010";

const WARNINGS = {
  XMGIEGBCompositor(node) {
    const mode = node.widgets?.find((w) => w.name === "mode");
    const source = node.inputs?.find((i) => i.name === "source");
    return mode?.value === "composite" && source && source.link == null ? "connect source" : null;
  },
  XMGIECrossAttentionMask(node) {
    const positive = node.outputs?.find((o) => o.name === "positive");
    return positive && !(positive.links?.length) ? "connect positive" : null;
  },
};

const REPORT_WIDGET = "xmgie_report";
const SHOWS_TEXT = new Set(["XMGIEIdentityScore", "XMGIEDriftMap", "XMGIEEditMetrics"]);

function showText(node, lines) {
  let widget = node.widgets?.find((w) => w.name === REPORT_WIDGET);
  if (!widget) {
    widget = ComfyWidgets.STRING(node, REPORT_WIDGET, ["STRING", { multiline: true }], app).widget;
    widget.label = "report";
    widget.serialize = false; // not saved in the workflow: it is this run's result, not a setting
    widget.options.serialize = false; // nor sent as an input with the prompt
    if (widget.inputEl) {
      widget.inputEl.readOnly = true;
      widget.inputEl.style.opacity = 0.8;
      widget.inputEl.placeholder = "";
    }
  }
  widget.value = lines.join("\n");
  requestAnimationFrame(() => {
    const size = node.computeSize();
    node.setSize?.([Math.max(size[0], node.size[0]), Math.max(size[1], node.size[1])]);
    node.setDirtyCanvas?.(true, true);
  });
}

function refreshWarning(node, check) {
  const base = node.xmgieTitle ?? node.title;
  node.xmgieTitle = base;
  const warning = check(node);
  node.title = warning ? `${base} (${warning})` : base;
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "xmgie.nodes",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData.category?.startsWith("xMGIE")) return;
    const check = WARNINGS[nodeData.name];
    const onCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onCreated?.apply(this, arguments);
      this.color = COLOR;
      this.bgcolor = BGCOLOR;
      if (check) {
        for (const widget of this.widgets ?? []) {
          const cb = widget.callback;
          widget.callback = (...args) => { cb?.apply(widget, args); refreshWarning(this, check); };
        }
        refreshWarning(this, check);
      }
      return r;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const r = onExecuted?.apply(this, arguments);
      const base = this.xmgieRunTitle ?? this.title;
      this.xmgieRunTitle = base;
      const warning = message?.xmgie_warning?.[0];
      this.title = warning ? `${base} (warning: see log)` : base;
      this.xmgieWarning = warning ?? null;
      this.bgcolor = warning ? WARN_BGCOLOR : BGCOLOR;
      if (SHOWS_TEXT.has(nodeData.name) && message?.text != null) {
        showText(this, [].concat(message.text).map(String));
      }
      this.setDirtyCanvas?.(true, true);
      return r;
    };
    if (check) {
      const onConn = nodeType.prototype.onConnectionsChange;
      nodeType.prototype.onConnectionsChange = function () {
        const r = onConn?.apply(this, arguments);
        refreshWarning(this, check);
        // litegraph clears a disconnected output's link list only after this callback: look again then
        setTimeout(() => refreshWarning(this, check), 0);
        return r;
      };
      const onConfigure = nodeType.prototype.onConfigure;
      nodeType.prototype.onConfigure = function () {
        const r = onConfigure?.apply(this, arguments);
        refreshWarning(this, check);
        return r;
      };
    }
  },
});
