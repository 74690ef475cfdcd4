// The extension module itself (dvdq_panel.js) against a fake ComfyUI app/api and a recording canvas:
// registration, the panel widget, events -> state -> what gets drawn, hover.
import { test, before } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import * as S from "../dvdq_panel_state.js";

const WEB = path.dirname(path.dirname(fileURLToPath(import.meta.url)));

class FakeApi {
  constructor() { this.listeners = {}; }
  addEventListener(name, fn) { (this.listeners[name] ??= []).push(fn); }
  emit(name, detail) { for (const fn of this.listeners[name] ?? []) fn({ detail }); }
}

// A DOM element that records its event listeners (a <canvas>).
class FakeElement {
  constructor() { this.listeners = {}; }
  addEventListener(name, fn) { (this.listeners[name] ??= []).push(fn); }
  dispatch(name, ev = {}) { for (const fn of this.listeners[name] ?? []) fn(ev); }
}

const host = { extensions: [], dirty: 0 };
host.app = {
  registerExtension(ext) { host.extensions.push(ext); },
  graph: { setDirtyCanvas() { throw new Error("the canvas is marked dirty through app.canvas"); } },
  canvas: { canvas: new FakeElement(), setDirty() { host.dirty++; } },  // the classic graph canvas
};
host.api = new FakeApi();

// Canvas context that records what is drawn (on the classic graph canvas unless `canvas` is given).
function recordingCtx(canvas = host.app.canvas.canvas) {
  const rec = { texts: [], textYs: [], rects: [], strokes: 0 };
  const ctx = {
    canvas, rec, fillStyle: "", strokeStyle: "", font: "", lineWidth: 1, textAlign: "", textBaseline: "",
    save() {}, restore() {}, beginPath() {}, fill() {}, rect() {}, roundRect() {}, moveTo() {}, lineTo() {},
    setLineDash() {}, strokeRect() {},
    stroke() { rec.strokes++; },
    fillRect(x, y, w, h) { rec.rects.push({ x, y, w, h, colour: this.fillStyle }); },
    fillText(t, x, y) { rec.texts.push(String(t)); rec.textYs.push(y); },
    measureText(t) { return { width: String(t).length * 6 }; },
  };
  return ctx;
}

function makeNodeType(name, { copyWidgets = false } = {}) {
  const proto = {
    // copyWidgets: like front ends that add a widget object of their own made from the given one
    addCustomWidget(w) {
      const added = copyWidgets ? { ...w } : w;
      this.widgets.push(added);
      return added;
    },
    computeSize() { return [320, 40 + 24 * this.widgets.length + (this.widgets.at(-1)?.computeSize?.(320)[1] ?? 0)]; },
    setSize(s) { this.size = s; },
    getInputNode(slot) { return this.upstream?.[slot]; },
  };
  function NodeType(id, widgets, inputs = []) {
    this.id = id; this.type = name; this.size = [320, 100]; this.widgets = widgets; this.inputs = inputs; this.flags = {};
  }
  NodeType.prototype = proto;
  return NodeType;
}

let ext;
let BitNode;
let LoaderNode;
let AttnNode;

before(async () => {
  // Load dvdq_panel.js with its two ComfyUI imports pointed at the fakes.
  const src = fs.readFileSync(path.join(WEB, "dvdq_panel.js"), "utf8")
    .replace(/import \{ app \} from "..\/..\/scripts\/app.js";/, "const { app } = globalThis.__dvdqHost;")
    .replace(/import \{ api \} from "..\/..\/scripts\/api.js";/, "const { api } = globalThis.__dvdqHost;")
    .replace(/from "\.\/dvdq_panel_state\.js"/, `from ${JSON.stringify(pathToFileURL(path.join(WEB, "dvdq_panel_state.js")).href)}`);
  assert.ok(src.includes("const { app } = globalThis.__dvdqHost"), "app import not found");
  assert.ok(src.includes("const { api } = globalThis.__dvdqHost"), "api import not found");
  globalThis.__dvdqHost = host;
  const file = path.join(fs.mkdtempSync(path.join(os.tmpdir(), "dvdq-panel-")), "dvdq_panel.mjs");
  fs.writeFileSync(file, src);
  await import(pathToFileURL(file).href);
  assert.equal(host.extensions.length, 1);
  ext = host.extensions[0];
  ext.setup();
  BitNode = makeNodeType("DVDQuantBitSwitch");
  LoaderNode = makeNodeType("DVDQuantLoader");
  await ext.beforeRegisterNodeDef(BitNode, { name: "DVDQuantBitSwitch" });
  await ext.beforeRegisterNodeDef(LoaderNode, { name: "DVDQuantLoader" });
  AttnNode = makeNodeType("DVDQuantAttention");
  await ext.beforeRegisterNodeDef(AttnNode, { name: "DVDQuantAttention" });
});

