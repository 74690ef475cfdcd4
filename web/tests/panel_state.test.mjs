// Unit tests of the panel logic: `node --test web/tests/`.
// The .mjs suffix keeps ComfyUI (which imports every web/**/*.js) from loading them in the browser.
import { test } from "node:test";
import assert from "node:assert/strict";
import * as S from "../dvdq_panel_state.js";

function run(events) {
  return events.reduce((st, ev) => S.applyBitsEvent(st, ev), S.emptyBitStrip());
}

const bitsEv = (step, bits, extra = {}) => ({
  node: "7", step, total: 5, bits, indicator: 0.01 * step, accumulated: 0.02 * step, mode: "delta", ...extra,
});

test("bit strip records each step and its average", () => {
  const st = run([bitsEv(0, 8), bitsEv(1, 8), bitsEv(2, 4), bitsEv(3, 4)]);
  assert.equal(S.cellCount(st), 5);
  assert.equal(st.steps.length, 4);
  assert.equal(S.averageBits(st), 6);
  assert.deepEqual(S.bitsHistogram(st), { 4: 2, 8: 2 });
  assert.equal(S.lastStepIndex(st), 3);
  assert.equal(st.mode, "delta");
});

test("a step seen twice overwrites, the state is not mutated", () => {
  const a = run([bitsEv(0, 8)]);
  const b = S.applyBitsEvent(a, bitsEv(0, 4));
  assert.equal(a.steps[0].bits, 8);
  assert.equal(b.steps[0].bits, 4);
  assert.equal(b.steps.length, 1);
});

test("unknown total falls back to the steps seen; bad step index is ignored", () => {
  let st = run([bitsEv(0, 8, { total: null }), bitsEv(2, 4, { total: null })]);
  assert.equal(S.cellCount(st), 3);
  assert.equal(S.averageBits(st), 6); // the hole at step 1 is not counted
  assert.equal(S.describeStep(st, 1), "step 2/3: not run by this node");
  assert.equal(S.describeStep(S.applyBitsEvent(st, bitsEv(3, 4, { total: 6 })), 4), "step 5/6: not run yet");
  const same = S.applyBitsEvent(st, { step: -1, bits: 4 });
  assert.equal(same, st);
});

test("steps a cache skipped are marked, not counted, and say so", () => {
  const skip = (step) => ({ node: "7", step, total: 5, bits: null, skipped: true, indicator: null,
    accumulated: null, mode: "delta" });
  const st = run([bitsEv(0, 8), skip(1), skip(2), bitsEv(3, 4)]);
  assert.equal(S.averageBits(st), 6);  // the skipped steps ran no quantized math
  assert.deepEqual(S.bitsHistogram(st), { 4: 1, 8: 1 });
  assert.equal(S.describeStep(st, 1), "step 2/5: skipped (a cache reused its output; the model did not run)");
  assert.equal(S.cellColour(st.steps[1]), S.SKIPPED_COLOUR);
  assert.equal(S.cellColour(st.steps[0]), S.HIGH_COLOUR);
  assert.equal(S.cellColour(st.steps[4]), S.EMPTY_COLOUR);
  assert.equal(S.lastStepIndex(st), 3);
});

test("precision label and step text", () => {
  assert.equal(S.precisionLabel(4, null), "W4A–");
  assert.equal(S.precisionLabel(4, 8), "W4A8");
  assert.equal(S.precisionLabel(4, 5.6666), "W4A5.7");
  assert.equal(S.precisionLabel(undefined, 4), "W?A4");
  const st = run([bitsEv(0, 8, { indicator: null, accumulated: 0 }), bitsEv(1, 4, { indicator: 0.0123, accumulated: 0.000012 })]);
  assert.equal(S.describeStep(st, 0), "step 1/5: 8 bits · acc 0");
  assert.equal(S.describeStep(st, 1), "step 2/5: 4 bits · ind 0.0123 · acc 1.2e-5");
});

