// Pure logic of the DVD-Quant panels: per-node state built from the server's events, colours,
// text and layout. No DOM or ComfyUI imports, so `node --test web/tests/` can test it.
// (ComfyUI imports every .js file of the pack's web folder; this one only defines functions.)

export const EVENTS = Object.freeze({
  bits: "dvdq.bits",
  bitsReset: "dvdq.bits_reset",
  quantProgress: "dvdq.quant_progress",
  quantSummary: "dvdq.quant_summary",
  attention: "dvdq.attention",
});

// Bits 4 and 8 get two easily told apart colours (the paper's bit strip: low-bit steps light,
// high-bit steps dark); widths between them are blended, 16 (full precision) is grey.
export const LOW_COLOUR = "#4fc3f7";
export const HIGH_COLOUR = "#e65100";
export const FULL_COLOUR = "#9e9e9e";
export const EMPTY_COLOUR = "#2b2b2b";
// a step a cache (EasyCache, LazyCache) served without running the model
export const SKIPPED_COLOUR = "#5c5c5c";
// the thin mark under a step whose attention ran in 8 bits (DVD-Quant 8-bit Attention), and under one
// whose attention stayed 16-bit
export const ATTN8_COLOUR = "#ce93d8";
export const ATTN16_COLOUR = "#4a4a4a";

function hexToRgb(hex) {
  const v = parseInt(hex.slice(1), 16);
  return [(v >> 16) & 255, (v >> 8) & 255, v & 255];
}

function rgbToHex(rgb) {
  return "#" + rgb.map((c) => Math.round(c).toString(16).padStart(2, "0")).join("");
}

/** Colour of a cell that ran at `bits`, blending from `low` (LOW_COLOUR) to `high` (HIGH_COLOUR). */
export function bitsColour(bits, low = 4, high = 8) {
  if (!Number.isFinite(bits)) return EMPTY_COLOUR;
  if (bits >= 16) return FULL_COLOUR;
  if (high <= low) return bits <= low ? LOW_COLOUR : HIGH_COLOUR;
  const t = Math.min(1, Math.max(0, (bits - low) / (high - low)));
  const a = hexToRgb(LOW_COLOUR);
  const b = hexToRgb(HIGH_COLOUR);
  return rgbToHex(a.map((c, i) => c + (b[i] - c) * t));
}

/** Colour of a strip cell: its bits, a skipped step's grey, or empty (not run yet). */
export function cellColour(s, low = 4, high = 8) {
  if (!s) return EMPTY_COLOUR;
  if (s.skipped) return SKIPPED_COLOUR;
  return bitsColour(s.bits, low, high);
}

// ---------------------------------------------------------------- bit strip (Bit Switch node)

export function emptyBitStrip() {
  return { steps: [], total: null, mode: null, updated: 0 };
}

/**
 * State after one `dvdq.bits` event. `steps[step]` holds that step's record; a step seen again
 * (a sampler that calls the model twice per step) overwrites it. Returns a new object.
 */
export function applyBitsEvent(strip, ev) {
  const step = Number(ev.step);
  if (!Number.isInteger(step) || step < 0) return strip;
  const steps = strip.steps.slice();
  steps[step] = ev.skipped
    ? { bits: null, skipped: true, indicator: null, accumulated: null, attention: null }  // a cache served it
    : {
      bits: Number(ev.bits),
      indicator: ev.indicator == null ? null : Number(ev.indicator),
      accumulated: ev.accumulated == null ? null : Number(ev.accumulated),
      // the step's attention calls that ran in 8 bits / went to 16-bit attention (null: no 8-bit Attention node)
      attention: ev.attention == null ? null : { q8: Number(ev.attention.q8), host: Number(ev.attention.host) },
    };
  const total = ev.total == null ? strip.total : Number(ev.total);
  return { steps, total, mode: ev.mode ?? strip.mode, updated: strip.updated + 1 };
}

/** Number of cells to draw: the run's step count when known, else the steps seen so far. */
export function cellCount(strip) {
  return Math.max(strip.total ?? 0, strip.steps.length);
}

