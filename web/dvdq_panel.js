// DVD-Quant front-end extension: a live bit strip on each Bit Switch Scheduler node (with a mark for
// the steps whose attention ran in 8 bits), the quantization progress and summary on DVD-Quant Loader /
// Apply nodes, and the status of DVD-Quant 8-bit Attention nodes. The server's events are described in
// the pack's docs; the state and text logic lives in dvdq_panel_state.js.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import * as S from "./dvdq_panel_state.js";

const BIT_NODE = "DVDQuantBitSwitch";
const QUANT_NODES = new Set(["DVDQuantLoader", "DVDQuantApply"]);
const ATTN_NODE = "DVDQuantAttention";
const PANEL_WIDGET = "dvdq_panel";
const { PAD } = S.LAYOUT;
const BIT_PANEL_H = 94;  // strip, attention mark, line, info and the attention summary
const QUANT_PANEL_H = 92;  // the bar and up to five summary lines (the last: the backend)
const ATTN_PANEL_H = 48;  // three status lines
const FONT = "11px Arial";
const BOLD = "bold 12px Arial";
const TEXT = "#dddddd";
const DIM = "#8a8a8a";
const PANEL_BG = "#1b1b1b";

// Events name the node by its execution id ("12", or "5:12" inside a subgraph); the canvas node
// has the last part as its id, so state is kept under that.
const strips = new Map();
const quants = new Map();
const attns = new Map();
const keyOf = (id) => String(id).split(":").pop();

// The panel widgets of the nodes that exist. The classic (LiteGraph) canvas draws them with the
// node whenever it is marked dirty. In Nodes 2.0 (Vue nodes, `Comfy.VueNodes.Enabled`) the front
// end draws a widget that has its own draw() into a <canvas> of the widget's own ("WidgetLegacy"),
// and repaints it only when the widget's triggerDraw(), which it sets, is called.
const panels = new Map();  // panel widget -> its node

/** Repaint: the classic canvas, and in Nodes 2.0 the panels of the event's node (`key`; all without one). */
function redraw(key) {
  if (app.canvas?.setDirty) app.canvas.setDirty(true, false);  // the canvas that shows the open (sub)graph
  else app.graph?.setDirtyCanvas(true, false);
  for (const [w, node] of panels) if (key === undefined || keyOf(node.id) === key) w.triggerDraw?.();
}

function widgetValue(node, name) {
  return node.widgets?.find((w) => w.name === name)?.value;
}

/** Weight bits of the DVD-Quant node feeding this one through MODEL links (a few hops up). */
function upstreamWBits(node) {
  let cur = node;
  for (let hop = 0; cur && hop < 12; hop++) {
    const slot = cur.inputs?.findIndex((i) => i.type === "MODEL" && i.link != null) ?? -1;
    if (slot < 0) return undefined;
    cur = cur.getInputNode?.(slot);
    if (cur && QUANT_NODES.has(cur.type ?? cur.comfyClass)) {
      const summary = quants.get(String(cur.id))?.summary;
      return summary?.wBits ?? Number(widgetValue(cur, "w_bits"));
    }
  }
  return undefined;
}

function panelBox(ctx, width, y, h) {
  ctx.fillStyle = PANEL_BG;
  ctx.beginPath();
  if (ctx.roundRect) ctx.roundRect(PAD - 4, y, width - 2 * PAD + 8, h - 4, 4);
  else ctx.rect(PAD - 4, y, width - 2 * PAD + 8, h - 4);
  ctx.fill();
}

function text(ctx, str, x, y, { colour = TEXT, font = FONT, align = "left" } = {}) {
  ctx.font = font;
  ctx.fillStyle = colour;
  ctx.textAlign = align;
  ctx.textBaseline = "middle";
  ctx.fillText(str, x, y);
}

// ------------------------------------------------------------------ Bit Switch Scheduler panel

