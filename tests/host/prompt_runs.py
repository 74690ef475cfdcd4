"""What a prompt run gives back, for the host tests: runs that must succeed or fail, the saved latents, the
websocket events, and the relative difference of two results."""
import os

from safetensors.torch import load_file


def run_ok(server, prompt):
    hist, msgs, err = server.run(prompt)
    assert err is None, f"{err}\n--- server log tail ---\n{server.log()[-3000:]}"
    return hist, msgs


def run_error(server, prompt) -> str:
    hist, msgs, err = server.run(prompt)
    assert err is not None, "the prompt was expected to fail"
    return err


def latent(server, hist, node_id="save"):
    """The latent the SaveLatent node node_id wrote (None: the first node that saved one)."""
    outputs = hist["outputs"]
    out = outputs[node_id] if node_id is not None else next(o for o in outputs.values() if "latents" in o)
    item = out["latents"][0]
    path = os.path.join(server.base_dir, "output", item["subfolder"], item["filename"])
    return load_file(path)["latent_tensor"].float()


def run_latent(server, prompt):
    """(latent, websocket messages) of a prompt that must succeed and saves one latent."""
    hist, msgs = run_ok(server, prompt)
    return latent(server, hist, None), msgs


def events(msgs, kind):
    return [m["data"] for m in msgs if m.get("type") == kind]


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()
