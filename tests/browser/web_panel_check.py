"""Checks the web panel and the example workflows in a real ComfyUI with its front end, in headless
Chromium (not part of CI: it needs a ComfyUI install, Chromium and playwright-core).

    COMFYUI_PATH=/path/to/ComfyUI python tests/browser/web_panel_check.py \
        --playwright-dir DIR_WITH_node_modules --out shots/

What it does: copies this pack and a test-only node (random Wan text conditioning; the real text
encoder is gigabytes) into a temporary ComfyUI base directory, builds a tiny random-weight Wan 2.1
T2V checkpoint from ComfyUI's own WanModel, starts ComfyUI with --cpu, then web_panel_check.mjs
loads each example workflow in the front end (widget values, saved graph and API prompt must equal
the files), runs Loader -> Bit Switch Scheduler -> ModelSamplingSD3 -> KSampler on the tiny model,
records the dvdq.* events the page receives and takes screenshots. Exit status 0 when all holds.
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

COND_NODE = '''"""Test-only node of the web panel check: seeded random Wan text conditioning."""
import torch


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


NODE_CLASS_MAPPINGS = {"DVDQWebCheckCond": DVDQWebCheckCond}
NODE_DISPLAY_NAME_MAPPINGS = {"DVDQWebCheckCond": "Random Wan conditioning (test)"}
'''


def tiny_workflow(delta):
    """Loader -> Bit Switch -> ModelSamplingSD3 -> KSampler -> SaveLatent on the tiny model."""
    specs = node_specs.all_specs()
    specs["DVDQWebCheckCond"] = {"inputs": [{"name": "seed", "type": "INT", "widget": True, "default": 0}],
                                 "outputs": [{"name": "CONDITIONING", "type": "CONDITIONING"}], "output_node": False}
    g = make_workflows.Graph(specs)
    loader = g.add("DVDQuantLoader", (0, 0), model_name=TINY_MODEL, w_bits=4, a_low=4, a_high=8, method="dvdq",
                   save_quantized_copy=False)
    bits = g.add("DVDQuantBitSwitch", (0, 290), mode="delta", delta=delta, low=4, high=8, fixed_bits=8, schedule="")
    g.link(loader["MODEL"], bits, "model")
    shift = g.add("ModelSamplingSD3", (0, 600), shift=8.0)
    g.link(bits["MODEL"], shift, "model")
    cond = g.add("DVDQWebCheckCond", (360, 0), seed=1)
    neg = g.add("ConditioningZeroOut", (360, 120))
    g.link(cond["CONDITIONING"], neg, "conditioning")
    latent = g.add("EmptyHunyuanLatentVideo", (360, 230), width=64, height=64, length=5, batch_size=1)
    ks = g.add("KSampler", (720, 0), controls={"seed": "fixed"}, seed=7, steps=STEPS, cfg=5.0, sampler_name="euler",
               scheduler="simple", denoise=1.0)
    g.link(shift["MODEL"], ks, "model")
    g.link(cond["CONDITIONING"], ks, "positive")
    g.link(neg["CONDITIONING"], ks, "negative")
    g.link(latent["LATENT"], ks, "latent_image")
    save = g.add("SaveLatent", (1080, 0), filename_prefix="latents/dvdq_web_check")
    g.link(ks["LATENT"], save, "samples")
    return g.ui()


def tiny_split_workflow(delta):
    """Wan 2.2's pattern on tiny models: two experts (two random checkpoints), one through the
    DVD-Quant Loader, the other through UNETLoader -> DVD-Quant Apply, each -> Bit Switch ->
    ModelSamplingSD3, and two KSamplerAdvanced splitting one STEPS-step schedule in half."""
    specs = node_specs.all_specs()
    specs["DVDQWebCheckCond"] = {"inputs": [{"name": "seed", "type": "INT", "widget": True, "default": 0}],
                                 "outputs": [{"name": "CONDITIONING", "type": "CONDITIONING"}], "output_node": False}
    g = make_workflows.Graph(specs)
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI source tree (COMFYUI_PATH)")
    ap.add_argument("--python", default=os.environ.get("COMFYUI_PYTHON", sys.executable),
                    help="the Python that has ComfyUI's requirements (COMFYUI_PYTHON)")
    ap.add_argument("--playwright-dir", required=True, help="folder whose node_modules has playwright-core")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    ap.add_argument("--out", required=True, help="folder for the screenshots and result.json")
    ap.add_argument("--delta", type=float, default=0.2, help="δ of the tiny run's Bit Switch Scheduler")
    args = ap.parse_args()
    if not args.comfyui or not os.path.isfile(os.path.join(args.comfyui, "main.py")):
        sys.exit("set COMFYUI_PATH (or --comfyui) to a ComfyUI source tree")
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="dvdq-web-check-")
    base = os.path.join(tmp, "base")
    pack = os.path.join(base, "custom_nodes", "dvdq")
    shutil.copytree(ROOT, pack, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "node_modules", ".dev_*"))
    os.makedirs(os.path.join(base, "custom_nodes", "dvdq_web_check_nodes"))
    with open(os.path.join(base, "custom_nodes", "dvdq_web_check_nodes", "__init__.py"), "w") as f:
        f.write(COND_NODE)
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

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    log_path = os.path.join(out, "comfyui.log")
    log = open(log_path, "w")
    server = subprocess.Popen([args.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                               "--disable-auto-launch", "--disable-api-nodes", "--base-directory", base],
                              cwd=args.comfyui, stdout=log, stderr=subprocess.STDOUT)
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
        env = dict(os.environ, COMFY_URL=url, WF_DIR=os.path.join(ROOT, "workflows"), TINY=tiny, TINY_SPLIT=tiny_split,
                   OUT_DIR=out,
                   CHROMIUM=args.chromium, PLAYWRIGHT_CORE_DIR=os.path.join(os.path.abspath(args.playwright_dir), "node_modules"),
                   PROFILE_DIR=os.path.join(tmp, "chromium-profile"))
        proc = subprocess.run(["node", os.path.join(HERE, "web_panel_check.mjs")], env=env, capture_output=True,
                              text=True, timeout=900)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            sys.exit(f"browser check failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        result = json.loads(line[len("RESULT "):])
        result["server_validation"] = validate_api_workflows(url)
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(result, f, indent=1)
    shutil.rmtree(tmp, ignore_errors=True)
    return report(result)


def report(result):
    ev = result.get("events", {})
    bits, summaries = ev.get("bits", []), ev.get("summaries", [])
    problems = []
    if result.get("extensions") != ["dvdq.panel"]:
        problems.append(f"front-end extension not registered: {result.get('extensions')}")
    for name, r in result.get("workflows", {}).items():
        problems += [f"{name}: {p}" for p in r["problems"]]
    if ev.get("errors"):
        problems.append(f"the run failed: {ev['errors']}")
    if ev.get("resets", 0) < 1:
        problems.append("no dvdq.bits_reset event")
    if sorted(b["step"] for b in bits) != list(range(STEPS)):
        problems.append(f"dvdq.bits steps {[b['step'] for b in bits]}, expected 0..{STEPS - 1}")
    if len(summaries) != 1 or summaries[0].get("layers") != ev.get("progress"):
        problems.append(f"quant events: {ev.get('progress')} progress, summaries {summaries}")
    for name, bad in result.get("server_validation", {}).items():
        problems += [f"/prompt {name}: {b}" for b in bad]
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
    ours = [e for e in result.get("pageErrors", []) if "/extensions/dvdq/" in e]
    if ours:
        problems.append(f"errors in the pack's scripts: {ours}")
    print(f"workflows checked in the front end: {len(result.get('workflows', {}))}, "
          f"by the server's /prompt validation: {len(result.get('server_validation', {}))}")
    print(f"events: {ev.get('resets')} reset, {len(bits)} bits, {ev.get('progress')} progress, {len(summaries)} summary")
    if bits:
        print("bits per step:", ",".join(str(b["bits"]) for b in sorted(bits, key=lambda b: b["step"])))
    if summaries:
        s = summaries[0]
        print(f"summary: {s['layers']} layers, {s['bytes_before']} -> {s['bytes_after']} bytes, "
              f"mean rel. error {s['mean_rel_error']:.4f}, {s['seconds']:.2f} s, {s['source']}")
    for node, v in sorted(by_node.items()):
        v = sorted(v, key=lambda b: b["step"])
        print(f"split schedule, Bit Switch node {node}: steps {v[0]['step']}..{v[-1]['step']} (total {v[0]['total']}), "
              f"bits {','.join(str(b['bits']) for b in v)}")
    other = [e.splitlines()[0] for e in result.get("pageErrors", []) if "/extensions/dvdq/" not in e]
    if other:
        print("page errors not from this pack (ComfyUI's front end):", other)
    for p in problems:
        print("PROBLEM:", p)
    print("OK" if not problems else f"{len(problems)} problem(s)")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
