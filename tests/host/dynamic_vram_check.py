"""DVD-Quant layers under ComfyUI's dynamic VRAM (ModelPatcherDynamic, comfy-aimdo; the default on
NVIDIA GPUs from about ComfyUI 0.15), without a server: a GPU check the CPU host tests cannot make.

usage: python tests/host/dynamic_vram_check.py COMFY_DIR [--cpu] [--classic]
  COMFY_DIR: a ComfyUI checkout (0.33.0 or later) with comfy-kitchen and comfy-aimdo installed.
  --cpu (automatic without CUDA): everything but the GPU load; the host then uses its plain
  ModelPatcher (ModelPatcherDynamic.__new__ reroutes CPU load devices), and the script sets
  aimdo_enabled only to get the lazily created (weight=None) comfy Linears a dynamic host builds.
  --classic: dynamic VRAM off (ComfyUI's --disable-dynamic-vram): the plain ModelPatcher's low-VRAM
  partial load (what --lowvram, or a model larger than the free VRAM, gets), on the GPU.
It enables dynamic VRAM as ComfyUI's main.py does, loads a tiny random Wan 2.1 through ComfyUI's loader,
quantizes it with the pack, and compares the quantized model's output through the dynamic patcher
(load, partial unload, reload, unload) with the same model moved to the GPU by hand. Exit status 0 when
every check passed. Needs no server dependencies (aiohttp, av, torchsde).
"""
import os
import sys

argv = [a for a in sys.argv[1:] if not a.startswith("--")]
COMFY = os.path.abspath(argv[0])
PACK = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
sys.path[:0] = [COMFY, PACK]

import torch  # noqa: E402

CPU = "--cpu" in sys.argv or not torch.cuda.is_available()
FAILED = []


def check(ok, what):
    print(("  ok   " if ok else "  FAIL ") + what, flush=True)
    if not ok:
        FAILED.append(what)


from comfy.cli_args import args, enables_dynamic_vram  # noqa: E402  (no argv parsing: defaults)

if CPU:
    args.cpu = True
# ---- what ComfyUI 0.33.0's main.py does to enable dynamic VRAM, without importing main / server
import comfy_aimdo.control  # noqa: E402

CLASSIC = "--classic" in sys.argv
want_dynamic = enables_dynamic_vram() and not CLASSIC
if want_dynamic:
    try:
        comfy_aimdo.control.init(simple_vram_headroom=None, nvml_pressure=not args.disable_nvml_pressure)
    except TypeError:
        try:
            comfy_aimdo.control.init(simple_vram_headroom=None)
        except TypeError:
            comfy_aimdo.control.init()
import comfy.memory_management  # noqa: E402
import comfy.model_management as mm  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.ops  # noqa: E402
import comfy.sd  # noqa: E402

dynamic_note = "not wanted (args)"
if want_dynamic and (mm.is_nvidia() or (mm.is_amd() and mm.rocm_version >= (7, 14))):
    if mm.torch_version_numeric < (2, 8):
        dynamic_note = "torch < 2.8"
    else:
        try:
            ok = comfy_aimdo.control.init_devices((d.index, int(args.vram_headroom * 1024 ** 3))
                                                  for d in mm.get_all_torch_devices())
        except TypeError:
            ok = comfy_aimdo.control.init_devices(d.index for d in mm.get_all_torch_devices())
        if ok:
            comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
            comfy.memory_management.aimdo_enabled = True
            dynamic_note = "enabled (CoreModelPatcher = ModelPatcherDynamic)"
        else:
            dynamic_note = "comfy-aimdo init_devices failed"
elif CPU:
    dynamic_note = "CPU mode: no dynamic VRAM; aimdo_enabled set only for lazy layer creation"
elif CLASSIC:
    dynamic_note = "off (--classic): the plain ModelPatcher"

# ---- the pack, imported as ComfyUI imports it (tests/pack.py)
import importlib.util  # noqa: E402

_spec = importlib.util.spec_from_file_location("dvdq_tests_pack", os.path.join(PACK, "tests", "pack.py"))
pack = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pack)
models = pack.sub("models")
host = pack.sub("host")
import math  # noqa: E402

# ---- a tiny random Wan 2.1 t2v state dict (tests/host/make_models.py: WAN and randomize), built
# with eager layers (before aimdo_enabled: lazy layers have no weights to randomise)
from comfy.ldm.wan.model import WanModel  # noqa: E402

import dvdq_core as dq  # noqa: E402
from dvdq_core.linear import _View  # noqa: E402
from dvdq_core.lowrank import branch_of  # noqa: E402

