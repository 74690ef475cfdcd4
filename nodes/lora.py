"""LoRAs after quantization: ComfyUI's weight patches on a quantized layer become its low-rank branch
(dvdq_core/lowrank.py) instead of changes to the packed codes.

ComfyUI's LoRA nodes map a LoRA onto layers by their `weight` keys (which quantized layers keep) and add
the factors to the MODEL as patches; the host applies them while it loads the model, in one of three ways:
- fully loaded layers: `ModelPatcher.patch_weight_to_device(key)` on the weights it loads. The pack's patcher
  class (a subclass of the host's own, as ComfyUI-GGUF's) keeps the packed bytes out of that and, after each
  load, gives every quantized layer its patch lists;
- low-VRAM layers: a `LowVramPatch` in the layer's `weight_function` / `bias_function`;
- dynamic VRAM (0.15 on): a `LowVramPatch` as `weight_lowvram_function` / `bias_lowvram_function`.
All three carry the MODEL's own patch lists: after each load (and hook switch) the pack's patcher builds
each layer's branch from those lists (`refresh`); the layer's forward is the core's. Forms that are no low-rank product
(LoHa, LoKr, DoRA, full-weight differences, ...) are refused before sampling with what to do instead.

ComfyUI modules are imported inside the functions (see host.py).
"""

import logging

from ..dvdq_core import quantized_layers
from ..dvdq_core.lowrank import LowRankTerm, stack

log = logging.getLogger("dvdq")

CACHED_BRANCHES = 3  # per layer: the MODEL's LoRAs alone and with each of two hook groups
FUNCTION_ATTRS = ("weight_function", "bias_function", "weight_lowvram_function", "bias_lowvram_function")


class UnsupportedPatch(ValueError):
    """A weight patch that cannot run as a low-rank branch; str() names its form."""


def _adapter_form(v) -> str:
    name = type(v).__name__
    return {"LoHaAdapter": "a LoHa (Hadamard-product LoRA)", "LoKrAdapter": "a LoKr (Kronecker-product LoRA)",
            "GLoRAAdapter": "a GLoRA", "OFTAdapter": "an OFT (orthogonal fine-tuning) patch",
            "BOFTAdapter": "a BOFT patch"}.get(name, f"a {name} patch")


def patch_terms(key: str, patches: list):
    """([LowRankTerm], [(scale, bias diff)]) for one weight or bias key's ComfyUI patch list
    [(strength, adapter or tuple, strength_model, offset, function), ...]; raises UnsupportedPatch."""
    from comfy.weight_adapter.lora import LoRAAdapter
    terms, biases = [], []
    is_bias = key.endswith(".bias")
    for p in patches:
        strength, v, strength_model, offset, function = p[0], p[1], p[2], p[3], p[4]
        if function is not None:
            raise UnsupportedPatch("a patch with a transform function")
        if strength_model != 1.0:
            raise UnsupportedPatch("a patch that also scales the base weight (strength_model)")
        if isinstance(v, list):
            raise UnsupportedPatch("a chained patch")
        if isinstance(v, LoRAAdapter):
            up, down, alpha, mid, dora_scale, reshape = v.weights[:6]
            if dora_scale is not None:
                raise UnsupportedPatch("a DoRA (its weight-norm rescaling needs the merged weight)")
            if mid is not None:
                raise UnsupportedPatch("a LoCon with a Tucker mid weight (a convolution form)")
            if reshape is not None:
                raise UnsupportedPatch("a LoRA that reshapes the weight")
            if is_bias:
                raise UnsupportedPatch("a low-rank patch on a bias")
            scale = float(strength) * (float(alpha) / down.shape[0] if alpha is not None else 1.0)
            rows = cols = None
            if offset is not None:  # (dim, start, length): the patch addresses a slice of the weight
                if offset[0] not in (0, 1):
                    raise UnsupportedPatch(f"a patch on a slice along dimension {offset[0]}")
                rows, cols = ((offset[1], offset[2]), None) if offset[0] == 0 else (None, (offset[1], offset[2]))
            terms.append(LowRankTerm(up, down, scale, rows, cols))
            continue
        if not isinstance(v, tuple):  # another adapter class
            raise UnsupportedPatch(_adapter_form(v))
        kind, data = ("diff", v) if len(v) == 1 else (v[0], v[1])
        if kind != "diff":
            raise UnsupportedPatch({"set": "a weight replacement", "model_as_lora": "a model merge"}.get(
                kind, f"a {kind!r} patch"))
        if not is_bias:
            raise UnsupportedPatch("a full-weight difference (not low-rank)")
        if offset is not None:
            raise UnsupportedPatch("a bias difference on a slice")
        biases.append((float(strength), data[0]))
    return terms, biases