const panelOf = (node) => node.widgets.find((w) => w.name === "dvdq_panel");

function newBitNode(id, loader) {
  const node = new BitNode(id, [
    { name: "mode", value: "delta" }, { name: "delta", value: 0.1 }, { name: "low", value: 4 },
    { name: "high", value: 8 }, { name: "fixed_bits", value: 8 }, { name: "schedule", value: "" },
  ], [{ name: "model", type: "MODEL", link: 1 }]);
  node.upstream = [loader];
  node.onNodeCreated();
  return node;
}

function newLoader(id) {
  const node = new LoaderNode(id, [
    { name: "model_name", value: "m.safetensors" }, { name: "w_bits", value: 4 }, { name: "a_low", value: 4 },
    { name: "a_high", value: 8 }, { name: "method", value: "dvdq" }, { name: "save_quantized_copy", value: false },
  ], [{ name: "arq_settings", type: "ARQ_SETTINGS", link: null }]);
  node.onNodeCreated();
  return node;
}

function draw(node) {
  const ctx = recordingCtx();
  const panel = panelOf(node);
  panel.y = 200;
  panel.draw(ctx, node, node.size[0], panel.y, 20);
  return ctx.rec;
}

// Nodes 2.0 (Vue nodes): the front end's legacy-widget component draws the widget into a <canvas>
// of its own at y = 1, `width` = that element's width, and sets widget.triggerDraw to repaint it.
function mountLikeNodes2(node, width = 260) {
  const panel = panelOf(node);
  const el = new FakeElement();
  const frames = [];
  panel.triggerDraw = () => {
    const ctx = recordingCtx(el);
    panel.y = 0;
    panel.draw(ctx, node, width, 1, 80);
    frames.push(ctx.rec);
  };
  panel.triggerDraw();
  return { el, frames };
}

test("registers one extension and adds an unserialized panel widget to our nodes only", async () => {
  assert.equal(ext.name, "dvdq.panel");
  const Other = makeNodeType("KSampler");
  const before = Other.prototype.onNodeCreated;
  await ext.beforeRegisterNodeDef(Other, { name: "KSampler" });
  assert.equal(Other.prototype.onNodeCreated, before);
  const node = newBitNode(21, newLoader(20));
  const panel = panelOf(node);
  assert.ok(panel, "no panel widget");
  assert.equal(panel.serialize, false);
  assert.equal(panel.options.serialize, false);
  assert.equal(node.widgets.at(-1), panel, "the panel must come after the real widgets (widgets_values order)");
  assert.ok(node.size[1] >= node.computeSize()[1]);
  node.onNodeCreated(); // created twice (e.g. clone): still one panel
  assert.equal(node.widgets.filter((w) => w.name === "dvdq_panel").length, 1);
});

test("dvdq.bits events fill the strip; reset clears it", () => {
  const loader = newLoader(30);
  const node = newBitNode(31, loader);
  let rec = draw(node);
  assert.ok(rec.texts.includes("bits per step appear here while sampling"));
  host.api.emit("dvdq.bits_reset", { node: "31" });
  const seq = [8, 4, 4, 8];
  seq.forEach((bits, step) => host.api.emit("dvdq.bits", {
    node: "31", step, total: 6, bits, indicator: 0.01, accumulated: 0.03 * step, mode: "delta",
  }));
  rec = draw(node);
  const cells = rec.rects.filter((r) => r.h === 16 && r.y === 220);
  assert.equal(cells.length, 6);
  assert.deepEqual(cells.map((c) => c.colour), [
    S.HIGH_COLOUR, S.LOW_COLOUR, S.LOW_COLOUR, S.HIGH_COLOUR, S.EMPTY_COLOUR, S.EMPTY_COLOUR,
  ]);
  assert.ok(rec.texts.includes("W4A6"), rec.texts.join(" | "));
  assert.ok(rec.texts.some((t) => t.startsWith("avg 6 bits · 4/6")));
  assert.ok(rec.texts.some((t) => t.startsWith("step 4/6: 8 bits")));
  assert.ok(rec.strokes >= 2, "accumulated line and δ threshold");
  host.api.emit("dvdq.bits_reset", { node: "31" });
  rec = draw(node);
  assert.ok(rec.texts.includes("bits per step appear here while sampling"));
  assert.ok(rec.texts.includes("W4A–"));
});