WAN = dict(patch_size=(1, 2, 2), text_len=512, dim=256, ffn_dim=512, freq_dim=256, text_dim=4096, num_heads=2,
           num_layers=2, window_size=(-1, -1), qk_norm=True, cross_attn_norm=True, eps=1e-6)
DTYPE = torch.float32 if CPU else torch.float16  # the model dtype, forced below: lazily created comfy Linears
# keep the file's dtype until a dynamic load casts them, so the no-patcher reference needs file dtype == model dtype
g = torch.Generator().manual_seed(1)
sd = {}
lazy, comfy.memory_management.aimdo_enabled = comfy.memory_management.aimdo_enabled, False  # real tensors to save
for k, t in WanModel(model_type="t2v", in_dim=16, out_dim=16, operations=comfy.ops.disable_weight_init,
                     **WAN).state_dict().items():
    if t.ndim >= 2:
        v = torch.randn(t.shape, generator=g) / math.sqrt(math.prod(t.shape[1:]))
    elif "norm" in k or k.endswith(".scale"):
        v = 1.0 + 0.1 * torch.randn(t.shape, generator=g)
    else:
        v = 0.05 * torch.randn(t.shape, generator=g)
    sd[k] = v.to(DTYPE).contiguous()
# lazy comfy Linears, as a dynamic-VRAM host builds them (on the CPU too)
comfy.memory_management.aimdo_enabled = lazy or CPU

print(f"torch {torch.__version__}, device {mm.get_torch_device()}, vram_state {mm.vram_state.name}")
print(f"dynamic VRAM: {dynamic_note}; aimdo_enabled={comfy.memory_management.aimdo_enabled}; "
      f"CoreModelPatcher={comfy.model_patcher.CoreModelPatcher.__name__}")

# ---- ComfyUI's own loader (detection, dtype, patcher class), then the pack's quantize path
src = comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options={"dtype": DTYPE})
print(f"loader patcher: {type(src).__name__} (is_dynamic={src.is_dynamic()}), model {type(src.model).__name__}, "
      f"dtype {src.model.get_dtype()}, manual_cast {src.model.manual_cast_dtype}")
cfg = dq.QuantConfig(w_bits=4, a_bits=8)
info = models.quantize_base_model(src.model, cfg, node_id="dyn")
qp = models.quantized_patcher(src.model, info, type(src), src.load_device, src.offload_device)  # load_and_quantize
del src
LC = host.layer_class()
qlayers = [(n, m) for n, m in qp.model.diffusion_model.named_modules() if isinstance(m, LC)]
dev = qp.load_device
print(f"quantized patcher: {type(qp).__name__} (is_dynamic={qp.is_dynamic()}), {len(qlayers)} {LC.__name__} layers, "
      f"model_size {qp.model_size() / 2**20:.2f} MiB, load_device {dev}")
check(len(qlayers) > 0, "layers quantized with the host layer class")
check(qp.is_dynamic() == (not CPU and not CLASSIC and comfy.memory_management.aimdo_enabled),
      "patcher class matches the host's choice")
DYNAMIC = qp.is_dynamic()

x = torch.randn(1, 16, 1, 16, 16, generator=torch.Generator().manual_seed(2))
ctx = torch.randn(1, 32, 4096, generator=torch.Generator().manual_seed(3))
sigma = torch.tensor([0.7])


def run(base):
    with torch.inference_mode():
        return base.apply_model(x.to(dev), sigma.to(dev), c_crossattn=ctx.to(dev)).float().cpu()


def where():
    name, m = qlayers[0]
    kinds = {k: ("param" if k in m._parameters else "buffer") for k in ("weight", "bias")}
    return (f"{name}: weight {m.weight.device}/{m.weight.dtype}/{kinds['weight']}, w_scale {m.w_scale.device}, "
            f"_v={'yes' if hasattr(m, '_v') else 'no'}, comfy_cast_weights={m.comfy_cast_weights}")


def close(a, b, what):
    err = ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
    check(torch.isfinite(a).all().item() and err < 1e-3, f"{what}: rel. diff {err:.2e} vs no-patcher run")


# ---- reference: the same quantized model on the device, moved by hand, no patcher involved
base = qp.model


def run_by_hand():
    """The model moved to the device by hand, no patcher: comfy layers cast their weights to the input's
    dtype as a dynamic load makes them do (the patch embedding gets a float32 input, its weights are fp16)."""
    casting = [m for m in base.modules() if hasattr(m, "comfy_cast_weights")]
    before = [m.comfy_cast_weights for m in casting]
    for m in casting:
        m.comfy_cast_weights = True
    base.to(dev)
    try:
        return run(base)
    finally:
        base.to(qp.offload_device)
        for m, b in zip(casting, before):
            m.comfy_cast_weights = b


