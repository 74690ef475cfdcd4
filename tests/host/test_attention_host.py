"""DVD-Quant 8-bit Attention inside a real ComfyUI (started with --cpu), through POST /prompt: the node's
override is ComfyUI's own per-model hook (transformer_options["optimized_attention_override"]), so it must
run on any model the host runs. On the CPU the kernel cannot run: every call goes back to ComfyUI's attention,
with one warning, and the result is the host's own, bit for bit."""
from prompt_runs import latent, run_error, run_ok
from prompts import node, sample_graph

T2V = "tiny_wan2.1_t2v.safetensors"
# (on the CPU ComfyUI runs the tiny model in float32: the first reason the node finds is the dtype)
HAND_BACK = "DVD-Quant 8-bit Attention: this call runs on ComfyUI's attention because "


def graph(prefix, *attention):
    """The tiny Wan T2V sampled with the node (attention: (mode, pv)) or without it (no arguments)."""
    nodes = {"unet": node("UNETLoader", unet_name=T2V, weight_dtype="default")}
    ref = ["unet", 0]
    if attention:
        nodes["att"] = node("DVDQuantAttention", model=ref, mode=attention[0], pv=attention[1])
        ref = ["att", 0]
    return sample_graph(nodes, ref, prefix)


def test_attention_node_hands_back_on_cpu_with_one_warning(server):
    info = server.get("/object_info/DVDQuantAttention")["DVDQuantAttention"]
    assert info["category"] == "DVD-Quant"
    assert info["input"]["required"]["mode"][0] == ["always", "low-bit steps (δ-GBS)", "never"]
    assert info["input"]["required"]["pv"][0] == ["auto", "fp8", "fp16"]
    ours = latent(server, run_ok(server, graph("attn_always", "always", "fp8"))[0])
    ours16 = latent(server, run_ok(server, graph("attn_fp16", "always", "fp16"))[0])
    # without the node, after it ran: the host's attention, on a model the node's clone left unchanged
    base = latent(server, run_ok(server, graph("attn_base"))[0])
    assert torch_equal(ours, base) and torch_equal(ours16, base)
    assert server.log().count(HAND_BACK) == 1, server.log()[-3000:]  # one warning for all calls and runs
    never = latent(server, run_ok(server, graph("attn_never", "never", "auto"))[0])
    assert torch_equal(never, base)


def test_attention_low_bit_mode_refused_without_dvdq(server):
    # "low-bit steps" follows DVD-Quant's activation bits: a plain model is refused with the node's own message
    err = run_error(server, graph("attn_lowbit", "low-bit steps (δ-GBS)", "auto"))
    assert "connect a MODEL from DVD-Quant Loader or Apply" in err, err


def torch_equal(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())