test("events from a node inside a subgraph ('5:41') reach node 41; other nodes stay empty", () => {
  const node = newBitNode(41, newLoader(40));
  const other = newBitNode(42, newLoader(43));
  host.api.emit("dvdq.bits", { node: "5:41", step: 0, total: 2, bits: 8, indicator: null, accumulated: 0, mode: "fixed" });
  assert.ok(draw(node).texts.some((t) => t.startsWith("step 1/2: 8 bits")));
  assert.ok(draw(other).texts.includes("bits per step appear here while sampling"));
});

test("hovering a cell shows that step", () => {
  const node = newBitNode(51, newLoader(50));
  [8, 4, 4, 4].forEach((bits, step) => host.api.emit("dvdq.bits", {
    node: "51", step, total: 4, bits, indicator: 0.02, accumulated: 0.02 * step, mode: "delta",
  }));
  const panel = panelOf(node);
  panel.y = 200;
  // Cells span x 10..310; the second cell is around x = 90, the strip at y 220..236.
  node.onMouseMove({}, [90, 228]);
  assert.equal(node._dvdqHover, 1);
  assert.ok(draw(node).texts.some((t) => t.startsWith("step 2/4: 4 bits")));
  node.onMouseMove({}, [90, 100]); // over the widgets: no hover
  assert.equal(node._dvdqHover, null);
  node.onMouseMove({}, [90, 228]);
  node.onMouseLeave({});
  assert.equal(node._dvdqHover, null);
});

test("loader panel: progress bar with the layer, then the summary", () => {
  const loader = newLoader(60);
  let rec = draw(loader);
  assert.ok(rec.texts.includes("quantization progress appears here"));
  host.api.emit("dvdq.quant_progress", { node: "60", done: 3, total: 12, layer: "blocks.0.ffn.2" });
  rec = draw(loader);
  assert.ok(rec.texts.includes("quantizing 3/12 blocks.0.ffn.2"), rec.texts.join(" | "));
  const bar = rec.rects.filter((r) => r.h === 14);
  assert.equal(bar.length, 2);
  assert.ok(Math.abs(bar[1].w - bar[0].w * 0.25) < 1e-9, "bar filled to 3/12");
  host.api.emit("dvdq.quant_summary", {
    node: "60", layers: 12, w_bits: 4, bytes_before: 4096, bytes_after: 1024, mean_rel_error: 0.05,
    seconds: 1.5, source: "loaded",
  });
  rec = draw(loader);
  assert.ok(rec.texts.includes("loaded DVD-Quant file"));
  assert.ok(rec.texts.includes("W4 · 12 layers loaded pre-quantized in 1.50 s"));
  assert.ok(rec.texts.includes("4 KiB → 1 KiB (4×)"));
  assert.ok(rec.texts.includes("mean rel. error 0.05"));
  // A Bit Switch fed by this loader takes its weight bits from the summary.
  const bits = newBitNode(61, loader);
  host.api.emit("dvdq.bits", { node: "61", step: 0, total: 1, bits: 4, indicator: null, accumulated: 0, mode: "delta" });
  assert.ok(draw(bits).texts.includes("W4A4"));
});

test("a collapsed node draws nothing", () => {
  const node = newBitNode(71, newLoader(70));
  node.flags.collapsed = true;
  const rec = draw(node);
  assert.equal(rec.texts.length + rec.rects.length, 0);
});

test("Nodes 2.0: every event repaints the panels through triggerDraw, so the strip fills live", () => {
  const loader = newLoader(80);
  const node = newBitNode(81, loader);
  const bits = mountLikeNodes2(node);
  const quant = mountLikeNodes2(loader);
  assert.ok(bits.frames[0].texts.includes("bits per step appear here while sampling"));
  host.api.emit("dvdq.quant_progress", { node: "80", done: 1, total: 4, layer: "blocks.0.ffn.0" });
  assert.ok(quant.frames.at(-1).texts.includes("quantizing 1/4 blocks.0.ffn.0"));
  host.api.emit("dvdq.quant_summary", {
    node: "80", layers: 4, w_bits: 4, bytes_before: 4096, bytes_after: 1024, mean_rel_error: 0.05, seconds: 1, source: "quantized",
  });
  assert.ok(quant.frames.at(-1).texts.includes("quantized"));
  host.api.emit("dvdq.bits_reset", { node: "81" });
  const dirty = host.dirty;
  [8, 4].forEach((b, step) => host.api.emit("dvdq.bits", {
    node: "81", step, total: 3, bits: b, indicator: 0.01, accumulated: 0.01, mode: "delta",
  }));
  assert.ok(host.dirty >= dirty + 2, "the classic canvas is marked dirty too");
  const last = bits.frames.at(-1);
  const cells = last.rects.filter((r) => r.h === 16 && r.y === 21);  // strip at y + 20, drawn at y = 1
  assert.deepEqual(cells.map((c) => c.colour), [S.HIGH_COLOUR, S.LOW_COLOUR, S.EMPTY_COLOUR]);
  assert.ok(Math.abs(cells.at(-1).x + cells.at(-1).w - 250) < 1e-9, "cells span the element's width (260 - 2 * 10)");
  assert.ok(last.texts.includes("W4A6"), last.texts.join(" | "));  // the summary's weight bits reached the strip
});

