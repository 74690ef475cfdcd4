"""Checks the web panel and the example workflows in a real ComfyUI with its front end, in headless
Chromium (not part of CI: it needs a ComfyUI install, Chromium and playwright-core).

    COMFYUI_PATH=/path/to/ComfyUI python tests/browser/web_panel_check.py \
        --playwright-dir DIR_WITH_node_modules --out shots/ [--front-end-root DIR] [--modes classic,vue]

What it does: copies this pack and test-only nodes (random Wan text conditioning, as the real text
encoder is gigabytes; a node that slows each sampling step and a hook that slows each quantization
progress event, so that screenshots can catch the panels half-way) into a temporary ComfyUI base
directory, builds a tiny random-weight Wan 2.1 T2V checkpoint from ComfyUI's own WanModel, starts
ComfyUI with --cpu (and --front-end-root DIR when given: the `comfyui_frontend_package/static`
folder of any front-end wheel), then for each mode (classic: the LiteGraph canvas; vue: "Nodes
2.0", setting Comfy.VueNodes.Enabled) web_panel_check.mjs loads each example workflow in the front
end (widget values, saved graph and API prompt must equal the files), runs Loader -> Bit Switch
Scheduler -> ModelSamplingSD3 -> KSampler on the tiny model, at the top level and with the two
DVD-Quant nodes inside a subgraph, and checks the panels by their pixels on the screen while it
runs (the progress bar, the summary, the strip's cells, the hover outline and info line), with
screenshots. Exit status 0 when all holds.
"""
import argparse
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "workflows"))

import make_workflows  # noqa: E402
import node_specs  # noqa: E402

TINY_MODEL = "tiny_wan_t2v_random.safetensors"
TINY_MODEL_2 = "tiny_wan_t2v_random_2.safetensors"
STEPS = 20

BUILD_TINY = r"""
import sys, torch
import comfy.options
comfy.options.enable_args_parsing()
out, seed = sys.argv[1], sys.argv[2]
sys.argv = [sys.argv[0], "--cpu"]
import comfy.cli_args, comfy.ops
from comfy.ldm.wan.model import WanModel
from safetensors.torch import save_file
torch.manual_seed(int(seed))
m = WanModel(dim=256, ffn_dim=512, num_heads=2, num_layers=4, text_dim=4096, in_dim=16, out_dim=16,
             operations=comfy.ops.disable_weight_init)
sd = {}
for k, v in m.state_dict().items():
    t = torch.ones(v.shape) if ("norm" in k and v.dim() == 1) else torch.randn(v.shape) * (0.02 if v.dim() > 1 else 0.1)
    sd[k] = t.to(torch.float16).contiguous()
save_file(sd, out)
"""

SLOW_STEP = 0.25  # seconds added to each model call of the tiny run (the test-only slow node)
SLOW_LAYER = 0.1  # seconds added after each quantization progress event

TEST_NODES = '''"""Test-only nodes of the web panel check: seeded random Wan text conditioning, a node that
slows each model call, and a slower progress event of quantization, so that the browser can take
screenshots of the panels half-way (the tiny model runs in about a second)."""
import time

import torch
from server import PromptServer

_send_sync = PromptServer.send_sync


def _send_sync_slowly(self, event, data, sid=None):
    _send_sync(self, event, data, sid)
    if event == "dvdq.quant_progress":
        time.sleep(%(layer)r)


PromptServer.send_sync = _send_sync_slowly


class DVDQWebCheckCond:
    CATEGORY = "DVD-Quant tests"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31})}}

    def make(self, seed):
        g = torch.Generator().manual_seed(seed)
        return ([[torch.randn(1, 16, 4096, generator=g), {}]],)


class DVDQWebCheckSlow:
    CATEGORY = "DVD-Quant tests"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "slow"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    def slow(self, model):
        m = model.clone()

        def wrapper(apply_model, args):
            time.sleep(%(step)r)
            return apply_model(args["input"], args["timestep"], **args["c"])

        m.set_model_unet_function_wrapper(wrapper)
        return (m,)


NODE_CLASS_MAPPINGS = {"DVDQWebCheckCond": DVDQWebCheckCond, "DVDQWebCheckSlow": DVDQWebCheckSlow}
NODE_DISPLAY_NAME_MAPPINGS = {"DVDQWebCheckCond": "Random Wan conditioning (test)",
                              "DVDQWebCheckSlow": "Slow steps (test)"}
''' % {"layer": SLOW_LAYER, "step": SLOW_STEP}


