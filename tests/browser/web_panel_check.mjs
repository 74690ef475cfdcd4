// Browser half of the web panel check (driven by web_panel_check.py, which starts ComfyUI).
// Loads every example workflow in ComfyUI's real front end and compares what the front end makes
// of it (widget values, saved graph, API prompt) with the files; then runs the tiny workflow (at
// the top level and with the DVD-Quant nodes inside a subgraph) and checks the panels by the
// PIXELS on the screen while it runs: the progress bar grows and turns into the summary, the bit
// strip's cells take the colours of the bits of the steps done so far, hovering a cell outlines it
// and changes the info line. Events received are recorded too, but a panel that receives them and
// is not repainted (e.g. a canvas-drawn widget in Nodes 2.0 that nobody asks to draw) shows
// nothing new on the screen: only the pixels tell.
// Env: COMFY_URL, WF_DIR, WF_NAMES (comma-separated), TINY and TINY_SPLIT (UI workflow files),
// OUT_DIR, MODE ("classic" or "vue": Nodes 2.0; the server's setting is made by the caller),
// CHROMIUM, PLAYWRIGHT_CORE_DIR, PROFILE_DIR.
import { createRequire } from "node:module";
import fs from "node:fs";
import path from "node:path";
import * as S from "../../web/dvdq_panel_state.js";

const require = createRequire(path.join(process.env.PLAYWRIGHT_CORE_DIR, "noop.js"));
const { chromium } = require("playwright-core");

const OUT = process.env.OUT_DIR;
const MODE = process.env.MODE ?? "classic";
const NAMES = (process.env.WF_NAMES ?? "").split(",").filter(Boolean);
const readJson = (p) => JSON.parse(fs.readFileSync(p, "utf8"));
fs.mkdirSync(OUT, { recursive: true });

// The panels' layout (the same functions the panel draws with), in the panel's own units from its
// top-left corner.
const { PAD } = S.LAYOUT;
const STRIP = S.stripGeometry(0, 0);
const STRIP_TOP = STRIP.stripY;
const STRIP_MID = STRIP.stripY + STRIP.stripH / 2;
const INFO = { top: STRIP.infoY - 7, bottom: STRIP.infoY + 7 };  // the info line (11 px text)
const QUANT = S.quantGeometry(0, 0);
const BAR_ROW = QUANT.barY + 1.5;  // a row of the progress bar above its text
const SUMMARY = { top: QUANT.lineY - 6, bottom: QUANT.lineY + 4 * QUANT.lineH + 6 };  // up to five lines

const hexRgb = (h) => [1, 3, 5].map((i) => parseInt(h.slice(i, i + 2), 16));
const REF = {
  empty: hexRgb(S.EMPTY_COLOUR), low: hexRgb(S.LOW_COLOUR), high: hexRgb(S.HIGH_COLOUR),
  skipped: hexRgb(S.SKIPPED_COLOUR), blue: hexRgb("#1565c0"), green: hexRgb("#2e7d32"),
};
function classify(rgb, names) {
  let best = "other";
  let bestD = 60;
  for (const n of names) {
    const d = REF[n].reduce((acc, c, i) => acc + Math.abs(c - rgb[i]), 0);
    if (d < bestD) { best = n; bestD = d; }
  }
  return best;
}

