"""DVD-Quant core: data-free quantization of video diffusion transformers (pure PyTorch, no ComfyUI).

BGR weights (`bgr_quantize`), ARQ activations (`QuantLinear`), delta-GBS bit switching (`BitSwitch`).
See docs/design.md for the math and the contracts.
"""
from .backends import Backend, Capabilities, list_backends, register as register_backend, use_backend
from .bitswitch import BitSwitch, StepRecord
from .config import LayerRule, QuantConfig, parse_overrides
from .linear import BitState, QuantLinear
from .model import LayerReport, QuantReport, get_bit_state, quantize_model, quantized_layers, set_activation_bits
from .serialization import load_quantized, read_metadata, save_quantized
from .spec import LayerSpec
from .weights import QuantizedWeight, bgr_quantize, minmax_quantize

__version__ = "0.1.0"
__all__ = ["Backend", "BitState", "BitSwitch", "Capabilities", "LayerReport", "LayerRule", "LayerSpec", "QuantConfig",
           "QuantLinear",
           "QuantReport", "QuantizedWeight", "StepRecord", "bgr_quantize", "get_bit_state", "load_quantized",
           "list_backends", "minmax_quantize", "parse_overrides", "quantize_model", "quantized_layers",
           "read_metadata", "register_backend", "save_quantized", "set_activation_bits", "use_backend"]