test("Nodes 2.0: hover follows pointer moves on the panel's own canvas", () => {
  const node = newBitNode(91, newLoader(90));
  [8, 4, 4, 4].forEach((bits, step) => host.api.emit("dvdq.bits", {
    node: "91", step, total: 4, bits, indicator: 0.02, accumulated: 0.02 * step, mode: "delta",
  }));
  const { el, frames } = mountLikeNodes2(node, 260);
  assert.equal((el.listeners.pointermove ?? []).length, 1);
  // Cells span x 10..250 of the element (60 px each); the strip is at y 21..37.
  el.dispatch("pointermove", { offsetX: 140, offsetY: 29 });
  assert.equal(node._dvdqHover, 2);
  assert.ok(frames.at(-1).texts.some((t) => t.startsWith("step 3/4: 4 bits")), frames.at(-1).texts.join(" | "));
  const n = frames.length;
  el.dispatch("pointermove", { offsetX: 141, offsetY: 30 });  // the same cell: no repaint
  assert.equal(frames.length, n);
  el.dispatch("pointermove", { offsetX: 140, offsetY: 5 });  // the header: no cell
  assert.equal(node._dvdqHover, null);
  el.dispatch("pointermove", { offsetX: 20, offsetY: 29 });
  assert.equal(node._dvdqHover, 0);
  el.dispatch("pointerleave");
  assert.equal(node._dvdqHover, null);
  assert.ok(frames.at(-1).texts.some((t) => t.startsWith("step 4/4: 4 bits")), "back to the newest step");
  panelOf(node).triggerDraw();  // repainting again adds no second listener
  assert.equal(el.listeners.pointermove.length, 1);
});

test("on the classic canvas no listeners are added (hover comes through onMouseMove)", () => {
  const node = newBitNode(101, newLoader(100));
  draw(node);
  assert.equal(Object.keys(host.app.canvas.canvas.listeners).length, 0);
});

test("a removed node's panel is no longer repainted", () => {
  const node = newBitNode(111, newLoader(110));
  let calls = 0;
  panelOf(node).triggerDraw = () => { calls++; };
  host.api.emit("dvdq.bits", { node: "111", step: 0, total: 2, bits: 8, indicator: null, accumulated: 0, mode: "fixed" });
  assert.equal(calls, 1);
  node.onRemoved();
  host.api.emit("dvdq.bits", { node: "111", step: 1, total: 2, bits: 8, indicator: null, accumulated: 0, mode: "fixed" });
  assert.equal(calls, 1);
});

test("Nodes 2.0: an event repaints its own node's panel only", () => {
  const a = newBitNode(141, newLoader(140));
  const b = newBitNode(143, newLoader(142));
  const calls = { a: 0, b: 0 };
  panelOf(a).triggerDraw = () => { calls.a++; };
  panelOf(b).triggerDraw = () => { calls.b++; };
  host.api.emit("dvdq.bits", { node: "141", step: 0, total: 2, bits: 8, indicator: null, accumulated: 0, mode: "fixed" });
  assert.deepEqual(calls, { a: 1, b: 0 });
  host.api.emit("dvdq.bits", { node: "sub:143", step: 0, total: 2, bits: 4, indicator: null, accumulated: 0, mode: "fixed" });
  assert.deepEqual(calls, { a: 1, b: 1 });  // a node inside a subgraph: its local id
  // a loader's quantization events repaint every panel: a Bit Switch panel's header reads the loader's summary
  host.api.emit("dvdq.quant_summary", {
    node: "140", layers: 4, w_bits: 4, bytes_before: 4096, bytes_after: 1024, mean_rel_error: 0.1, seconds: 1,
  });
  assert.deepEqual(calls, { a: 2, b: 2 });
});