const context = await chromium.launchPersistentContext(process.env.PROFILE_DIR, {
  executablePath: process.env.CHROMIUM,
  headless: true,
  viewport: { width: 1400, height: 900 },
  deviceScaleFactor: 1,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const result = { mode: MODE, workflows: {}, pageErrors: [], httpErrors: [] };
const page = await context.newPage();

// ------------------------------------------------------------------ in-page helpers

// Where a node's panel is on the page: {x, y} of its top-left corner, its width in panel units
// and the page pixels per unit; and the node's rectangle. Classic: the node's panel widget on the
// graph canvas. Nodes 2.0: the <canvas> the front end made for the widget (drawn at y = 1).
function panelBoxInPage({ id, vue }) {
  const { app } = window;
  const node = app.canvas.graph.getNodeById(id);
  const panel = node?.widgets?.find((w) => w.name === "dvdq_panel");
  if (!panel) return { error: `node ${id}: no panel widget` };
  const el = document.querySelector(`[data-node-id="${id}"]`);
  if (vue) {
    if (!el) return { error: `node ${id}: no Nodes 2.0 element` };
    const canvases = [...el.querySelectorAll("canvas")];
    if (canvases.length !== 1) return { error: `node ${id}: ${canvases.length} <canvas> in the node` };
    const c = canvases[0];
    const r = c.getBoundingClientRect();
    const s = r.width / c.clientWidth;
    const nr = el.getBoundingClientRect();
    return { x: r.left, y: r.top + s, w: c.clientWidth, s, node: { x: nr.left, y: nr.top, w: nr.width, h: nr.height } };
  }
  if (el) return { error: `node ${id}: a Nodes 2.0 element in classic mode` };
  const cv = app.canvas.canvas;
  const cr = cv.getBoundingClientRect();
  const k = cr.width / cv.width;
  const ds = app.canvas.ds;
  const [x, y] = ds.convertOffsetToCanvas([node.pos[0], node.pos[1] + (panel.y ?? panel.last_y ?? 0)]);
  const [nx, ny] = ds.convertOffsetToCanvas([node.pos[0], node.pos[1] - 30]);  // with the title bar
  return {
    x: cr.left + x * k, y: cr.top + y * k, w: node.size[0], s: ds.scale * k,
    node: { x: cr.left + nx * k, y: cr.top + ny * k, w: node.size[0] * ds.scale * k, h: (node.size[1] + 30) * ds.scale * k },
  };
}

// Decodes a PNG screenshot and answers probes on it: points -> [r, g, b]; count -> pixels of a
// rectangle whose every channel is at least `min`; pixels -> the rectangle's pixels (RGB, flat).
async function probePng({ b64, clip, probes }) {
  const img = new Image();
  img.src = "data:image/png;base64," + b64;
  await img.decode();
  const c = document.createElement("canvas");
  c.width = img.width;
  c.height = img.height;
  const g = c.getContext("2d", { willReadFrequently: true });
  g.drawImage(img, 0, 0);
  const d = g.getImageData(0, 0, c.width, c.height).data;
  const at = (x, y) => {
    const px = Math.min(c.width - 1, Math.max(0, Math.floor(x - clip.x)));
    const py = Math.min(c.height - 1, Math.max(0, Math.floor(y - clip.y)));
    const i = (py * c.width + px) * 4;
    return [d[i], d[i + 1], d[i + 2]];
  };
  return probes.map((p) => {
    if (p.points) return p.points.map(([x, y]) => at(x, y));
    const out = [];
    let n = 0;
    for (let y = Math.floor(p.rect.y); y < p.rect.y + p.rect.h; y++) {
      for (let x = Math.floor(p.rect.x); x < p.rect.x + p.rect.w; x++) {
        const v = at(x, y);
        if (p.count) n += Math.min(...v) >= p.min ? 1 : 0;
        else out.push(...v);
      }
    }
    return p.count ? n : out;
  });
}

const box = (id) => page.evaluate(panelBoxInPage, { id, vue: MODE === "vue" });

/** One screenshot of the rectangle covering every probe, then the probes' answers. */
async function probe(probes) {
  const xs = [];
  const ys = [];
  for (const p of probes) {
    for (const [x, y] of p.points ?? [[p.rect.x, p.rect.y], [p.rect.x + p.rect.w, p.rect.y + p.rect.h]]) { xs.push(x); ys.push(y); }
  }
  const vp = page.viewportSize();
  const x0 = Math.max(0, Math.floor(Math.min(...xs)) - 2);
  const y0 = Math.max(0, Math.floor(Math.min(...ys)) - 2);
  const clip = { x: x0, y: y0, width: Math.min(vp.width, Math.ceil(Math.max(...xs)) + 3) - x0,
    height: Math.min(vp.height, Math.ceil(Math.max(...ys)) + 3) - y0 };
  const b64 = (await page.screenshot({ clip })).toString("base64");
  return page.evaluate(probePng, { b64, clip, probes });
}

// Probes of the panels, from their boxes: the strip's cell centres, the bar's top row, the
// summary's area, the info line, a cell's top edge (the hover outline).
function stripPoints(b, n) {
  return S.stripCells(n, PAD, b.w - 2 * PAD).map((c) => [b.x + (c.x + c.w / 2) * b.s, b.y + STRIP_MID * b.s]);
}
function barPoints(b, k = 60) {
  return Array.from({ length: k }, (_, i) => [b.x + (PAD + ((i + 0.5) / k) * (b.w - 2 * PAD)) * b.s, b.y + BAR_ROW * b.s]);
}
const rectOf = (b, x0, x1, y0, y1) => ({ x: b.x + x0 * b.s, y: b.y + y0 * b.s, w: (x1 - x0) * b.s, h: (y1 - y0) * b.s });
const summaryRect = (b) => rectOf(b, PAD, b.w - PAD, SUMMARY.top, SUMMARY.bottom);
const infoRect = (b) => rectOf(b, PAD, b.w - PAD, INFO.top, INFO.bottom);
function edgeRect(b, n, i) {
  const c = S.stripCells(n, PAD, b.w - 2 * PAD)[i];
  return rectOf(b, c.x + 2, c.x + c.w - 2, STRIP_TOP - 0.5, STRIP_TOP + 1.5);
}
const diffCount = (a, b) => {
  let n = 0;
  for (let i = 0; i < Math.min(a.length, b.length); i += 3) {
    if (Math.abs(a[i] - b[i]) + Math.abs(a[i + 1] - b[i + 1]) + Math.abs(a[i + 2] - b[i + 2]) > 60) n++;
  }
  return n;
};

// ------------------------------------------------------------------ runs

/** Closes the front end's dialogs (e.g. "Some Nodes Are Missing" after a workflow for a newer ComfyUI). */
async function closeDialogs() {
  const open = () => page.evaluate(() => [...document.querySelectorAll(".p-dialog, [role='dialog']")]
    .filter((d) => d.getBoundingClientRect().width > 0).length);
  for (let k = 0; k < 5 && (await open()); k++) {
    await page.keyboard.press("Escape");
    await page.waitForTimeout(300);
  }
  return open();
}

async function recordEvents() {
  await page.evaluate(() => {
    const { api } = window.comfyAPI.api;
    window.__dvdq = { bits: [], resets: 0, progress: [], summaries: [], done: false, errors: [] };
    if (window.__dvdqListening) return;
    window.__dvdqListening = true;
    const rec = () => window.__dvdq;
    api.addEventListener("dvdq.bits", (e) => rec().bits.push(e.detail));
    api.addEventListener("dvdq.bits_reset", () => rec().resets++);
    api.addEventListener("dvdq.quant_progress", (e) => rec().progress.push(e.detail));
    api.addEventListener("dvdq.quant_summary", (e) => rec().summaries.push(e.detail));
    api.addEventListener("execution_success", () => { rec().done = true; });
    api.addEventListener("execution_error", (e) => { rec().errors.push(e.detail?.exception_message ?? "error"); rec().done = true; });
  });
}

const counts = () => page.evaluate(() => ({
  bits: window.__dvdq.bits.length, progress: window.__dvdq.progress.length,
  summary: window.__dvdq.summaries.length, done: window.__dvdq.done,
}));

/**
 * Screenshots the two panels over and over while the prompt runs; each sample holds the event
 * counts before and after its screenshot and what the pixels show: the bar's fill (blue while
 * quantizing, green when done), light pixels in the summary area, the class of each strip cell.
 * Screenshots while quantizing and while sampling are kept for the docs.
 */
async function watch(ids, n, shotName) {
  const samples = [];
  let shotQ = false;
  let shotB = false;
  for (let k = 0; k < 4000; k++) {
    const before = await counts();
    const [qb, bb] = [await box(ids.quant), await box(ids.bits)];
    if (qb.error || bb.error) return { samples, error: qb.error ?? bb.error };
    const [bar, light, cells] = await probe([
      { points: barPoints(qb) }, { rect: summaryRect(qb), count: true, min: 170 }, { points: stripPoints(bb, n) },
    ]);
    const after = await counts();
    const barCls = bar.map((v) => classify(v, ["empty", "blue", "green"]));
    samples.push({
      before, after, light,
      blue: barCls.filter((c) => c === "blue").length / bar.length,
      green: barCls.filter((c) => c === "green").length / bar.length,
      cells: cells.map((v) => classify(v, ["empty", "low", "high", "skipped"])),
    });
    const s = samples.at(-1);
    if (!shotQ && !after.summary && s.blue > 0.3 && s.blue < 0.9) {
      shotQ = true;
      await page.screenshot({ path: path.join(OUT, `${shotName}_quantizing.png`), clip: clipOf(qb.node) });
    }
    if (!shotB && before.bits >= n * 0.35 && !after.done) {
      shotB = true;
      await page.screenshot({ path: path.join(OUT, `${shotName}_sampling.png`), clip: clipOf(bb.node) });
    }
    if (before.done) break;
  }
  return { samples };
}

function clipOf(r, m = 8) {
  const vp = page.viewportSize();
  const x = Math.max(0, Math.floor(r.x - m));
  const y = Math.max(0, Math.floor(r.y - m));
  return { x, y, width: Math.min(vp.width - x, Math.ceil(r.w + 2 * m)), height: Math.min(vp.height - y, Math.ceil(r.h + 2 * m)) };
}

/** What the samples show, as problems (empty: the panels filled live as the events came). */
function judgeLive(samples, n, events) {
  const problems = [];
  const total = events.progress.at(-1)?.total ?? 0;
  // Quantization: a bar part-filled in step with the progress events, then the summary.
  const mid = samples.filter((s) => s.before.progress > 0 && !s.after.summary && total);
  const midBars = mid.filter((s) => s.blue > 0 && s.blue < 1);
  const behind = mid.filter((s) => s.blue + s.green < (s.before.progress - 1) / total - 0.05);
  if (!midBars.length) problems.push(`quantizing: no screenshot with a part-filled bar (${mid.length} taken while quantizing)`);
  if (behind.length) problems.push(`quantizing: bar behind the events in ${behind.length} of ${mid.length} screenshots (e.g. ${Math.round(behind[0].blue * total)}/${total} drawn, ${behind[0].before.progress} received)`);
  if (new Set(midBars.map((s) => Math.round(s.blue * 20))).size < 2) problems.push("quantizing: the bar did not grow between screenshots");
  const withSummary = samples.filter((s) => s.before.summary);
  const end = samples.at(-1);
  if (!withSummary.length || end.green < 0.95) problems.push(`summary: bar ${Math.round((end?.green ?? 0) * 100)}% green at the end`);
  if (!(end?.light > 150)) problems.push(`summary: ${end?.light} light pixels in the summary area (its text)`);
  if (mid.length && !(Math.min(...mid.map((s) => s.light)) < 40)) problems.push("summary area not empty while quantizing");
  // Sampling: the strip's filled cells are a prefix that follows the bits events.
  const filled = (s) => s.cells.filter((c) => c === "low" || c === "high").length;
  const during = samples.filter((s) => s.before.bits > 0 && !s.before.done && s.before.bits < n);
  const partial = during.filter((s) => filled(s) > 0 && filled(s) < n);
  const off = during.filter((s) => filled(s) < s.before.bits - 1 || filled(s) > s.after.bits);
  const notPrefix = during.filter((s) => s.cells.some((c, i) => (i < filled(s)) !== (c === "low" || c === "high")));
  if (new Set(partial.map(filled)).size < 3) problems.push(`sampling: strip seen part-filled at ${[...new Set(partial.map(filled))]} cells only (${during.length} screenshots while sampling)`);
  if (off.length) problems.push(`sampling: cells filled out of step with the events in ${off.length} of ${during.length} screenshots (e.g. ${filled(off[0])} drawn, ${off[0].before.bits}..${off[0].after.bits} received)`);
  if (notPrefix.length) problems.push(`sampling: filled cells not the first ones in ${notPrefix.length} screenshots`);
  const want = Array.from({ length: n }, (_, i) => {
    const b = events.bits.find((e) => e.step === i);
    return b ? (b.skipped ? "skipped" : b.bits <= 4 ? "low" : "high") : "empty";
  });
  if (JSON.stringify(end?.cells) !== JSON.stringify(want)) problems.push(`final strip ${end?.cells} but events say ${want}`);
  return {
    problems,
    seen: {
      screenshots: samples.length, whileQuantizing: mid.length,
      barFractions: [...new Set(midBars.map((s) => Math.round(s.blue * 100) / 100))],
      whileSampling: during.length, filledCounts: [...new Set(during.map(filled))],
      finalStrip: end?.cells.map((c) => ({ low: "L", high: "H", empty: ".", skipped: "s" }[c] ?? "?")).join(""),
      summaryLightPixels: end?.light,
    },
  };
}

/** Hovers cell `i`: its outline and the info line must change on the screen, and go back after. */
async function checkHover(bitsId, n, i, shotPath, shotClip) {
  const problems = [];
  const b = await box(bitsId);
  const edges = (bx) => [{ rect: edgeRect(bx, n, i), count: true, min: 200 }, { rect: edgeRect(bx, n, i - 1), count: true, min: 200 },
    { rect: infoRect(bx) }];
  const [e0, o0, info0] = await probe(edges(b));
  const [x, y] = stripPoints(b, n)[i];
  await page.mouse.move(x - 20, y + 40);
  await page.mouse.move(x, y, { steps: 4 });
  await page.waitForTimeout(400);
  const [e1, o1, info1] = await probe(edges(b));
  const state = await page.evaluate((id) => window.app.canvas.graph.getNodeById(id)._dvdqHover, bitsId);
  if (shotPath) await page.screenshot({ path: shotPath, clip: shotClip });
  const infoChanged = diffCount(info0, info1);
  const outline = e1 - e0;
  if (state !== i) problems.push(`hover: the node's hovered cell is ${state}, expected ${i}`);
  if (!(outline >= 4)) problems.push(`hover: no outline on the hovered cell (${e0} -> ${e1} white pixels on its top edge)`);
  if (o1 - o0 > 2) problems.push("hover: the cell next to it got an outline too");
  if (!(infoChanged >= 20)) problems.push(`hover: the info line did not change on the screen (${infoChanged} pixels)`);
  await page.mouse.move(x, y + 160, { steps: 4 });  // off the panel
  await page.waitForTimeout(400);
  const [e2, , info2] = await probe(edges(b));
  if (e2 - e0 > 2) problems.push("hover: the outline stayed after the pointer left");
  if (diffCount(info0, info2) > 5) problems.push("hover: the info line did not come back after the pointer left");
  return { problems, seen: { outlinePixels: outline, infoPixelsChanged: infoChanged, hoveredCell: state } };
}

/** Loads the tiny workflow (nodes in a subgraph when asked), runs it and checks the panels. */
async function panelRun(wf, { subgraph, name, shots }) {
  await recordEvents();
  const ids = await page.evaluate(async ({ wf, subgraph }) => {
    const { app } = window;
    await app.loadGraphData(structuredClone(wf));
    const find = (g, type) => (g.nodes ?? g._nodes).find((n) => n.type === type);
    let graph = app.graph;
    if (subgraph) {
      const inner = new Set([find(graph, "DVDQuantLoader"), find(graph, "DVDQuantBitSwitch")]);
      const made = graph.convertToSubgraph(inner);
      if (app.canvas.openSubgraph) app.canvas.openSubgraph(made.subgraph, made.node);
      else app.canvas.setGraph(made.subgraph);
      graph = made.subgraph;
    }
    const quant = find(graph, "DVDQuantLoader");
    const bits = find(graph, "DVDQuantBitSwitch");
    const x0 = Math.min(quant.pos[0], bits.pos[0]);
    const y0 = Math.min(quant.pos[1], bits.pos[1]);
    app.canvas.ds.scale = 1.0;
    app.canvas.ds.offset = [90 - x0, 170 - y0];
    app.canvas.setDirty(true, true);
    return { quant: quant.id, bits: bits.id, graph: app.canvas.graph === app.graph ? "root" : "subgraph" };
  }, { wf, subgraph });
  await page.waitForTimeout(1500);
  const run = { ids };
  if (await closeDialogs()) return { ...run, problems: ["a dialog of the front end stays over the canvas"] };
  const b0 = await box(ids.bits);
  if (b0.error) return { ...run, problems: [b0.error] };
  const n = 20;
  await page.evaluate(() => window.app.queuePrompt(0, 1));
  const watched = await watch(ids, n, name);
  if (watched.error) return { ...run, problems: [watched.error] };
  await page.waitForFunction(() => window.__dvdq.done, null, { timeout: 300000 });
  await page.waitForTimeout(500);
  run.events = await page.evaluate(() => window.__dvdq);
  const live = judgeLive(watched.samples, n, run.events);
  const [qb, bb] = [await box(ids.quant), await box(ids.bits)];
  const both = {
    x: Math.min(qb.node.x, bb.node.x), y: Math.min(qb.node.y, bb.node.y),
    w: Math.max(qb.node.x + qb.node.w, bb.node.x + bb.node.w) - Math.min(qb.node.x, bb.node.x),
    h: Math.max(qb.node.y + qb.node.h, bb.node.y + bb.node.h) - Math.min(qb.node.y, bb.node.y),
  };
  both.y -= 14;  // the node badges above the title bar
  both.h += 14;
  const hover = await checkHover(ids.bits, n, 6, shots ? path.join(OUT, `${name}_done_hover.png`) : null, clipOf(both, 12));
  await page.screenshot({ path: path.join(OUT, `${name}_full.png`) });
  const problems = [...live.problems, ...hover.problems];
  if (run.events.errors.length) problems.push(`the run failed: ${run.events.errors}`);
  const ev = run.events;
  if (ev.resets < 1) problems.push("no dvdq.bits_reset event");
  if (JSON.stringify(ev.bits.map((b) => b.step).sort((a, b) => a - b)) !== JSON.stringify([...Array(n).keys()])) {
    problems.push(`dvdq.bits steps ${ev.bits.map((b) => b.step)}, expected 0..${n - 1}`);
  }
  if (ev.summaries.length !== 1 || ev.summaries[0].layers !== ev.progress.length) problems.push(`quant events: ${ev.progress.length} progress, ${ev.summaries.length} summaries`);
  if (subgraph && !ev.bits.every((b) => String(b.node).includes(":"))) problems.push(`subgraph run: event node ids ${[...new Set(ev.bits.map((b) => b.node))]} (expected "<subgraph node>:<node>")`);
  return { ...run, problems, live: live.seen, hover: hover.seen };
}

// ------------------------------------------------------------------ main

try {
  page.on("pageerror", (e) => result.pageErrors.push(`${e.message}\n${e.stack ?? ""}`));
  page.on("response", (r) => { if (r.status() >= 400) result.httpErrors.push(`${r.status()} ${r.url()}`); });
  await page.goto(process.env.COMFY_URL, { waitUntil: "domcontentloaded" });
  await page.waitForFunction(() => window.app?.graph && window.app?.canvas && window.comfyAPI?.api, null, { timeout: 120000 });
  await page.waitForTimeout(3000);
  result.frontendVersion = await page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__ ?? null);
  result.extensions = await page.evaluate(() => window.app.extensions.map((e) => e.name).filter((n) => n.startsWith("dvdq")));
  await closeDialogs();  // one the front end may open on its first start

  for (const name of NAMES) {
    result.workflows[name] = await page.evaluate(async ({ wf, api }) => {
      const { app } = window;
      await app.loadGraphData(structuredClone(wf));
      const problems = [];
      const saved = app.graph.serialize();
      // A node without widgets may be saved without widgets_values (front end 1.58).
      const values = (v) => JSON.stringify(v ?? []);
      for (const n of wf.nodes) {
        const node = app.graph.getNodeById(n.id);
        if (!node) { problems.push(`node ${n.id} ${n.type} missing`); continue; }
        const vals = (node.widgets ?? []).filter((w) => w.serialize !== false).map((w) => w.value);
        if (values(vals) !== values(n.widgets_values)) problems.push(`node ${n.id} ${n.type} widgets ${JSON.stringify(vals)}`);
        const again = saved.nodes.find((m) => m.id === n.id);
        if (values(again?.widgets_values) !== values(n.widgets_values)) problems.push(`saved node ${n.id} ${n.type}: ${JSON.stringify(again?.widgets_values)}`);
      }
      const sorted = (o) => JSON.stringify(Object.fromEntries(Object.entries(o).sort()));
      const prompt = (await app.graphToPrompt()).output;
      for (const [id, entry] of Object.entries(api)) {
        const got = prompt[id];
        if (!got || got.class_type !== entry.class_type || sorted(got.inputs) !== sorted(entry.inputs)) {
          problems.push(`prompt node ${id} ${entry.class_type}: ${JSON.stringify(got?.inputs)}`);
        }
      }
      if (Object.keys(prompt).length !== Object.keys(api).length) problems.push(`prompt has ${Object.keys(prompt).length} nodes`);
      app.canvas.ds.scale = 0.75; app.canvas.ds.offset = [40, 110]; app.canvas.setDirty(true, true);
      return { problems, nodes: (app.graph.nodes ?? app.graph._nodes).length };
    }, { wf: readJson(path.join(process.env.WF_DIR, `${name}.json`)), api: readJson(path.join(process.env.WF_DIR, "api", `${name}.json`)) });
    await page.waitForTimeout(500);
    await page.screenshot({ path: path.join(OUT, `workflow_${name}.png`) });
    await closeDialogs();
  }

  // The tiny run, then the same with the DVD-Quant nodes inside a subgraph (opened on the canvas).
  result.tiny = await panelRun(readJson(process.env.TINY), { subgraph: false, name: "panel", shots: true });
  result.subgraph = await panelRun(readJson(process.env.TINY), { subgraph: true, name: "subgraph", shots: true });

  // Two experts, two Bit Switch Schedulers, two KSamplerAdvanced splitting one schedule (Wan 2.2).
  await recordEvents();
  await page.evaluate(async (wf) => {
    const { app } = window;
    await app.loadGraphData(structuredClone(wf));
    app.canvas.ds.scale = 0.8; app.canvas.ds.offset = [60, 230]; app.canvas.setDirty(true, true);
    await app.queuePrompt(0, 1);
  }, readJson(process.env.TINY_SPLIT));
  await page.waitForFunction(() => window.__dvdq.done, null, { timeout: 300000 });
  await page.waitForTimeout(500);
  await page.screenshot({ path: path.join(OUT, "split_schedule.png") });
  result.splitEvents = await page.evaluate(() => window.__dvdq);
  result.splitNodeTypes = await page.evaluate(() => Object.fromEntries((window.app.graph.nodes ?? window.app.graph._nodes).map((n) => [String(n.id), n.type])));
} catch (e) {
  result.fatal = `${e.message}\n${e.stack ?? ""}`;
  await page.screenshot({ path: path.join(OUT, "fatal.png") }).catch(() => {});
} finally {
  await context.close();
}
console.log("RESULT " + JSON.stringify(result));