ref = run_by_hand()
check(torch.isfinite(ref).all().item(), f"reference forward without patcher on {dev}: finite, shape {tuple(ref.shape)}")

# ---- managed load (what KSampler's prepare_sampling does), forward through the loaded model
mm.load_models_gpu([qp])
qp.pre_run()  # sampling sets current_patcher: BaseModel then passes prefetch_dynamic_vbars=is_dynamic()
print("after load_models_gpu:", where())
if DYNAMIC:
    vbar = qp.model.dynamic_vbars.get(dev)
    print(f"  vbar {'present' if vbar is not None else 'MISSING'}; loaded_size {qp.loaded_size() / 2**20:.2f} MiB "
          f"(model_loaded_weight_memory {qp.model.model_loaded_weight_memory / 2**20:.2f} MiB); "
          f"{sum(hasattr(m, '_v') for _, m in qlayers)}/{len(qlayers)} packed layers got a vbar slot (_v)")
    check(vbar is not None, "dynamic VRAM really active (a vbar exists for the load device)")
    check(all(m.weight.device == dev for _, m in qlayers),
          "packed buffers resident on the GPU after load (ModelPatcherDynamic.load moves every buffer)")
close(run(qp.model), ref, "forward after load_models_gpu")

# ---- lowvram-style partial unload: dynamic frees the vbar first, then restores all buffer backups
if not CPU and not DYNAMIC:  # the plain ModelPatcher's low-VRAM load: the layers past the budget stay
    # offloaded and run with comfy_cast_weights (QuantLinear copies its packed buffers per call)
    mm.unload_all_models()
    # a budget that loads some packed layers and leaves others (the host reserves room for offloaded
    # modules' casts, so the fraction that does depends on the model's module sizes)
    for frac in (0.33, 0.5, 0.67, 0.8, 0.9):
        qp.load(dev, lowvram_model_memory=max(1, int(qp.model_size() * frac)))
        on_gpu = sum(m.weight.device == dev for _, m in qlayers)
        if 0 < on_gpu < len(qlayers):
            break
        qp.detach()
    print(f"after a low-VRAM load of {frac:.0%} of the model: {on_gpu}/{len(qlayers)} packed layers on {dev};", where())
    check(0 < on_gpu < len(qlayers), "low-VRAM partial load: some packed layers loaded, some offloaded")
    close(run(qp.model), ref, "forward with a low-VRAM partial load")
    qp.detach()
    mm.load_models_gpu([qp])
    close(run(qp.model), ref, "forward after detach and a new load")
elif not CPU:
    freed = qp.partially_unload(qp.offload_device, memory_to_free=qp.loaded_size())
    print(f"after partially_unload(all): freed {0 if freed is None else freed / 2**20:.2f} MiB;", where())
    close(run(qp.model), ref, "forward after partial unload, not reloaded (packed buffers copied per call)")
    mm.load_models_gpu([qp])  # partially_load again
    print("after reload:", where())
    close(run(qp.model), ref, "forward after reload")
    mm.unload_all_models()
    print("after unload_all_models:", where())
    close(run(qp.model), ref, "forward after unload_all_models (packed buffers off the GPU)")
else:  # the CPU host's plain ModelPatcher: its lowvram bookkeeping, as far as the CPU allows
    qp.partially_unload(qp.offload_device, memory_to_free=1 << 40)
    close(run(qp.model), ref, "forward after ModelPatcher.partially_unload (CPU)")
    mm.unload_all_models()
    close(run(qp.model), ref, "forward after unload_all_models (CPU)")

# ---- a LoRA after quantization (nodes/lora.py): the host hands it to the layers as patch lists after a
# full load, as LowVramPatch functions to offloaded layers (weight_function, or weight_lowvram_function under
# dynamic VRAM); every path must give the output of the same low-rank branches set by hand, and unloading
# must remove it
from comfy.weight_adapter.lora import LoRAAdapter  # noqa: E402

mm.unload_all_models()
gl = torch.Generator().manual_seed(5)
factors = {n: (torch.randn(m.out_features, 4, generator=gl) / 4, torch.randn(4, m.in_features, generator=gl) / 4)
           for n, m in qlayers[::2]}
STRENGTH = 0.8
adapters = {f"diffusion_model.{n}.weight": LoRAAdapter(set(), (up.to(DTYPE), down.to(DTYPE), torch.tensor(2.0), None,
                                                               None, None)) for n, (up, down) in factors.items()}