/** Mean activation bits over the steps seen (null before the first step). */
export function averageBits(strip) {
  const seen = strip.steps.filter((s) => s && Number.isFinite(s.bits));
  if (!seen.length) return null;
  return seen.reduce((acc, s) => acc + s.bits, 0) / seen.length;
}

/** Counts of steps per bit width, e.g. {4: 12, 8: 8}. */
export function bitsHistogram(strip) {
  const counts = {};
  for (const s of strip.steps) if (s && Number.isFinite(s.bits)) counts[s.bits] = (counts[s.bits] ?? 0) + 1;
  return counts;
}

/** "W4A5.6" (one decimal, trailing ".0" dropped); "W4A–" before any step. */
export function precisionLabel(wBits, avg) {
  const w = Number.isFinite(wBits) ? `W${wBits}` : "W?";
  if (avg == null || !Number.isFinite(avg)) return `${w}A–`;
  return `${w}A${trimNumber(avg, 1)}`;
}

export function trimNumber(x, digits) {
  const s = x.toFixed(digits);
  return s.includes(".") ? s.replace(/0+$/, "").replace(/\.$/, "") : s;
}

/** Whether a step's attention ran in 8 bits (any of its calls): true / false, null if not reported. */
export function attention8(s) {
  if (!s || s.skipped || !s.attention) return null;
  return s.attention.q8 > 0;
}

/** Colour of the thin attention mark under a cell, or null (nothing to draw). */
export function attentionColour(s) {
  const a = attention8(s);
  return a == null ? null : a ? ATTN8_COLOUR : ATTN16_COLOUR;
}

/** "attention: 8-bit on 12 of 20 steps" over the steps that reported it; null when none did. */
export function attentionSummary(strip) {
  const known = strip.steps.map(attention8).filter((a) => a != null);
  if (!known.length) return null;
  const n8 = known.filter(Boolean).length;
  return `attention: 8-bit on ${n8} of ${known.length} step${known.length === 1 ? "" : "s"}`;
}

/** One line about a step, for the hovered cell or the newest one. */
export function describeStep(strip, i) {
  const s = strip.steps[i];
  const total = cellCount(strip);
  // A hole before the newest step was run elsewhere: by the other expert's scheduler when two
  // samplers split one schedule (Wan 2.2), which carries the step count over.
  if (!s) return `step ${i + 1}/${total}: ${i < lastStepIndex(strip) ? "not run by this node" : "not run yet"}`;
  if (s.skipped) return `step ${i + 1}/${total}: skipped (a cache reused its output; the model did not run)`;
  const parts = [`step ${i + 1}/${total}: ${s.bits} bits`];
  if (s.indicator != null && Number.isFinite(s.indicator)) parts.push(`ind ${formatSmall(s.indicator)}`);
  if (s.accumulated != null && Number.isFinite(s.accumulated)) parts.push(`acc ${formatSmall(s.accumulated)}`);
  const a = attention8(s);
  if (a != null) parts.push(`attn ${a ? "8" : "16"}-bit`);
  return parts.join(" · ");
}

/** Short text for a small float: 0.0123, 1.23e-5, 12.3. */
export function formatSmall(x) {
  if (x === 0) return "0";
  const a = Math.abs(x);
  if (a >= 100) return x.toFixed(0);
  if (a >= 0.001) return Number(x.toPrecision(3)).toString();
  return x.toExponential(1);
}

/** Index of the newest step recorded (the highest index), or -1. */
export function lastStepIndex(strip) {
  for (let i = strip.steps.length - 1; i >= 0; i--) if (strip.steps[i]) return i;
  return -1;
}

/**
 * Cell rectangles of the strip inside [x, x + width]: equal cells with a 1 px gap while they
 * are at least 3 px wide, touching cells when many steps crowd a narrow node.
 */
export function stripCells(count, x, width) {
  if (count <= 0 || width <= 0) return [];
  const gap = width / count >= 4 ? 1 : 0;
  const w = (width - gap * (count - 1)) / count;
  return Array.from({ length: count }, (_, i) => ({ x: x + i * (w + gap), w }));
}

