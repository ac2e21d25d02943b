// xMGIE frontend extension: colours the pack's nodes and flags a GB Compositor in
// composite mode that has no source image connected (it would fail when queued).
import { app } from "../../../scripts/app.js";

const COLOR = "#2b3a55";
const BGCOLOR = "#1d2638";

function needsSource(node) {
  const mode = node.widgets?.find((w) => w.name === "mode");
  const source = node.inputs?.find((i) => i.name === "source");
  return mode?.value === "composite" && source && source.link == null;
}

function refreshWarning(node) {
  const base = node.xmgieTitle ?? node.title;
  node.xmgieTitle = base;
  node.title = needsSource(node) ? `${base} (connect source)` : base;
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "xmgie.nodes",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData.category?.startsWith("xMGIE")) return;
    const onCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onCreated?.apply(this, arguments);
      this.color = COLOR;
      this.bgcolor = BGCOLOR;
      if (nodeData.name === "XMGIEGBCompositor") {
        const mode = this.widgets?.find((w) => w.name === "mode");
        const cb = mode?.callback;
        if (mode) mode.callback = (...args) => { cb?.apply(mode, args); refreshWarning(this); };
        refreshWarning(this);
      }
      return r;
    };
    if (nodeData.name === "XMGIEGBCompositor") {
      const onConn = nodeType.prototype.onConnectionsChange;
      nodeType.prototype.onConnectionsChange = function () {
        const r = onConn?.apply(this, arguments);
        refreshWarning(this);
        return r;
      };
    }
  },
});
