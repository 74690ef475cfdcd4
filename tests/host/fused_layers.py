"""Print (as JSON) which QuantLinear layers get the feed-forward GELU fused when ComfyUI's own Wan and
HunyuanVideo classes are quantized (run with ComfyUI on sys.path; test_comfyui_host.py runs it)."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from make_models import build_module, randomize  # noqa: E402  (sets ComfyUI to CPU first)

import dvdq_core as dq  # noqa: E402

out = {}
for kind in ("wan21_t2v", "hunyuan_video"):
    m = build_module(kind)
    m.load_state_dict({k: v.float() for k, v in randomize(m.state_dict(), 0).items()})
    dq.quantize_model(m, dq.QuantConfig(backend="reference"))
    out[kind] = sorted(name for name, q in dq.quantized_layers(m) if q.act == "gelu_tanh")
print(json.dumps(out))