lora_mod = pack.sub("lora")
for n, m in qlayers:  # the patch lists given by hand, no patcher involved
    key = f"diffusion_model.{n}.weight"
    m.lora_patches = {key: [(STRENGTH, adapters[key], 1.0, None, None)]} if key in adapters else {}
    lora_mod.refresh(m, dev, DTYPE)
ref_lora = run_by_hand()
for _, m in qlayers:
    m.lora_patches = {}
    lora_mod.refresh(m, dev, DTYPE)
check(((ref_lora - ref).norm() / ref.norm()).item() > 1e-2, "the hand-set branches change the output")
lp = qp.clone()
lp.add_patches(adapters, STRENGTH)
print(f"LoRA after quantization: {len(factors)} layers, patcher {type(lp).__name__}")
mm.load_models_gpu([lp])
lp.pre_run()
close(run(lp.model), ref_lora, "LoRA after quantization, managed load")
if not CPU and not DYNAMIC:
    mm.unload_all_models()
    lp.load(dev, lowvram_model_memory=max(1, int(lp.model_size() * frac)))
    patched = sum(any(type(f).__name__ == "LowVramPatch" for f in m.weight_function) for _, m in qlayers)
    print(f"  low-VRAM load: {patched} layers got the LoRA as LowVramPatch functions")
    check(patched > 0, "low-VRAM load gives offloaded layers LowVramPatch functions")
    close(run(lp.model), ref_lora, "LoRA after quantization, low-VRAM partial load")
    lp.detach()
elif DYNAMIC:
    n_lv = sum(type(getattr(m, "weight_lowvram_function", None)).__name__ == "LowVramPatch" for _, m in qlayers)
    print(f"  dynamic load: {n_lv} layers got the LoRA as weight_lowvram_function")
    lp.partially_unload(lp.offload_device, memory_to_free=lp.loaded_size())
    close(run(lp.model), ref_lora, "LoRA after quantization, after partial unload")
mm.unload_all_models()
check(all(m.lowrank is None for _, m in qlayers), "no LoRA branch left after unloading")
mm.load_models_gpu([qp])
close(run(qp.model), ref, "the MODEL without the LoRA afterwards")
mm.unload_all_models()
qp.cleanup()

# ---- a packed layer of <= 16 KiB: ModelPatcherDynamic.load force-loads it through
# patch_weight_to_device(force_cast=True) -> comfy.utils.set_attr_param, which turns the uint8 `weight`
# buffer into an nn.Parameter; an offloaded call (QuantLinear._View copy) must still find it.
print("small packed layer (64x64, module size <= 16 KiB: ComfyUI's force-load path):")
spec = dq.LayerSpec(w_bits=4, a_bits=8, method="dvdq", had_block=64, scale_block=64, rotate=True, auto_scale=True,
                    granularity="block")
small, _ = LC.from_linear(torch.nn.Linear(64, 64), spec, dq.linear.BitState(8), backend="reference")
holder = torch.nn.Sequential(small)
print(f"  module_size {mm.module_size(small)} B")
sp = comfy.model_patcher.CoreModelPatcher(holder, load_device=dev, offload_device=torch.device("cpu"))
xs = torch.randn(3, 64)
want = small(xs)
if DYNAMIC:
    sp.partially_load(dev)  # what load_models_gpu calls for a dynamic patcher
    print(f"  after load: weight is a {'Parameter' if 'weight' in small._parameters else 'buffer'} on {small.weight.device}")
    sp.partially_unload(torch.device("cpu"), memory_to_free=1 << 40)
    print(f"  after partial unload: weight is a {'Parameter' if 'weight' in small._parameters else 'buffer'} "
          f"on {small.weight.device}")
    try:
        got = small(xs.to(dev)).cpu()
        check(torch.allclose(got, want, atol=1e-3, rtol=1e-3), "small layer forward after partial unload")
    except Exception as e:
        check(False, f"small layer forward after partial unload raised {type(e).__name__}: {e}")
    sp.detach()
else:  # the same host call on the CPU shows the conversion and what _View then lacks
    sp.patch_weight_to_device("0.weight", device_to=torch.device("cpu"), force_cast=True)
    print(f"  after patch_weight_to_device(force_cast=True): weight is a "
          f"{'Parameter' if 'weight' in small._parameters else 'buffer'}")
    moved = _View(small, torch.device("cpu"), small.act, branch_of(small))
    check("weight" in moved.__dict__, "_View view of the force-loaded layer has its weight "
          "(what an offloaded call would use)")
    check(torch.allclose(small(xs), want), "small layer forward on its own device still right")

print("RESULT:", "all checks passed" if not FAILED else f"{len(FAILED)} failed: " + "; ".join(FAILED))
sys.exit(1 if FAILED else 0)