def unsupported_message(form: str, key: str) -> str:
    return (f"DVD-Quant: the LoRA patch on {key} is {form}, which cannot run beside the 4-bit weights. Standard LoRAs "
            "(kohya, diffusers, lora_A/lora_B, LoCon on linear layers) work after the DVD-Quant Loader at any strength. "
            "For this one, put the LoRA loader before 'DVD-Quant Apply' (Load Diffusion Model -> LoRA -> DVD-Quant "
            "Apply): it is then merged into the weights before they are quantized.")


def _patch_lists(layer) -> list:
    """[(key, patch list)] this layer runs now: the MODEL's patches (given by the pack's patcher after each load;
    the LowVramPatch functions the host gives offloaded layers wrap the same lists, and a dynamic patcher
    leaves them behind after unloading, so they are not read) and hook LoRAs' patches. Raises UnsupportedPatch
    for any other weight function (a weight wrapper)."""
    from comfy.model_patcher import LowVramPatch
    for attr in FUNCTION_ATTRS:
        fns = getattr(layer, attr, None)
        for f in (fns if isinstance(fns, (list, tuple)) else [fns] if fns is not None else []):
            if not isinstance(f, LowVramPatch):
                raise UnsupportedPatch(f"a weight wrapper ({type(f).__name__}), which needs the float weight")
    return (sorted((k, v) for k, v in layer.lora_patches.items() if v)
            + sorted((k, v) for k, v in layer.hook_patches.items() if v))


def refresh(layer, device, dtype):
    """Set the layer's branch (QuantLinear.lowrank) from the patch lists it has now, in `dtype` on `device`
    (where its calls run); rebuilt only when the lists, strengths, device or dtype changed. Runs when the
    host loads, unloads or switches hooks, never inside the forward (which torch.compile then traces as the
    core's plain QuantLinear). A form no branch runs (which the check before sampling refuses first) raises
    DVDQuantError naming it."""
    try:
        lists = _patch_lists(layer)
        if not lists:
            layer.lowrank, layer.lowrank_cache = None, None
            return
        sig = (device, dtype, tuple((k, tuple((p[0], id(p[1]), p[2], p[3]) for p in lst)) for k, lst in lists))
        cache = layer.lowrank_cache or {}  # a few recent sets: hook LoRAs switch every step (cond / uncond)
        if sig not in cache:
            # the weight's own SVD branch (QuantLinear.svd_branch) joins the LoRAs' terms: one stacked branch
            own = layer.svd_branch()
            terms, biases = ([] if own is None else [LowRankTerm(own.up, own.down, 1.0)]), []
            for key, lst in lists:
                t, b = patch_terms(key, lst)
                terms += t
                biases += b
            while len(cache) >= CACHED_BRANCHES:
                cache.pop(next(iter(cache)))
            # the patch lists are kept with the signature: the ids in it stay those of live adapters
            cache[sig] = (stack(terms, biases, layer.out_features, layer.in_features, device, dtype),
                          [list(v) for _, v in lists])
        layer.lowrank_cache = cache
    except UnsupportedPatch as e:
        from .host import DVDQuantError
        raise DVDQuantError(unsupported_message(str(e), f"a layer of {layer.out_features} x {layer.in_features}")) \
            from None
    layer.lowrank = cache[sig][0]


def packed_layer(model, key: str):
    """The quantized layer whose `weight` or `bias` the state-dict key names, else None."""
    from .host import layer_class
    owner, _, param = key.rpartition(".")
    if param not in ("weight", "bias"):
        return None
    try:
        m = model.get_submodule(owner)
    except AttributeError:
        return None
    return m if isinstance(m, layer_class()) else None


