// Browser half of the web panel check (driven by web_panel_check.py, which starts ComfyUI).
// Loads every example workflow in ComfyUI's real front end and compares what the front end makes
// of it (widget values, saved graph, API prompt) with the files; then runs the tiny workflow and
// records the DVD-Quant events and screenshots of the panels.
// Env: COMFY_URL, WF_DIR, TINY and TINY_SPLIT (UI workflow files), OUT_DIR, CHROMIUM, PLAYWRIGHT_CORE_DIR, PROFILE_DIR.
import { createRequire } from "node:module";
import fs from "node:fs";
import path from "node:path";

const require = createRequire(path.join(process.env.PLAYWRIGHT_CORE_DIR, "noop.js"));
const { chromium } = require("playwright-core");

const OUT = process.env.OUT_DIR;
const NAMES = ["wan2.1_t2v_1.3B_dvdq", "wan2.1_t2v_14B_dvdq", "wan2.2_t2v_A14B_dvdq", "hunyuan_video_t2v_dvdq",
               "hunyuan_video_i2v_dvdq"];
const readJson = (p) => JSON.parse(fs.readFileSync(p, "utf8"));
fs.mkdirSync(OUT, { recursive: true });

const context = await chromium.launchPersistentContext(process.env.PROFILE_DIR, {
  executablePath: process.env.CHROMIUM,
  headless: true,
  viewport: { width: 1400, height: 900 },
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const result = { workflows: {}, pageErrors: [], httpErrors: [] };
try {
  const page = await context.newPage();
  page.on("pageerror", (e) => result.pageErrors.push(`${e.message}\n${e.stack ?? ""}`));
  page.on("response", (r) => { if (r.status() >= 400) result.httpErrors.push(`${r.status()} ${r.url()}`); });
  await page.goto(process.env.COMFY_URL, { waitUntil: "domcontentloaded" });
  await page.waitForFunction(() => window.app?.graph && window.comfyAPI?.api, null, { timeout: 120000 });
  await page.waitForTimeout(2000);
  result.extensions = await page.evaluate(() => window.app.extensions.map((e) => e.name).filter((n) => n.startsWith("dvdq")));

  for (const name of NAMES) {
    result.workflows[name] = await page.evaluate(async ({ wf, api }) => {
      const { app } = window;
      await app.loadGraphData(structuredClone(wf));
      const problems = [];
      const saved = app.graph.serialize();
      for (const n of wf.nodes) {
        const node = app.graph.getNodeById(n.id);
        if (!node) { problems.push(`node ${n.id} ${n.type} missing`); continue; }
        const vals = (node.widgets ?? []).filter((w) => w.serialize !== false).map((w) => w.value);
        if (JSON.stringify(vals) !== JSON.stringify(n.widgets_values)) problems.push(`node ${n.id} ${n.type} widgets ${JSON.stringify(vals)}`);
        const again = saved.nodes.find((m) => m.id === n.id);
        if (JSON.stringify(again?.widgets_values) !== JSON.stringify(n.widgets_values)) problems.push(`saved node ${n.id} ${n.type}: ${JSON.stringify(again?.widgets_values)}`);
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
      app.canvas.ds.scale = 0.75; app.canvas.ds.offset = [40, 110]; app.graph.setDirtyCanvas(true, true);
      return { problems, nodes: app.graph._nodes.length };
    }, { wf: readJson(path.join(process.env.WF_DIR, `${name}.json`)), api: readJson(path.join(process.env.WF_DIR, "api", `${name}.json`)) });
    await page.waitForTimeout(500);
    await page.screenshot({ path: path.join(OUT, `${name}.png`) });
  }

  // The tiny run: real events from the server, drawn by the panel.
  await page.evaluate(async (wf) => {
    const { app } = window;
    const { api } = window.comfyAPI.api;
    const rec = (window.__dvdq = { bits: [], resets: 0, progress: 0, summaries: [], done: false, errors: [] });
    api.addEventListener("dvdq.bits", (e) => rec.bits.push(e.detail));
    api.addEventListener("dvdq.bits_reset", () => rec.resets++);
    api.addEventListener("dvdq.quant_progress", () => rec.progress++);
    api.addEventListener("dvdq.quant_summary", (e) => rec.summaries.push(e.detail));
    api.addEventListener("execution_success", () => { rec.done = true; });
    api.addEventListener("execution_error", (e) => { rec.errors.push(e.detail?.exception_message ?? "error"); rec.done = true; });
    await app.loadGraphData(structuredClone(wf));
    app.canvas.ds.scale = 1.0; app.canvas.ds.offset = [60, 120]; app.graph.setDirtyCanvas(true, true);
    await app.queuePrompt(0, 1);
  }, readJson(process.env.TINY));
  const loaderClip = { x: 90, y: 110, width: 340, height: 290 };
  const bitsClip = { x: 90, y: 380, width: 340, height: 320 };
  await page.waitForFunction(() => window.__dvdq.progress >= 10 || window.__dvdq.done, null, { timeout: 300000 });
  await page.screenshot({ path: path.join(OUT, "running_quantization.png"), clip: loaderClip });
  await page.waitForFunction(() => window.__dvdq.bits.length >= 8 || window.__dvdq.done, null, { timeout: 300000 });
  await page.screenshot({ path: path.join(OUT, "running_bits.png"), clip: bitsClip });
  await page.waitForFunction(() => window.__dvdq.done, null, { timeout: 300000 });
  await page.waitForTimeout(500);
  // Hover the 7th cell: the info line shows that step.
  const at = await page.evaluate(() => {
    const { app } = window;
    const node = app.graph._nodes.find((n) => n.type === "DVDQuantBitSwitch");
    const panel = node.widgets.find((w) => w.name === "dvdq_panel");
    const total = window.__dvdq.bits.at(-1)?.total ?? 20;
    const local = [node.pos[0] + 10 + (node.size[0] - 20) * (6.5 / total), node.pos[1] + panel.y + 28];
    const [x, y] = app.canvas.ds.convertOffsetToCanvas(local);
    const r = app.canvas.canvas.getBoundingClientRect();
    const dpr = window.devicePixelRatio || 1;
    return { x: r.left + x / dpr, y: r.top + y / dpr };
  });
  await page.mouse.move(at.x, at.y);
  await page.waitForTimeout(400);
  await page.screenshot({ path: path.join(OUT, "done_full.png") });
  await page.screenshot({ path: path.join(OUT, "web-panel.png"), clip: { x: 40, y: 80, width: 1130, height: 680 } });
  result.hoverText = await page.evaluate(() => window.app.graph._nodes.find((n) => n.type === "DVDQuantBitSwitch")._dvdqHover);
  result.events = await page.evaluate(() => window.__dvdq);

  // Two experts, two Bit Switch Schedulers, two KSamplerAdvanced splitting one schedule (Wan 2.2).
  await page.evaluate(async (wf) => {
    const { app } = window;
    Object.assign(window.__dvdq, { bits: [], resets: 0, progress: 0, summaries: [], done: false, errors: [] });
    await app.loadGraphData(structuredClone(wf));
    app.canvas.ds.scale = 0.8; app.canvas.ds.offset = [60, 230]; app.graph.setDirtyCanvas(true, true);
    await app.queuePrompt(0, 1);
  }, readJson(process.env.TINY_SPLIT));
  await page.waitForFunction(() => window.__dvdq.done, null, { timeout: 300000 });
  await page.waitForTimeout(500);
  await page.screenshot({ path: path.join(OUT, "split_schedule.png") });
  result.splitEvents = await page.evaluate(() => window.__dvdq);
  result.splitNodeTypes = await page.evaluate(() => Object.fromEntries(window.app.graph._nodes.map((n) => [String(n.id), n.type])));
} finally {
  await context.close();
}
console.log("RESULT " + JSON.stringify(result));