// Panel layout, in the node's units from the panel's top-left corner (also read by the browser
// check). The panels' heights are BIT_PANEL_H and QUANT_PANEL_H in dvdq_panel.js.
export const LAYOUT = Object.freeze({
  PAD: 10,  // left and right margin of the contents
});

/**
 * Where the Bit Switch panel drawn `width` wide at `y` puts its strip, the attention mark under it, the
 * accumulated-change line, the info text and the attention summary line (text lines: their centres).
 */
export function stripGeometry(width, y) {
  const { PAD } = LAYOUT;
  return {
    x: PAD, w: width - 2 * PAD, stripY: y + 20, stripH: 16, attnY: y + 37, attnH: 2, lineY: y + 40, lineH: 16,
    infoY: y + 66, attnLineY: y + 80,
  };
}

/** Where the 8-bit Attention panel drawn `width` wide at `y` puts its three status lines (centres). */
export function attentionGeometry(width, y) {
  const { PAD } = LAYOUT;
  return { x: PAD, w: width - 2 * PAD, lineY: y + 10, lineH: 13 };
}

/** Where the Loader / Apply panel drawn `width` wide at `y` puts its bar and its summary lines (centres). */
export function quantGeometry(width, y) {
  const { PAD } = LAYOUT;
  return { x: PAD, w: width - 2 * PAD, barY: y + 5, barH: 14, lineY: y + 29, lineH: 13 };
}

/** Cell index under a local x, or -1. */
export function cellAt(count, x, width, px) {
  if (count <= 0 || px < x || px >= x + width) return -1;
  return Math.min(count - 1, Math.floor(((px - x) / width) * count));
}

/**
 * Points of the accumulated-change line (one per recorded step) scaled into a box of height h:
 * y = 0 is the top. The scale is max(delta, largest value) so the δ threshold stays in view.
 * Returns {points: [{i, y}], thresholdY}; thresholdY is null when δ is unknown or not positive.
 */
export function accumulatedLine(strip, h, delta) {
  const vals = strip.steps.map((s) => (s && Number.isFinite(s.accumulated) ? s.accumulated : null));
  const top = Math.max(Number.isFinite(delta) && delta > 0 ? delta : 0, ...vals.filter((v) => v != null), 1e-12);
  const y = (v) => h - (Math.max(0, v) / top) * h;
  const points = [];
  vals.forEach((v, i) => { if (v != null) points.push({ i, y: y(v) }); });
  return { points, thresholdY: Number.isFinite(delta) && delta > 0 ? y(delta) : null };
}

// ---------------------------------------------------------------- quantization (Loader / Apply)

export function emptyQuant() {
  return { progress: null, summary: null };
}

/**
 * State after a `dvdq.quant_progress` event. Progress only comes before a run's summary, so it
 * means a run is under way and any older summary is dropped.
 */
export function applyProgressEvent(q, ev) {
  return {
    progress: { done: Number(ev.done), total: Number(ev.total), layer: String(ev.layer ?? "") },
    summary: null,
  };
}

/** State after a `dvdq.quant_summary` event: the progress bar is complete, the summary shown. */
export function applySummaryEvent(q, ev) {
  const layers = Number(ev.layers);
  return {
    progress: { done: layers, total: layers, layer: "" },
    summary: {
      layers,
      wBits: Number(ev.w_bits),
      bytesBefore: Number(ev.bytes_before),
      bytesAfter: Number(ev.bytes_after),
      meanRelError: ev.mean_rel_error == null ? null : Number(ev.mean_rel_error),
      seconds: Number(ev.seconds),
      source: ev.source === "loaded" ? "loaded" : "quantized",
      // Wan and HunyuanVideo: the block's elementwise steps run as fused kernels (null for other models)
      fusedSteps: ev.fused_steps == null ? null : Number(ev.fused_steps),
      fusionOff: ev.fusion_off ?? null,
      // which compute backend runs the quantized layers ("triton", or "reference (why)")
      backend: ev.backend == null ? null : String(ev.backend),
    },
  };
}