class _LowRankPatching:
    """Mixed into the host's ModelPatcher class for quantized MODELs (patcher_class)."""

    def load(self, *args, **kwargs):
        out = super().load(*args, **kwargs)
        # every quantized layer gets this MODEL's patches, whatever the host did with the layer: it walks
        # parameters only, and the packed codes are buffers until a dynamic load makes them parameters
        dm = getattr(self.model, "diffusion_model", None)
        branches = branch_bytes = 0
        for name, layer in quantized_layers(dm) if dm is not None else []:
            keys = [f"diffusion_model.{name}.{p}" for p in ("weight", "bias")]
            layer.lora_patches = {k: self.patches[k] for k in keys if self.patches.get(k)}
            self._refresh(layer)
            if layer.lowrank is not None:
                branches, branch_bytes = branches + 1, branch_bytes + layer.lowrank.nbytes()
        if branches:  # outside ComfyUI's memory accounting: said, so a user sees what the LoRAs take
            log.info("DVD-Quant: LoRAs after quantization run as branches on %d layers (%.0f MiB on %s, including a "
                     "copy of each layer's SVD branch stacked with them)", branches, branch_bytes / 2**20,
                     self.load_device)
        return out

    def _refresh(self, layer):
        """The layer's branch where its calls run: the load device, the model's compute dtype."""
        dtype = getattr(self.model, "manual_cast_dtype", None) or self.model.get_dtype()
        refresh(layer, self.load_device, dtype)

    def patch_weight_to_device(self, key, device_to=None, *args, **kwargs):
        if key not in self.patches or packed_layer(self.model, key) is None:
            return super().patch_weight_to_device(key, device_to, *args, **kwargs)
        # the packed codes never take a patch (the layer's branch runs it): the host's own no-patch path
        hidden = self.patches.pop(key)
        try:
            return super().patch_weight_to_device(key, device_to, *args, **kwargs)
        finally:
            self.patches[key] = hidden

    # hook LoRAs (Create Hook LoRA on a conditioning): the host patches weights per hook group while sampling
    def patch_hook_weight_to_device(self, hooks, combined_patches, key, original_weights, memory_counter):
        layer = packed_layer(self.model, key)
        if layer is None or key not in combined_patches:
            return super().patch_hook_weight_to_device(hooks, combined_patches, key, original_weights, memory_counter)
        layer.hook_patches[key] = combined_patches[key]
        self._refresh(layer)
        if original_weights is not None:
            original_weights.pop(key, None)
        import comfy.hooks
        if self.hook_mode == comfy.hooks.EnumHookMode.MaxSpeed:  # the host's cache of patched weights per hook
            # group: for a packed layer it holds the patch list (patch_cached_hook_weights below reads it)
            self.cached_hook_patches.setdefault(hooks, {})[key] = (combined_patches[key], None)

    def patch_cached_hook_weights(self, cached_weights, key, memory_counter):
        layer = packed_layer(self.model, key)
        if layer is None:
            return super().patch_cached_hook_weights(cached_weights, key, memory_counter)
        layer.hook_patches[key] = cached_weights[key][0]
        self._refresh(layer)

    def unpatch_hooks(self, whitelist_keys_set=None):
        out = super().unpatch_hooks(whitelist_keys_set)
        for layer in self._packed_layers():  # the host's argument names the keys to unpatch (all if empty)
            layer.hook_patches = {k: v for k, v in layer.hook_patches.items()
                                  if whitelist_keys_set and k not in whitelist_keys_set}
            self._refresh(layer)
        return out

    def _packed_layers(self):
        dm = getattr(self.model, "diffusion_model", None)
        return [m for _, m in quantized_layers(dm)] if dm is not None else []

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        out = super().unpatch_model(device_to, unpatch_weights)
        if unpatch_weights:
            for layer in self._packed_layers():
                layer.lora_patches = {}
                self._refresh(layer)
        return out


_CLASSES = {}


def patcher_class(cls):
    """The host's patcher class `cls` with the low-rank patching (one subclass per host class)."""
    if issubclass(cls, _LowRankPatching):
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type("DVDQuant" + cls.__name__, (_LowRankPatching, cls), {"__module__": __name__})
    return _CLASSES[cls]


def runs_lowrank(patcher) -> bool:
    return isinstance(patcher, _LowRankPatching)


def keep_lowrank_patching(src, new):
    """ON_CLONE callback: a clone the host makes of its own plain class (0.33's non-dynamic copies of a
    dynamic MODEL: for conditioning hooks, TorchCompileModel, a CPU device) gets the pack's patcher class of
    that class, so its LoRAs still run as branches. The mixin holds no state of its own."""
    if not runs_lowrank(new):
        new.__class__ = patcher_class(type(new))