function drawBitPanel(ctx, node, width, y) {
  const strip = strips.get(String(node.id)) ?? S.emptyBitStrip();
  const low = Number(widgetValue(node, "low") ?? 4);
  const high = Number(widgetValue(node, "high") ?? 8);
  const delta = Number(widgetValue(node, "delta"));
  const g = S.stripGeometry(width, y);
  followHover(ctx, node, width, y);
  ctx.save();
  panelBox(ctx, width, y, BIT_PANEL_H);

  // Header: W4A<avg> label, steps done, legend.
  const avg = S.averageBits(strip);
  const label = S.precisionLabel(upstreamWBits(node), avg);
  text(ctx, label, g.x, y + 10, { font: BOLD, colour: avg == null ? DIM : S.bitsColour(avg, low, high) });
  ctx.font = BOLD;
  const labelW = ctx.measureText(label).width;
  const seen = strip.steps.filter(Boolean).length;
  const n = S.cellCount(strip);
  if (n) text(ctx, `avg ${S.trimNumber(avg ?? 0, 2)} bits · ${seen}/${n}`, g.x + labelW + 8, y + 10, { colour: DIM });
  let lx = g.x + g.w;
  for (const b of [high, low]) {
    text(ctx, `${b}b`, lx, y + 10, { colour: DIM, align: "right" });
    ctx.font = FONT;
    lx -= ctx.measureText(`${b}b`).width + 12;
    ctx.fillStyle = S.bitsColour(b, low, high);
    ctx.fillRect(lx + 2, y + 5, 8, 10);
    lx -= 6;
  }

  // The strip: one cell per denoising step.
  const cells = S.stripCells(n, g.x, g.w);
  cells.forEach((c, i) => {
    const s = strip.steps[i];
    if (s?.skipped) {  // a cached step: a thin bar, so runs of skips read as gaps in the strip
      ctx.fillStyle = S.EMPTY_COLOUR;
      ctx.fillRect(c.x, g.stripY, c.w, g.stripH);
      ctx.fillStyle = S.SKIPPED_COLOUR;
      ctx.fillRect(c.x, g.stripY + g.stripH * 0.4, c.w, g.stripH * 0.2);
    } else {
      ctx.fillStyle = S.cellColour(s, low, high);
      ctx.fillRect(c.x, g.stripY, c.w, g.stripH);
    }
    const mark = S.attentionColour(s);  // the step's attention: 8-bit or 16-bit (DVD-Quant 8-bit Attention)
    if (mark) {
      ctx.fillStyle = mark;
      ctx.fillRect(c.x, g.attnY, c.w, g.attnH);
    }
    if (i === node._dvdqHover) {
      ctx.strokeStyle = "#ffffff";
      ctx.lineWidth = 1.5;
      ctx.strokeRect(c.x + 0.5, g.stripY + 0.5, c.w - 1, g.stripH - 1);
    }
  });
  if (!n) {
    ctx.fillStyle = S.EMPTY_COLOUR;
    ctx.fillRect(g.x, g.stripY, g.w, g.stripH);
  }

  // The accumulated relative change per step, with the δ threshold dashed.
  const { points, thresholdY } = S.accumulatedLine(strip, g.lineH, delta);
  if (thresholdY != null && n) {
    ctx.strokeStyle = "#666";
    ctx.lineWidth = 1;
    ctx.setLineDash([3, 3]);
    ctx.beginPath();
    ctx.moveTo(g.x, g.lineY + thresholdY);
    ctx.lineTo(g.x + g.w, g.lineY + thresholdY);
    ctx.stroke();
    ctx.setLineDash([]);
    text(ctx, "δ", g.x + g.w + 1, g.lineY + thresholdY, { colour: DIM, font: "9px Arial" });
  }
  if (points.length) {
    ctx.strokeStyle = "#e0e0e0";
    ctx.lineWidth = 1.2;
    ctx.beginPath();
    points.forEach((p, k) => {
      const c = cells[p.i];
      const px = c.x + c.w / 2;
      const py = g.lineY + p.y;
      if (k === 0) ctx.moveTo(px, py);
      else ctx.lineTo(px, py);
    });
    ctx.stroke();
  }

  // Details of the hovered step, else of the newest one.
  let info;
  if (node._dvdqHover != null && node._dvdqHover >= 0 && node._dvdqHover < n) info = S.describeStep(strip, node._dvdqHover);
  else if (S.lastStepIndex(strip) >= 0) info = S.describeStep(strip, S.lastStepIndex(strip));
  else info = "bits per step appear here while sampling";
  text(ctx, S.fitLeft(info, g.w, (t) => ctx.measureText(t).width), g.x, g.infoY, { colour: DIM });
  const attn = S.attentionSummary(strip);
  if (attn) text(ctx, S.fitRight(attn, g.w, (t) => ctx.measureText(t).width), g.x, g.attnLineY, { colour: S.ATTN8_COLOUR });
  ctx.restore();
}