/** Fraction in [0, 1] for the progress bar. */
export function progressFraction(p) {
  if (!p || !(p.total > 0)) return 0;
  return Math.min(1, Math.max(0, p.done / p.total));
}

/** "1.41 GiB", "512 KiB", "100 B" (binary units, three significant digits). */
export function formatBytes(n) {
  if (!Number.isFinite(n) || n < 0) return "?";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  if (i === 0) return `${n} B`;
  return `${Number(n.toPrecision(3))} ${units[i]}`;
}

export function formatSeconds(s) {
  if (!Number.isFinite(s)) return "?";
  if (s < 10) return `${s.toFixed(2)} s`;
  if (s < 120) return `${s.toFixed(1)} s`;
  return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}

/** The progress line: "quantizing 12/420 blocks.3.ffn.0". */
export function progressLine(p) {
  if (!p) return "";
  return `quantizing ${p.done}/${p.total}${p.layer ? " " + p.layer : ""}`;
}

/** The summary lines drawn under the bar. */
export function summaryLines(s) {
  if (!s) return [];
  const ratio = s.bytesAfter > 0 ? ` (${trimNumber(s.bytesBefore / s.bytesAfter, 1)}×)` : "";
  const how = s.source === "loaded" ? "loaded pre-quantized" : "quantized";
  const err = s.meanRelError == null || !Number.isFinite(s.meanRelError) ? "–" : formatSmall(s.meanRelError);
  const lines = [
    `W${s.wBits} · ${s.layers} layers ${how} in ${formatSeconds(s.seconds)}`,
    `${formatBytes(s.bytesBefore)} → ${formatBytes(s.bytesAfter)}${ratio}`,
    `mean rel. error ${err}`,
  ];
  if (s.fusionOff) lines.push(`fused elementwise steps off: ${s.fusionOff}`);
  else if (s.fusedSteps > 0) lines.push(`elementwise steps fused in ${s.fusedSteps} modules`);
  if (s.backend) lines.push(`backend ${s.backend}`);
  return lines;
}

/** Shortens text from the left ("…ks.12.ffn.0") until measure(text) fits maxWidth. */
export function fitLeft(text, maxWidth, measure) {
  if (measure(text) <= maxWidth) return text;
  let t = text;
  while (t.length > 1 && measure("…" + t) > maxWidth) t = t.slice(1);
  return "…" + t;
}

/** Shortens text from the right ("fewer than 128 ke…") until measure(text) fits maxWidth. */
export function fitRight(text, maxWidth, measure) {
  if (measure(text) <= maxWidth) return text;
  let t = text;
  while (t.length > 1 && measure(t + "…") > maxWidth) t = t.slice(0, -1);
  return t + "…";
}

// ---------------------------------------------------------------- DVD-Quant 8-bit Attention

/** State after a `dvdq.attention` event: the node's mode and its calls in the current (or last) run. */
export function applyAttentionEvent(a, ev) {
  const reasons = {};
  for (const [k, n] of Object.entries(ev.reasons ?? {})) reasons[String(k)] = Number(n);
  return {
    mode: String(ev.mode ?? ""),
    pv: String(ev.pv ?? ""),
    q8: Number(ev.q8 ?? 0),
    host: Number(ev.host ?? 0),
    reasons,
    running: Boolean(ev.running),
  };
}

/** The attention node's status lines: mode, calls 8-bit vs handed back, the reasons (most calls first). */
export function attentionLines(a) {
  if (!a) return ["status appears here when the node runs"];
  const lines = [a.mode === "never" ? "never: the model's own attention" : `${a.mode} · P·V ${a.pv}`];
  if (a.mode === "never") return lines;
  const total = a.q8 + a.host;
  if (!total) {
    lines.push(a.running ? "sampling: no attention call yet" : "no attention calls yet");
    return lines;
  }
  lines.push(`8-bit: ${a.q8} of ${total} calls · handed back: ${a.host}${a.running ? " (running)" : ""}`);
  const why = Object.entries(a.reasons).sort((p, q) => q[1] - p[1]).map(([k, n]) => `${k} (${n})`);
  if (why.length) lines.push(`16-bit because: ${why.join(", ")}`);
  return lines;
}
