"""API-format prompt builders for the host tests (tiny models, a few steps on the CPU)."""

WAN_COND = {"tokens": 8, "dim": 4096, "pooled": 0}
HY_COND = {"tokens": 8, "dim": 4096, "pooled": 768}


def node(class_type, **inputs):
    return {"class_type": class_type, "inputs": inputs}


def loader(name, w_bits=4, a_low=4, a_high=8, method="dvdq", save=False, arq=None):
    n = node("DVDQuantLoader", model_name=name, w_bits=w_bits, a_low=a_low, a_high=a_high, method=method,
             save_quantized_copy=save)
    if arq:
        n["inputs"]["arq_settings"] = arq
    return n


def bitswitch(model, mode="delta", delta=0.09, low=4, high=8, fixed_bits=8, schedule=""):
    return node("DVDQuantBitSwitch", model=model, mode=mode, delta=delta, low=low, high=high, fixed_bits=fixed_bits,
                schedule=schedule)


def sample_graph(model_nodes: dict, model_ref, prefix, steps=4, cfg=5.0, sampler="euler", latent=(16, 2, 8, 8),
                 cond=WAN_COND, seed=3):
    """model_nodes + conditioning + KSampler + SaveLatent."""
    g = dict(model_nodes)
    c, t, h, w = latent
    g["pos"] = node("DVDQTestCond", seed=11, **cond)
    g["neg"] = node("DVDQTestCond", seed=12, **cond)
    g["lat"] = node("DVDQTestLatent", channels=c, frames=t, height=h, width=w)
    g["ks"] = node("KSampler", model=model_ref, seed=seed, steps=steps, cfg=cfg, sampler_name=sampler,
                   scheduler="simple", positive=["pos", 0], negative=["neg", 0], latent_image=["lat", 0], denoise=1.0)
    g["save"] = node("SaveLatent", samples=["ks", 0], filename_prefix=prefix)
    return g