test("a front end that adds its own copy of the widget: triggerDraw on that copy is what repaints", async () => {
  const Copying = makeNodeType("DVDQuantBitSwitch", { copyWidgets: true });
  await ext.beforeRegisterNodeDef(Copying, { name: "DVDQuantBitSwitch" });
  const node = new Copying(121, [{ name: "delta", value: 0.1 }, { name: "low", value: 4 }, { name: "high", value: 8 }]);
  node.onNodeCreated();
  let calls = 0;
  panelOf(node).triggerDraw = () => { calls++; };
  host.api.emit("dvdq.bits", { node: "121", step: 0, total: 1, bits: 4, indicator: null, accumulated: 0, mode: "delta" });
  assert.equal(calls, 1);
});

test("the whole summary (five lines with the fused steps and the backend) fits in the loader's panel", () => {
  const loader = newLoader(130);
  host.api.emit("dvdq.quant_summary", {
    node: "130", layers: 40, w_bits: 4, bytes_before: 4096, bytes_after: 1024, mean_rel_error: 0.1, seconds: 1,
    source: "quantized", fused_steps: 8, backend: "reference (the input is on cpu)",
  });
  const rec = draw(loader);
  assert.equal(rec.texts.length, 6, rec.texts.join(" | "));  // the bar's text and five lines
  assert.ok(rec.texts.includes("backend reference (the input is on cpu)"));
  const height = panelOf(loader).computeSize(320)[1];  // the panel's box ends 4 px above the next widget
  for (const y of rec.textYs) assert.ok(y + 6 <= 200 + height - 4, `text at ${y} below the panel (200..${200 + height - 4})`);
});

test("the Bit Switch strip marks the steps whose attention ran in 8 bits and says on how many", () => {
  const node = newBitNode(141, newLoader(140));
  let rec = draw(node);
  assert.equal(rec.rects.filter((r) => r.h === 2).length, 0);
  host.api.emit("dvdq.bits_reset", { node: "141" });
  [[8, 0], [4, 3], [4, 3], [8, 0]].forEach(([bits, q8], step) => host.api.emit("dvdq.bits", {
    node: "141", step, total: 5, bits, indicator: 0.01, accumulated: 0.01, mode: "delta",
    attention: { q8, host: 6 - q8 },
  }));
  rec = draw(node);
  const marks = rec.rects.filter((r) => r.h === 2 && r.y === 237);  // under the strip (y + 37)
  assert.deepEqual(marks.map((m) => m.colour), [S.ATTN16_COLOUR, S.ATTN8_COLOUR, S.ATTN8_COLOUR, S.ATTN16_COLOUR]);
  assert.ok(rec.texts.includes("attention: 8-bit on 2 of 4 steps"), rec.texts.join(" | "));
  assert.ok(rec.texts.some((t) => t.endsWith("acc 0.01 · attn 16-bit")), rec.texts.join(" | "));  // the newest step
  const height = panelOf(node).computeSize(320)[1];
  for (const y of rec.textYs) assert.ok(y + 6 <= 200 + height - 4, `text at ${y} below the panel (200..${200 + height - 4})`);
});

test("the 8-bit Attention node gets a status panel that follows dvdq.attention", () => {
  const node = new AttnNode(151, [{ name: "mode", value: "always" }, { name: "pv", value: "auto" }],
    [{ name: "model", type: "MODEL", link: 1 }]);
  node.onNodeCreated();
  const panel = panelOf(node);
  assert.ok(panel && panel.serialize === false, "an unserialized panel widget");
  assert.ok(draw(node).texts.includes("status appears here when the node runs"));
  host.api.emit("dvdq.attention", { node: "151", mode: "always", pv: "fp8", q8: 60, host: 60,
    reasons: { "fewer than 128 keys": 60 }, running: false });
  const rec = draw(node);
  assert.deepEqual(rec.texts, ["always · P·V fp8", "8-bit: 60 of 120 calls · handed back: 60",
    "16-bit because: fewer than 128 keys (60)"]);
  const height = panel.computeSize(320)[1];
  for (const y of rec.textYs) assert.ok(y + 6 <= 200 + height - 4, `text at ${y} below the panel`);
  const { frames } = mountLikeNodes2(node);  // Nodes 2.0: repainted on the next event
  host.api.emit("dvdq.attention", { node: "9:151", mode: "always", pv: "fp8", q8: 61, host: 60,
    reasons: { "fewer than 128 keys": 60 }, running: true });
  assert.ok(frames.at(-1).texts.some((t) => t.startsWith("8-bit: 61 of 121 calls")), frames.at(-1).texts.join(" | "));
});