/** Cell under [px, py] of a panel drawn `width` wide at `y` (same coordinates), or null. */
function bitHoverIndex(node, width, y, [px, py]) {
  const g = S.stripGeometry(width, y);
  if (py < g.stripY || py > g.lineY + g.lineH) return null;
  const strip = strips.get(String(node.id));
  const i = strip ? S.cellAt(S.cellCount(strip), g.x, g.w, px) : -1;
  return i >= 0 ? i : null;
}

function setHover(node, i) {
  if (i === (node._dvdqHover ?? null)) return;
  node._dvdqHover = i;
  redraw(keyOf(node.id));
}

// Nodes 2.0 draws the panel into its own <canvas>, whose pointer moves do not reach
// node.onMouseMove (its component passes them on only while a button is down): follow them on
// that element. Its offsetX/offsetY are the coordinates the panel was drawn in.
function followHover(ctx, node, width, y) {
  const el = ctx.canvas;
  if (!el?.addEventListener || el === app.canvas?.canvas) return;  // the classic canvas: onMouseMove
  el._dvdqPanel = { node, width, y };  // what the last draw on this element used
  if (el._dvdqHoverFollowed) return;
  el._dvdqHoverFollowed = true;
  el.addEventListener("pointermove", (e) => {
    const p = el._dvdqPanel;
    setHover(p.node, bitHoverIndex(p.node, p.width, p.y, [e.offsetX, e.offsetY]));
  });
  el.addEventListener("pointerleave", () => setHover(el._dvdqPanel.node, null));
}

// ------------------------------------------------------------------ Loader / Apply panel

function drawQuantPanel(ctx, node, width, y) {
  const q = quants.get(String(node.id)) ?? S.emptyQuant();
  const { x, w, barY, barH, lineY, lineH } = S.quantGeometry(width, y);
  ctx.save();
  panelBox(ctx, width, y, QUANT_PANEL_H);
  ctx.fillStyle = S.EMPTY_COLOUR;
  ctx.fillRect(x, barY, w, barH);
  const f = S.progressFraction(q.progress);
  ctx.fillStyle = q.summary ? "#2e7d32" : "#1565c0";
  ctx.fillRect(x, barY, w * f, barH);
  let barText;
  if (q.summary) barText = q.summary.source === "loaded" ? "loaded DVD-Quant file" : "quantized";
  else if (q.progress) barText = S.progressLine(q.progress);
  else barText = "quantization progress appears here";
  ctx.font = FONT;
  text(ctx, S.fitLeft(barText, w - 8, (t) => ctx.measureText(t).width), x + 4, barY + barH / 2,
    { colour: q.progress ? "#ffffff" : DIM });
  const lines = S.summaryLines(q.summary);
  lines.forEach((line, k) => {
    ctx.font = FONT;
    text(ctx, S.fitLeft(line, w, (t) => ctx.measureText(t).width), x, lineY + lineH * k, { colour: TEXT });
  });
  ctx.restore();
}

// ------------------------------------------------------------------ 8-bit Attention panel

function drawAttentionPanel(ctx, node, width, y) {
  const a = attns.get(String(node.id)) ?? null;
  const g = S.attentionGeometry(width, y);
  ctx.save();
  panelBox(ctx, width, y, ATTN_PANEL_H);
  S.attentionLines(a).forEach((line, k) => {
    ctx.font = FONT;
    text(ctx, S.fitRight(line, g.w, (t) => ctx.measureText(t).width), g.x, g.lineY + g.lineH * k,
      { colour: k === 0 && a ? TEXT : DIM });
  });
  ctx.restore();
}

