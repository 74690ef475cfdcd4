"""The six DVD-Quant nodes (ComfyUI V1 API). Schemas follow docs/nodes.md; widget order is the
`widgets_values` order of UI workflows, so keep it."""
from ..dvdq_core.config import MAX_SVD_RANK
from .settings import BLOCKS, DEFAULT_ARQ, GRANULARITIES, METHODS, SettingsError, arq_settings, build_config

CATEGORY = "DVD-Quant"

_W_BITS = ("INT", {"default": 4, "min": 2, "max": 8, "step": 1,
                   "tooltip": "Weight bits (BGR, per output channel). 4 is the paper's setting; 8 is near lossless."})
_A_LOW = ("INT", {"default": 4, "min": 4, "max": 8, "step": 1,
                  "tooltip": "Low activation bits, used on steps where the model output changes little "
                             "(when a Bit Switch Scheduler is connected)."})
_A_HIGH = ("INT", {"default": 8, "min": 4, "max": 16, "step": 1,
                   "tooltip": "High activation bits: 4..8, or 16 for unquantized activations. The model runs at "
                              "these bits unless a Bit Switch Scheduler switches them per step."})
_METHOD = (METHODS, {"default": "dvdq",
                     "tooltip": "dvdq: BGR weights + ARQ activations (rotation, auto-scaling). minmax, smoothquant, "
                                "quarot: baselines for comparison."})
_ARQ = ("ARQ_SETTINGS", {"tooltip": "Optional ARQ Settings node: rotation, auto-scaling and per-layer bit overrides."})
_UID = {"unique_id": "UNIQUE_ID"}
LORAS_KEEP, LORAS_MERGE = "keep out (base model)", "merge and quantize again"  # DVD-Quant Save's choice


def _host():
    from . import host  # ComfyUI-dependent; imported when a node runs
    return host


def _models():
    from . import models
    return models


def _user_error(e: Exception):
    host = _host()
    return host.DVDQuantError(str(e))


class DVDQuantLoader:
    DESCRIPTION = ("Loads a Wan 2.1/2.2 or HunyuanVideo diffusion model through ComfyUI's own loader and quantizes it "
                   "with DVD-Quant (data-free: no calibration images or prompts). Files from models/dvdq (shown as "
                   "dvdq/<file>) are already quantized and load without running BGR.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The quantized diffusion model.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        model_choices = _host().model_choices
        return {
            "required": {
                "model_name": (model_choices(), {
                    "tooltip": "A diffusion model from models/diffusion_models (quantized now), or a DVD-Quant file "
                               "from models/dvdq shown as dvdq/<file> (loaded as is; its bits come from the file)."}),
                "w_bits": _W_BITS,
                "a_low": _A_LOW,
                "a_high": _A_HIGH,
                "method": _METHOD,
                "save_quantized_copy": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Also write the quantized model to models/dvdq so the next load skips BGR. "
                               "An existing file is never overwritten (a new name is chosen)."}),
            },
            "optional": {"arq_settings": _ARQ},
            "hidden": dict(_UID),
        }

    def load(self, model_name, w_bits, a_low, a_high, method, save_quantized_copy, arq_settings=None, unique_id=None):
        host = _host()
        try:
            config = build_config(w_bits, a_low, a_high, method, arq_settings)
        except SettingsError as e:
            raise _user_error(e) from None
        path, prequantized = host.resolve_model(model_name)
        if prequantized:
            return (_models().load_prequantized(path, a_high, unique_id),)
        model = _models().load_and_quantize(path, config, unique_id)
        if save_quantized_copy:
            dst = host.unique_path(host.save_folder(), host.default_copy_stem(path, config))
            _models().save_model(model, dst)
            host.log.info("DVD-Quant: saved quantized copy to %s", dst)
        return (model,)


class DVDQuantApply:
    DESCRIPTION = ("Quantizes a MODEL from any loader chain with DVD-Quant. A LoRA applied before this node is merged "
                   "into the weights before quantizing; a LoRA applied after it is refused with a message.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("A new, quantized MODEL; the input MODEL is left unchanged for other nodes.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "A Wan or HunyuanVideo MODEL, LoRAs included (they are merged in)."}),
                "w_bits": _W_BITS,
                "a_low": _A_LOW,
                "a_high": _A_HIGH,
                "method": _METHOD,
            },
            "optional": {"arq_settings": _ARQ},
            "hidden": dict(_UID),
        }

    def apply(self, model, w_bits, a_low, a_high, method, arq_settings=None, unique_id=None):
        try:
            config = build_config(w_bits, a_low, a_high, method, arq_settings)
        except SettingsError as e:
            raise _user_error(e) from None
        return (_models().apply_to_model(model, config, unique_id),)