def _specs():
    specs = node_specs.all_specs()
    specs["DVDQWebCheckCond"] = {"inputs": [{"name": "seed", "type": "INT", "widget": True, "default": 0}],
                                 "outputs": [{"name": "CONDITIONING", "type": "CONDITIONING"}], "output_node": False}
    specs["DVDQWebCheckSlow"] = {"inputs": [{"name": "model", "type": "MODEL", "widget": False}],
                                 "outputs": [{"name": "MODEL", "type": "MODEL"}], "output_node": False}
    return specs


def tiny_workflow(delta):
    """Loader -> Bit Switch -> ModelSamplingSD3 -> slow steps (test) -> KSampler -> SaveLatent on the
    tiny model; the two DVD-Quant nodes side by side (Nodes 2.0 makes nodes taller)."""
    g = make_workflows.Graph(_specs())
    loader = g.add("DVDQuantLoader", (0, 0), model_name=TINY_MODEL, w_bits=4, a_low=4, a_high=8, method="dvdq",
                   save_quantized_copy=False)
    bits = g.add("DVDQuantBitSwitch", (380, 0), mode="delta", delta=delta, low=4, high=8, fixed_bits=8, schedule="")
    g.link(loader["MODEL"], bits, "model")
    shift = g.add("ModelSamplingSD3", (0, 480), shift=8.0)
    g.link(bits["MODEL"], shift, "model")
    slow = g.add("DVDQWebCheckSlow", (0, 600))
    g.link(shift["MODEL"], slow, "model")
    cond = g.add("DVDQWebCheckCond", (760, 0), seed=1)
    neg = g.add("ConditioningZeroOut", (760, 120))
    g.link(cond["CONDITIONING"], neg, "conditioning")
    latent = g.add("EmptyHunyuanLatentVideo", (760, 230), width=64, height=64, length=5, batch_size=1)
    ks = g.add("KSampler", (1120, 0), controls={"seed": "fixed"}, seed=7, steps=STEPS, cfg=5.0, sampler_name="euler",
               scheduler="simple", denoise=1.0)
    g.link(slow["MODEL"], ks, "model")
    g.link(cond["CONDITIONING"], ks, "positive")
    g.link(neg["CONDITIONING"], ks, "negative")
    g.link(latent["LATENT"], ks, "latent_image")
    save = g.add("SaveLatent", (1120, 400), filename_prefix="latents/dvdq_web_check")
    g.link(ks["LATENT"], save, "samples")
    return g.ui()


def tiny_split_workflow(delta):
    """Wan 2.2's pattern on tiny models: two experts (two random checkpoints), one through the
    DVD-Quant Loader, the other through UNETLoader -> DVD-Quant Apply, each -> Bit Switch ->
    ModelSamplingSD3, and two KSamplerAdvanced splitting one STEPS-step schedule in half."""
    g = make_workflows.Graph(_specs())
    cond = g.add("DVDQWebCheckCond", (760, 0), seed=1)
    neg = g.add("ConditioningZeroOut", (760, 120))
    g.link(cond["CONDITIONING"], neg, "conditioning")
    latent = g.add("EmptyHunyuanLatentVideo", (760, 230), width=64, height=64, length=5, batch_size=1)
    half = STEPS // 2
    prev = latent["LATENT"]
    for k, (model, title) in enumerate([(TINY_MODEL, "high noise expert"), (TINY_MODEL_2, "low noise expert")]):
        x = 380 * k
        if k == 0:
            loader = g.add("DVDQuantLoader", (x, 0), title=f"DVD-Quant Loader ({title})", model_name=model,
                           w_bits=4, a_low=4, a_high=8, method="dvdq", save_quantized_copy=False)
        else:  # the other way in: any loader, then DVD-Quant Apply
            unet = g.add("UNETLoader", (x, -130), unet_name=model, weight_dtype="default")
            loader = g.add("DVDQuantApply", (x, 0), title=f"DVD-Quant Apply ({title})", w_bits=4, a_low=4,
                           a_high=8, method="dvdq")
            g.link(unet["MODEL"], loader, "model")
        bits = g.add("DVDQuantBitSwitch", (x, 290), mode="delta", delta=delta, low=4, high=8, fixed_bits=8, schedule="")
        g.link(loader["MODEL"], bits, "model")
        shift = g.add("ModelSamplingSD3", (x, 600), shift=8.0)
        g.link(bits["MODEL"], shift, "model")
        ks = g.add("KSamplerAdvanced", (1120, 420 * k), title=f"KSampler ({title})", controls={"noise_seed": "fixed"},
                   add_noise="enable" if k == 0 else "disable", noise_seed=7, steps=STEPS, cfg=5.0,
                   sampler_name="euler", scheduler="simple", start_at_step=half * k,
                   end_at_step=half if k == 0 else 10000,
                   return_with_leftover_noise="enable" if k == 0 else "disable")
        g.link(shift["MODEL"], ks, "model")
        g.link(cond["CONDITIONING"], ks, "positive")
        g.link(neg["CONDITIONING"], ks, "negative")
        g.link(prev, ks, "latent_image")
        prev = ks["LATENT"]
    save = g.add("SaveLatent", (1480, 0), filename_prefix="latents/dvdq_web_check_split")
    g.link(prev, save, "samples")
    return g.ui()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, value):
    req = urllib.request.Request(url, data=json.dumps(value).encode(), method="POST")
    urllib.request.urlopen(req, timeout=10).read()