// ------------------------------------------------------------------ wiring

function addPanel(node, height, draw) {
  if (node.widgets?.some((w) => w.name === PANEL_WIDGET)) return;
  // Not serialized: stays out of widgets_values and of the API prompt.
  const widget = {
    type: "dvdq_panel",
    name: PANEL_WIDGET,
    value: "",
    serialize: false,
    options: { serialize: false },
    computeSize: (width) => [width ?? node.size[0], height],
    draw(ctx, n, width, y) {
      if (n.flags?.collapsed) return;
      draw(ctx, n, width, y);
    },
  };
  // Some front ends add a widget object of their own made from this one: keep the one added.
  panels.set(node.addCustomWidget(widget) ?? widget, node);
  const min = node.computeSize();
  node.setSize([Math.max(node.size[0], min[0]), Math.max(node.size[1], min[1])]);
}

app.registerExtension({
  name: "dvdq.panel",

  setup() {
    api.addEventListener(S.EVENTS.bitsReset, ({ detail }) => {
      const key = keyOf(detail.node);
      strips.set(key, S.emptyBitStrip());
      redraw(key);
    });
    api.addEventListener(S.EVENTS.bits, ({ detail }) => {
      const key = keyOf(detail.node);
      strips.set(key, S.applyBitsEvent(strips.get(key) ?? S.emptyBitStrip(), detail));
      redraw(key);
    });
    api.addEventListener(S.EVENTS.quantProgress, ({ detail }) => {
      const key = keyOf(detail.node);
      quants.set(key, S.applyProgressEvent(quants.get(key) ?? S.emptyQuant(), detail));
      redraw();  // every panel: a Bit Switch panel's header reads its loader's summary
    });
    api.addEventListener(S.EVENTS.quantSummary, ({ detail }) => {
      const key = keyOf(detail.node);
      quants.set(key, S.applySummaryEvent(quants.get(key) ?? S.emptyQuant(), detail));
      redraw();  // every panel: a Bit Switch panel's header reads its loader's summary
    });
    api.addEventListener(S.EVENTS.attention, ({ detail }) => {
      const key = keyOf(detail.node);
      attns.set(key, S.applyAttentionEvent(attns.get(key) ?? null, detail));
      redraw(key);
    });
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    const isBits = nodeData.name === BIT_NODE;
    const isQuant = QUANT_NODES.has(nodeData.name);
    const isAttn = nodeData.name === ATTN_NODE;
    if (!isBits && !isQuant && !isAttn) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      if (isBits) addPanel(this, BIT_PANEL_H, drawBitPanel);
      else if (isAttn) addPanel(this, ATTN_PANEL_H, drawAttentionPanel);
      else addPanel(this, QUANT_PANEL_H, drawQuantPanel);
      return r;
    };
    const onRemoved = nodeType.prototype.onRemoved;
    nodeType.prototype.onRemoved = function () {
      for (const w of this.widgets ?? []) if (w.name === PANEL_WIDGET) panels.delete(w);
      return onRemoved?.apply(this, arguments);
    };
    if (!isBits) return;
    // Hover on the classic canvas (Nodes 2.0: followHover).
    const onMouseMove = nodeType.prototype.onMouseMove;
    nodeType.prototype.onMouseMove = function (e, localPos) {
      const r = onMouseMove?.apply(this, arguments);
      const panel = this.widgets?.find((w) => w.name === PANEL_WIDGET);
      if (panel) setHover(this, bitHoverIndex(this, this.size[0], panel.y ?? panel.last_y ?? 0, localPos));
      return r;
    };
    const onMouseLeave = nodeType.prototype.onMouseLeave;
    nodeType.prototype.onMouseLeave = function () {
      const r = onMouseLeave?.apply(this, arguments);
      setHover(this, null);
      return r;
    };
  },
});