class DVDQuantARQSettings:
    DESCRIPTION = "ARQ (activation) settings and per-layer precision overrides for DVD-Quant Loader / Apply."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("ARQ_SETTINGS",)
    OUTPUT_TOOLTIPS = ("Connect to the arq_settings input of DVD-Quant Loader or Apply.",)
    FUNCTION = "settings"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "rotate": ("BOOLEAN", {"default": True,
                                       "tooltip": "Hadamard rotation of activations and weights: spreads rare huge "
                                                  "outliers. On for dvdq (quarot always rotates)."}),
                "had_block": (BLOCKS, {"default": "128",
                                       "tooltip": "Rotation block size (block-diagonal Hadamard along the input "
                                                  "channels)."}),
                "auto_scale": ("BOOLEAN", {"default": True,
                                           "tooltip": "Scale activations per channel block from the current step's "
                                                      "values before quantizing (recomputed every step)."}),
                "granularity": (GRANULARITIES, {"default": "pow2",
                                                "tooltip": "pow2 (default): at 4 bits one power-of-two scale per "
                                                           "channel, folded into the codes (faster GPU matmul); 6/8-bit "
                                                           "steps use blocks. pow2-fast: as pow2 at 4 bits, no "
                                                           "auto-scale at 6/8-bit steps (8-bit steps about 13% faster on "
                                                           "an H100, slightly lower quality). block: one scale per "
                                                           "block of channels at every bit-width. channel: one per "
                                                           "channel (the paper's form; slow reference backend only)."}),
                "scale_block": (BLOCKS, {"default": "128", "tooltip": "Channels per auto-scale block."}),
                "layer_overrides": ("STRING", {"default": "", "multiline": True,
                                               "tooltip": "One 'layer-glob=precision' per line: e.g. blocks.0.*=8 "
                                                          "(W8A8), head.*=16 or *.ffn.*=skip (keep in full precision), "
                                                          "blocks.1.*=w4a8. The last matching line wins."}),
            },
            "optional": {
                "svd_rank": ("INT", {"default": DEFAULT_ARQ["svd_rank"], "min": 0, "max": MAX_SVD_RANK, "step": 8,
                                     "tooltip": "Method dvdq, 4-bit weights: each weight's top singular directions "
                                                "kept as a 16-bit low-rank branch, only the rest quantized (much lower "
                                                "error where weights have outliers; about 2% of a Wan 14B step on an "
                                                "H100, more on other cards). 0 = none (fastest)."}),
            },
        }

    def settings(self, rotate, had_block, auto_scale, granularity, scale_block, layer_overrides,
                 svd_rank=DEFAULT_ARQ["svd_rank"]):
        try:
            return (arq_settings(rotate, had_block, auto_scale, granularity, scale_block, layer_overrides, svd_rank),)
        except SettingsError as e:
            raise _user_error(e) from None


class DVDQuantBitSwitch:
    DESCRIPTION = ("delta-guided bit switching (delta-GBS): picks each denoising step's activation bits from how much "
                   "the model output changed, and shows the choice live on this node.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The same quantized model (a clone) with the per-step bit schedule installed.",)
    FUNCTION = "schedule"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "A MODEL quantized by DVD-Quant Loader or Apply."}),
                "mode": (["delta", "fixed", "manual"], {"default": "delta",
                                                        "tooltip": "delta: switch by the output change (paper). "
                                                                   "fixed: always fixed_bits. manual: the schedule "
                                                                   "string."}),
                "delta": ("FLOAT", {"default": 0.09, "min": 0.0, "max": 10.0, "step": 0.005,
                                    "tooltip": "Threshold on the accumulated relative L1 change of the model output: "
                                               "below it a step runs at low bits. 0 = always high, large = always "
                                               "low (after the first step)."}),
                "low": ("INT", {"default": 4, "min": 4, "max": 16, "step": 1,
                                "tooltip": "Activation bits of calm steps (4..8, 16 = unquantized)."}),
                "high": ("INT", {"default": 8, "min": 4, "max": 16, "step": 1,
                                 "tooltip": "Activation bits of the first step and of steps after a large change."}),
                "fixed_bits": ("INT", {"default": 8, "min": 4, "max": 16, "step": 1,
                                       "tooltip": "Activation bits of every step in mode 'fixed'."}),
                "schedule": ("STRING", {"default": "", "multiline": False,
                                        "tooltip": "Mode 'manual': bits per step, e.g. 8,8,8,4,4,... (a trailing ... "
                                                   "repeats the last value)."}),
            },
            "optional": {
                "final_step_high": ("BOOLEAN", {"default": True,
                                                "tooltip": "Mode 'delta': the last step of the schedule runs at high "
                                                           "bits too (its output is the result; measured to matter "
                                                           "most, above all at 4 to 8 steps). Off: the paper's rule "
                                                           "alone."}),
            },
            "hidden": dict(_UID),
        }

    def schedule(self, model, mode, delta, low, high, fixed_bits, schedule, final_step_high=True, unique_id=None):
        from .scheduler import install
        from .steps import BitScheduleHook
        host = _host()
        if not host.quantized_keys(model.model):
            raise host.DVDQuantError("Bit Switch Scheduler needs a MODEL quantized by DVD-Quant Loader or DVD-Quant "
                                     "Apply: connect it after one of them")
        try:
            hook = BitScheduleHook(unique_id, mode=mode, delta=delta, low=low, high=high, fixed_bits=fixed_bits,
                                   schedule=schedule, emit=host.emit, final_step_high=final_step_high)
        except ValueError as e:
            raise host.DVDQuantError(f"Bit Switch Scheduler: {e}") from None
        return (install(model, hook),)