def validate_api_workflows(url):
    """POST each API workflow to /prompt. The model files are not installed here, so the only
    errors allowed are file names missing from the model folders; anything else (an unknown node,
    a wrong input name or type, a bad link) is a problem."""
    problems = {}
    for path in sorted(glob.glob(os.path.join(ROOT, "workflows", "api", "*.json"))):
        with open(path, encoding="utf-8") as f:
            prompt = json.load(f)
        req = urllib.request.Request(url + "prompt", data=json.dumps({"prompt": prompt}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            urllib.request.urlopen(req, timeout=30).read()
            bad = []  # accepted (it will fail later for lack of model files, harmlessly)
        except urllib.error.HTTPError as e:
            body = json.loads(e.read() or b"{}")
            bad = []
            for nid, ne in body.get("node_errors", {}).items():
                for err in ne.get("errors", []):
                    name = err.get("extra_info", {}).get("input_name")
                    if not (err.get("type") == "value_not_in_list"
                            and node_specs.file_folder(ne.get("class_type", ""), name)):
                        bad.append(f"node {nid} {ne.get('class_type')}: {err.get('type')} {err.get('details')}")
            if not body.get("node_errors"):
                bad.append(f"rejected: {body.get('error')}")
        problems[os.path.basename(path)] = bad
    return problems


def example_workflows():
    """Names of the example workflows that have an API form too (workflows/NAME.json and api/NAME.json)."""
    wf = os.path.join(ROOT, "workflows")
    return sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(wf, "*.json"))
                  if os.path.isfile(os.path.join(wf, "api", os.path.basename(p))))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI source tree (COMFYUI_PATH)")
    ap.add_argument("--python", default=os.environ.get("COMFYUI_PYTHON", sys.executable),
                    help="the Python that has ComfyUI's requirements (COMFYUI_PYTHON)")
    ap.add_argument("--playwright-dir", required=True, help="folder whose node_modules has playwright-core")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    ap.add_argument("--out", required=True, help="folder for the screenshots and result.json")
    ap.add_argument("--delta", type=float, default=0.2, help="δ of the tiny run's Bit Switch Scheduler")
    ap.add_argument("--front-end-root", help="serve this front end (a front-end wheel's comfyui_frontend_package/static) "
                                             "instead of the one installed with ComfyUI")
    ap.add_argument("--modes", default="classic",
                    help="comma-separated: classic (LiteGraph canvas), vue (Nodes 2.0: Comfy.VueNodes.Enabled)")
    ap.add_argument("--no-workflows", action="store_true", help="check the panels only, not the example workflows")
    args = ap.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"classic", "vue"}:
        sys.exit(f"--modes: classic and/or vue, not {args.modes!r}")
    if not args.comfyui or not os.path.isfile(os.path.join(args.comfyui, "main.py")):
        sys.exit("set COMFYUI_PATH (or --comfyui) to a ComfyUI source tree")
    if args.front_end_root and not os.path.isfile(os.path.join(args.front_end_root, "index.html")):
        sys.exit("--front-end-root: no index.html there (give the wheel's comfyui_frontend_package/static)")
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="dvdq-web-check-")
    base = os.path.join(tmp, "base")
    pack = os.path.join(base, "custom_nodes", "dvdq")
    shutil.copytree(ROOT, pack, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "node_modules", ".dev_*"))
    os.makedirs(os.path.join(base, "custom_nodes", "dvdq_web_check_nodes"))
    with open(os.path.join(base, "custom_nodes", "dvdq_web_check_nodes", "__init__.py"), "w") as f:
        f.write(TEST_NODES)
    models = os.path.join(base, "models", "diffusion_models")
    os.makedirs(models)
    os.makedirs(os.path.join(base, "input"))  # the I2V example's start image: ComfyUI's own example.png
    shutil.copy(os.path.join(args.comfyui, "input", "example.png"), os.path.join(base, "input", "example.png"))
    for seed, name in enumerate((TINY_MODEL, TINY_MODEL_2)):
        subprocess.run([args.python, "-c", BUILD_TINY, os.path.join(models, name), str(seed)], cwd=args.comfyui,
                       check=True)
    tiny, tiny_split = os.path.join(tmp, "tiny_ui.json"), os.path.join(tmp, "tiny_split_ui.json")
    with open(tiny, "w") as f:
        json.dump(tiny_workflow(args.delta), f)
    with open(tiny_split, "w") as f:
        json.dump(tiny_split_workflow(args.delta), f)
    names = [] if args.no_workflows else example_workflows()

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    log_path = os.path.join(out, "comfyui.log")
    log = open(log_path, "w")
    cmd = [args.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
           "--disable-api-nodes", "--base-directory", base]
    if args.front_end_root:
        cmd += ["--front-end-root", os.path.abspath(args.front_end_root)]
    server = subprocess.Popen(cmd, cwd=args.comfyui, stdout=log, stderr=subprocess.STDOUT)
    results = {}
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(url, timeout=2).read()
                break
            except OSError:
                if server.poll() is not None:
                    sys.exit(f"ComfyUI exited early; see {log_path}")
                time.sleep(0.5)
        else:
            sys.exit(f"ComfyUI did not answer at {url}; see {log_path}")
        failed = [line for line in open(log_path) if "IMPORT FAILED" in line and "dvdq" in line]
        if failed:
            sys.exit("the pack failed to import:\n" + "".join(failed))
        post(url + "settings/Comfy.TutorialCompleted", True)  # no template gallery over the canvas
        post(url + "settings/Comfy.Minimap.Visible", False)
        for mode in modes:
            post(url + "settings/Comfy.VueNodes.Enabled", mode == "vue")
            mode_out = os.path.join(out, mode)
            env = dict(os.environ, COMFY_URL=url, WF_DIR=os.path.join(ROOT, "workflows"), WF_NAMES=",".join(names),
                       TINY=tiny, TINY_SPLIT=tiny_split, OUT_DIR=mode_out, MODE=mode, CHROMIUM=args.chromium,
                       PLAYWRIGHT_CORE_DIR=os.path.join(os.path.abspath(args.playwright_dir), "node_modules"),
                       PROFILE_DIR=os.path.join(tmp, f"chromium-profile-{mode}"))
            proc = subprocess.run(["node", os.path.join(HERE, "web_panel_check.mjs")], env=env, capture_output=True,
                                  text=True, timeout=1200)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                results[mode] = {"fatal": f"browser check failed (exit {proc.returncode}):\n"
                                          f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"}
                continue
            results[mode] = json.loads(line[len("RESULT "):])
            with open(os.path.join(mode_out, "result.json"), "w") as f:
                json.dump(results[mode], f, indent=1)
        validation = validate_api_workflows(url) if names else {}
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    version = next((line.split(":", 1)[1].strip() for line in open(log_path) if "ComfyUI version:" in line), "?")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"ComfyUI {version}, front end {'at ' + args.front_end_root if args.front_end_root else 'installed with it'}")
    panel_bad = workflow_bad = 0
    for mode in modes:
        print(f"== {mode}")
        p, w = report(results[mode])
        panel_bad, workflow_bad = panel_bad + p, workflow_bad + w
    if names:
        problems = [f"/prompt {name}: {b}" for name, v in validation.items() for b in v]
        accepted = sum(not v for v in validation.values())
        print(f"== example workflows accepted by the server's /prompt validation: {accepted} of {len(validation)}")
        for p in problems:
            print("PROBLEM:", p)
        workflow_bad += len(problems)
    print(f"panels: {'OK' if not panel_bad else f'{panel_bad} problem(s)'}"
          + (f"; example workflows: {'OK' if not workflow_bad else f'{workflow_bad} problem(s)'}" if names else ""))
    return 0 if not panel_bad + workflow_bad else 1