test("colours: 4 and 8 bits differ, 6 lies between, 16 is grey", () => {
  assert.equal(S.bitsColour(4), S.LOW_COLOUR);
  assert.equal(S.bitsColour(8), S.HIGH_COLOUR);
  assert.equal(S.bitsColour(2), S.LOW_COLOUR); // clamped
  assert.equal(S.bitsColour(16), S.FULL_COLOUR);
  assert.equal(S.bitsColour(NaN), S.EMPTY_COLOUR);
  const mid = S.bitsColour(6);
  assert.match(mid, /^#[0-9a-f]{6}$/);
  assert.notEqual(mid, S.LOW_COLOUR);
  assert.notEqual(mid, S.HIGH_COLOUR);
  const ch = (hex, k) => parseInt(hex.slice(1 + 2 * k, 3 + 2 * k), 16);
  for (let k = 0; k < 3; k++) {
    const [lo, hi] = [ch(S.LOW_COLOUR, k), ch(S.HIGH_COLOUR, k)].sort((x, y) => x - y);
    assert.ok(ch(mid, k) >= lo && ch(mid, k) <= hi);
  }
  // the node's own low/high set the ends of the blend
  assert.equal(S.bitsColour(6, 6, 8), S.LOW_COLOUR);
});

test("strip cells fill the width and hit-testing finds them", () => {
  const cells = S.stripCells(10, 5, 200);
  assert.equal(cells.length, 10);
  assert.equal(cells[0].x, 5);
  const last = cells[9];
  assert.ok(Math.abs(last.x + last.w - 205) < 1e-9);
  assert.ok(cells[1].x > cells[0].x + cells[0].w); // 1 px gap when roomy
  const crowded = S.stripCells(100, 0, 150);
  assert.ok(Math.abs(crowded[1].x - crowded[0].w) < 1e-9); // no gap
  assert.deepEqual(S.stripCells(0, 0, 100), []);
  assert.equal(S.cellAt(10, 5, 200, 5), 0);
  assert.equal(S.cellAt(10, 5, 200, 204.9), 9);
  assert.equal(S.cellAt(10, 5, 200, 4), -1);
  assert.equal(S.cellAt(10, 5, 200, 205), -1);
});

test("accumulated line keeps the delta threshold in view", () => {
  const st = run([bitsEv(0, 8, { accumulated: 0 }), bitsEv(1, 8, { accumulated: 0.05 }), bitsEv(2, 4, { accumulated: 0.2 })]);
  const { points, thresholdY } = S.accumulatedLine(st, 20, 0.1);
  assert.deepEqual(points.map((p) => p.i), [0, 1, 2]);
  assert.equal(points[0].y, 20); // zero at the bottom
  assert.equal(points[2].y, 0); // the largest value at the top
  assert.equal(thresholdY, 10);
  const small = S.accumulatedLine(run([bitsEv(0, 8, { accumulated: 0.01 })]), 20, 0.1);
  assert.equal(small.thresholdY, 0); // δ above every value: δ is the top
  assert.equal(S.accumulatedLine(st, 20, 0).thresholdY, null);
});

test("quantization progress, summary and a new run", () => {
  let q = S.emptyQuant();
  assert.equal(S.progressFraction(q.progress), 0);
  q = S.applyProgressEvent(q, { node: "3", done: 3, total: 12, layer: "blocks.0.ffn.2" });
  assert.equal(S.progressFraction(q.progress), 0.25);
  assert.equal(S.progressLine(q.progress), "quantizing 3/12 blocks.0.ffn.2");
  q = S.applySummaryEvent(q, {
    node: "3", layers: 12, w_bits: 4, bytes_before: 8 * 1024 ** 3, bytes_after: 2.2 * 1024 ** 3,
    mean_rel_error: 0.0213, seconds: 75.5, source: "quantized",
  });
  assert.equal(S.progressFraction(q.progress), 1);
  assert.deepEqual(S.summaryLines(q.summary), [
    "W4 · 12 layers quantized in 75.5 s",
    "8 GiB → 2.2 GiB (3.6×)",
    "mean rel. error 0.0213",
  ]);
  q = S.applyProgressEvent(q, { node: "3", done: 0, total: 12, layer: "blocks.0.self_attn.q" });
  assert.equal(q.summary, null);
  assert.equal(S.progressFraction(q.progress), 0);
});

test("a loaded file's summary says so; missing error shows a dash", () => {
  const q = S.applySummaryEvent(S.emptyQuant(), {
    layers: 2, w_bits: 4, bytes_before: 2048, bytes_after: 600, mean_rel_error: null, seconds: 0.5, source: "loaded",
  });
  const lines = S.summaryLines(q.summary);
  assert.equal(lines[0], "W4 · 2 layers loaded pre-quantized in 0.50 s");
  assert.equal(lines[1], "2 KiB → 600 B (3.4×)");
  assert.equal(lines[2], "mean rel. error –");
  assert.equal(lines.length, 3);  // no fused-steps fields: a model without fused block steps
});

test("a Wan or HunyuanVideo model's summary says whether its elementwise steps are fused", () => {
  const ev = { layers: 2, w_bits: 4, bytes_before: 2048, bytes_after: 600, mean_rel_error: 0.01, seconds: 1,
    source: "quantized" };
  let q = S.applySummaryEvent(S.emptyQuant(), { ...ev, fused_steps: 80, fusion_off: null });
  assert.equal(S.summaryLines(q.summary)[3], "elementwise steps fused in 80 modules");
  q = S.applySummaryEvent(S.emptyQuant(), { ...ev, fused_steps: 0, fusion_off: "turned off by DVDQ_FUSE_BLOCKS=0" });
  assert.equal(S.summaryLines(q.summary)[3], "fused elementwise steps off: turned off by DVDQ_FUSE_BLOCKS=0");
  q = S.applySummaryEvent(S.emptyQuant(), { ...ev, fused_steps: 0, fusion_off: "ComfyUI's HunyuanVideo code changed (see the log)" });
  assert.equal(S.summaryLines(q.summary)[3], "fused elementwise steps off: ComfyUI's HunyuanVideo code changed (see the log)");
  q = S.applySummaryEvent(S.emptyQuant(), { ...ev, fused_steps: null, fusion_off: null });
  assert.equal(S.summaryLines(q.summary).length, 3);
});

test("the summary names the backend the quantized layers run on", () => {
  const ev = { layers: 2, w_bits: 4, bytes_before: 2048, bytes_after: 600, mean_rel_error: 0.01, seconds: 1,
    source: "quantized", fused_steps: 4, fusion_off: null };
  let q = S.applySummaryEvent(S.emptyQuant(), { ...ev, backend: "triton" });
  assert.equal(S.summaryLines(q.summary)[4], "backend triton");
  q = S.applySummaryEvent(S.emptyQuant(), { ...ev, backend: "reference (the input is on cpu)" });
  assert.equal(S.summaryLines(q.summary)[4], "backend reference (the input is on cpu)");
  q = S.applySummaryEvent(S.emptyQuant(), ev);  // an older pack's event
  assert.equal(S.summaryLines(q.summary).length, 4);
});

test("formatting helpers", () => {
  assert.equal(S.formatBytes(100), "100 B");
  assert.equal(S.formatBytes(1536), "1.5 KiB");
  assert.equal(S.formatBytes(5.29 * 1024 ** 3), "5.29 GiB");
  assert.equal(S.formatBytes(-1), "?");
  assert.equal(S.formatSeconds(300), "5 min 0 s");
  assert.equal(S.formatSmall(0.5), "0.5");
  assert.equal(S.formatSmall(123.4), "123");
  assert.equal(S.trimNumber(6.0, 1), "6");
  assert.equal(S.trimNumber(10, 1), "10");
  assert.equal(S.trimNumber(10, 0), "10");
  assert.equal(S.trimNumber(100.26, 1), "100.3");
  const measure = (t) => t.length * 6;
  assert.equal(S.fitLeft("short", 100, measure), "short");
  const fitted = S.fitLeft("blocks.12.cross_attn.o", 60, measure);
  assert.ok(fitted.startsWith("…") && measure(fitted) <= 60 && "blocks.12.cross_attn.o".endsWith(fitted.slice(1)));
});

test("layout: strip, line and info inside the Bit Switch panel; bar and five summary lines inside the Loader's", () => {
  const { PAD } = S.LAYOUT;
  const [BIT_PANEL_H, QUANT_PANEL_H, ATTN_PANEL_H] = [94, 92, 48];  // dvdq_panel.js (the extension test draws)
  const g = S.stripGeometry(300, 50);
  assert.deepEqual([g.x, g.w], [PAD, 300 - 2 * PAD]);
  assert.ok(g.stripY + g.stripH <= g.lineY && g.lineY + g.lineH < g.infoY - 5);
  assert.ok(g.stripY + g.stripH < g.attnY && g.attnY + g.attnH <= g.lineY, "the attention mark between strip and line");
  assert.ok(g.infoY + 7 <= g.attnLineY - 6, "the attention summary under the info line");
  assert.ok(g.attnLineY + 6 <= 50 + BIT_PANEL_H - 4, "the attention summary inside the panel's box");
  const a = S.attentionGeometry(300, 50);
  assert.ok(a.lineY - 6 >= 50 && a.lineY + 2 * a.lineH + 6 <= 50 + ATTN_PANEL_H - 4, "three status lines in the box");
  const q = S.quantGeometry(300, 50);
  assert.equal(q.barY - 50, 5);
  assert.ok(q.lineY - 6 >= q.barY + q.barH, "the first summary line under the bar");
  assert.ok(q.lineY + 4 * q.lineH + 6 <= 50 + QUANT_PANEL_H - 4, "five summary lines inside the panel's box");
});

test("steps say whether their attention ran in 8 bits; the summary counts them", () => {
  const att = (q8, host) => ({ attention: { q8, host } });
  let st = run([bitsEv(0, 8, att(0, 12)), bitsEv(1, 4, att(6, 6)), bitsEv(2, 4, att(6, 6))]);
  assert.equal(S.attention8(st.steps[0]), false);
  assert.equal(S.attention8(st.steps[1]), true);
  assert.equal(S.attentionColour(st.steps[0]), S.ATTN16_COLOUR);
  assert.equal(S.attentionColour(st.steps[1]), S.ATTN8_COLOUR);
  assert.equal(S.attentionColour(st.steps[3]), null);  // not run yet
  assert.equal(S.attentionSummary(st), "attention: 8-bit on 2 of 3 steps");
  assert.equal(S.describeStep(st, 1), "step 2/5: 4 bits · ind 0.01 · acc 0.02 · attn 8-bit");
  assert.equal(S.describeStep(st, 0), "step 1/5: 8 bits · ind 0 · acc 0 · attn 16-bit");
  st = S.applyBitsEvent(st, { node: "7", step: 3, total: 5, bits: null, skipped: true, mode: "delta" });
  assert.equal(S.attention8(st.steps[3]), null);  // a cached step ran no attention
  assert.equal(S.attentionSummary(st), "attention: 8-bit on 2 of 3 steps");
  // without a DVD-Quant 8-bit Attention node the events carry no attention: nothing is shown
  const plain = run([bitsEv(0, 8), bitsEv(1, 4)]);
  assert.equal(S.attentionSummary(plain), null);
  assert.equal(S.attentionColour(plain.steps[0]), null);
  assert.equal(S.describeStep(plain, 1), "step 2/5: 4 bits · ind 0.01 · acc 0.02");
  assert.equal(S.attentionSummary(run([bitsEv(0, 4, att(1, 0))])), "attention: 8-bit on 1 of 1 step");
});

test("the 8-bit Attention node's status: mode, calls 8-bit vs handed back, and why", () => {
  assert.deepEqual(S.attentionLines(null), ["status appears here when the node runs"]);
  let a = S.applyAttentionEvent(null, { node: "4", mode: "low-bit steps (δ-GBS)", pv: "fp8", q8: 0, host: 0,
    reasons: {}, running: false });
  assert.deepEqual(S.attentionLines(a), ["low-bit steps (δ-GBS) · P·V fp8", "no attention calls yet"]);
  a = S.applyAttentionEvent(a, { node: "4", mode: "low-bit steps (δ-GBS)", pv: "fp8", q8: 120, host: 360,
    reasons: { "fewer than 128 keys": 120, "a high-bit step": 240 }, running: true });
  assert.deepEqual(S.attentionLines(a), [
    "low-bit steps (δ-GBS) · P·V fp8",
    "8-bit: 120 of 480 calls · handed back: 360 (running)",
    "16-bit because: a high-bit step (240), fewer than 128 keys (120)",
  ]);
  a = S.applyAttentionEvent(a, { node: "4", mode: "always", pv: "auto", q8: 0, host: 40, running: false,
    reasons: { "the tensors are on cpu, and the 8-bit attention kernel runs on CUDA GPUs only": 40 } });
  assert.equal(S.attentionLines(a)[1], "8-bit: 0 of 40 calls · handed back: 40");
  assert.match(S.attentionLines(a)[2], /^16-bit because: the tensors are on cpu/);
  a = S.applyAttentionEvent(a, { node: "4", mode: "never", pv: "auto", q8: 0, host: 0, reasons: {} });
  assert.deepEqual(S.attentionLines(a), ["never: the model's own attention"]);
  a = S.applyAttentionEvent(null, { node: "4", mode: "always", pv: "fp16", q8: 10, host: 0, reasons: {} });
  assert.equal(S.attentionLines(a).length, 2);  // nothing handed back: no reason line
});

test("fitRight keeps the start of a long line", () => {
  const measure = (t) => t.length * 6;
  assert.equal(S.fitRight("short", 100, measure), "short");
  const fitted = S.fitRight("16-bit because: fewer than 128 keys (120)", 60, measure);
  assert.ok(fitted.endsWith("…") && measure(fitted) <= 60 && "16-bit because".startsWith(fitted.slice(0, -1)), fitted);
});