class DVDQuantSave:
    DESCRIPTION = ("Saves a DVD-Quant model to models/dvdq (safetensors, packed 4-bit weights) so DVD-Quant Loader "
                   "loads it later as dvdq/<file> without quantizing again.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "A MODEL quantized by DVD-Quant Loader or Apply."}),
                "filename_prefix": ("STRING", {"default": "dvdq/model",
                                               "tooltip": "File name prefix; 'dvdq/' means the models/dvdq folder. "
                                                          "A number is appended; nothing is overwritten."}),
            },
            "optional": {
                "loras": ([LORAS_KEEP, LORAS_MERGE], {
                    "default": LORAS_KEEP,
                    "tooltip": "LoRAs loaded after the DVD-Quant Loader: keep them out (the file is the base model; "
                               "load the LoRAs after it as before) or merge them into the weights and quantize those "
                               "again (one file to share; a second rounding, and as long as quantizing takes)."}),
            },
        }

    def save(self, model, filename_prefix, loras=None):
        import os
        host = _host()
        sub, stem = host.split_prefix(filename_prefix)
        folder = host.save_folder()
        target_dir = os.path.join(folder, sub) if sub else folder
        os.makedirs(target_dir, exist_ok=True)
        path = host.unique_path(target_dir, stem)
        _models().save_model(model, path, merge_loras=loras == LORAS_MERGE)
        host.log.info("DVD-Quant: saved %s", path)
        return {"ui": {"text": [os.path.relpath(path, folder)]}}


class DVDQuantAttention:
    DESCRIPTION = ("8-bit attention for any MODEL (quantized or not): QK^T in INT8 with smoothed keys, P.V in FP8 "
                   "(H100/H200) or 16-bit, scales from each call's own tensors (no calibration). Calls it cannot take "
                   "(masks, fp32, unusual head sizes, CPU) run on ComfyUI's attention, with one warning.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("A clone of the MODEL with 8-bit attention; the input MODEL is left unchanged.",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        from .attention import MODES, PV_FORMS
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "Any diffusion MODEL; quantized by DVD-Quant or not."}),
                "mode": (list(MODES), {
                    "default": MODES[0],
                    "tooltip": "always: every step. low-bit steps (δ-GBS): only at steps whose DVD-Quant activation "
                               "bits are below 8 (the Bit Switch Scheduler's calm, low-bit steps; 16-bit attention "
                               "at the others; needs a model from DVD-Quant Loader or Apply). never: the attention "
                               "the model had before."}),
                "pv": (list(PV_FORMS), {
                    "default": "auto",
                    "tooltip": "Precision of P.V: fp8 (Hopper: fastest), fp16 (P and V in 16 bits, more accurate), "
                               "auto (fp8 on H100/H200, else fp16)."}),
            },
            "hidden": dict(_UID),
        }

    def patch(self, model, mode, pv, unique_id=None):
        from .attention import LOW_BIT_STEPS, install
        state = None
        if mode == LOW_BIT_STEPS:
            from ..dvdq_core import get_bit_state
            try:
                state = get_bit_state(model.model)
            except ValueError:
                raise _host().DVDQuantError(
                    "DVD-Quant 8-bit Attention: mode 'low-bit steps' follows DVD-Quant's activation bits per step: "
                    "connect a MODEL from DVD-Quant Loader or Apply (with a Bit Switch Scheduler), or use 'always'"
                ) from None
        return (install(model, mode, pv, state, node=unique_id, emit=_host().emit),)


NODE_CLASS_MAPPINGS = {
    "DVDQuantLoader": DVDQuantLoader,
    "DVDQuantApply": DVDQuantApply,
    "DVDQuantARQSettings": DVDQuantARQSettings,
    "DVDQuantBitSwitch": DVDQuantBitSwitch,
    "DVDQuantSave": DVDQuantSave,
    "DVDQuantAttention": DVDQuantAttention,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DVDQuantLoader": "DVD-Quant Loader",
    "DVDQuantApply": "DVD-Quant Apply",
    "DVDQuantARQSettings": "ARQ Settings",
    "DVDQuantBitSwitch": "Bit Switch Scheduler",
    "DVDQuantSave": "DVD-Quant Save",
    "DVDQuantAttention": "DVD-Quant 8-bit Attention",
}