def report(result):
    """Prints what one mode's browser check saw; returns the numbers of problems with the panels and
    with the example workflows."""
    problems = []
    if result.get("fatal"):
        problems.append(f"the browser check stopped: {result['fatal'][:3000]}")
    print(f"front end {result.get('frontendVersion')}, mode {result.get('mode')}")
    if result.get("extensions") != ["dvdq.panel"]:
        problems.append(f"front-end extension not registered: {result.get('extensions')}")
    workflow_problems = [f"workflow {name}: {p}" for name, r in result.get("workflows", {}).items() for p in r["problems"]]
    if result.get("workflows"):
        ok = sum(not r["problems"] for r in result["workflows"].values())
        print(f"example workflows equal in the front end: {ok} of {len(result['workflows'])}")
    for key, title in (("tiny", "panels, top level"), ("subgraph", "panels, nodes inside a subgraph")):
        run = result.get(key)
        if not run:
            continue
        ev = run.get("events", {})
        bits, summaries = ev.get("bits", []), ev.get("summaries", [])
        print(f"{title}: {ev.get('resets')} reset, {len(bits)} bits, {len(ev.get('progress', []))} progress, "
              f"{len(summaries)} summary events; node ids {sorted({str(b['node']) for b in bits})}")
        if bits:
            print("  bits per step:", ",".join(str(b["bits"]) for b in sorted(bits, key=lambda b: b["step"])))
        if summaries:
            s = summaries[0]
            print(f"  summary: {s['layers']} layers, {s['bytes_before']} -> {s['bytes_after']} bytes, "
                  f"mean rel. error {s['mean_rel_error']:.4f}, {s['seconds']:.2f} s, {s['source']}")
        if run.get("live"):
            print(f"  on the screen: {json.dumps(run['live'])}")
        if run.get("hover"):
            print(f"  hover: {json.dumps(run['hover'])}")
        problems += [f"{title}: {p}" for p in run.get("problems", [])]
    split = result.get("splitEvents", {})
    if split.get("errors") or not split.get("done"):
        problems.append(f"the split-schedule run failed: {split.get('errors')}")
    kinds = sorted(result.get("splitNodeTypes", {}).get(str(x["node"]), "?") for x in split.get("summaries", []))
    if kinds != ["DVDQuantApply", "DVDQuantLoader"]:
        problems.append(f"split schedule run: quantization summaries from {kinds}, expected the Loader and Apply")
    by_node = {}
    for b in split.get("bits", []):
        by_node.setdefault(b["node"], []).append(b)
    half = STEPS // 2
    got = sorted(sorted(b["step"] for b in v) for v in by_node.values())
    if got != [list(range(half)), list(range(half, STEPS))]:
        problems.append(f"split schedule: steps per Bit Switch node {got}, expected 0..{half - 1} and {half}..{STEPS - 1}")
    # The first sampler cannot know the schedule goes on (null total is allowed); the second,
    # continuing it, knows the whole length.
    totals = {b["step"] >= half: b["total"] for b in split.get("bits", [])}
    if totals.get(True) != STEPS or totals.get(False) not in (None, STEPS):
        problems.append(f"split schedule: totals {totals}, expected {STEPS} on the second half")
    for node, v in sorted(by_node.items()):
        v = sorted(v, key=lambda b: b["step"])
        print(f"split schedule, Bit Switch node {node}: steps {v[0]['step']}..{v[-1]['step']} (total {v[0]['total']}), "
              f"bits {','.join(str(b['bits']) for b in v)}")
    ours = [e for e in result.get("pageErrors", []) if "/extensions/dvdq/" in e]
    if ours:
        problems.append(f"errors in the pack's scripts: {ours}")
    other = [e.splitlines()[0] for e in result.get("pageErrors", []) if "/extensions/dvdq/" not in e]
    if other:
        print("page errors not from this pack (ComfyUI's front end):", other)
    for p in workflow_problems + problems:
        print("PROBLEM:", p)
    return len(problems), len(workflow_problems)


if __name__ == "__main__":
    sys.exit(main())
