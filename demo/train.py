"""Train the mini-Wan demo model on procedural clips (rectified flow, as Wan).

Re-make the shipped weights on one CUDA GPU (about 8 minutes on an H100)::

    python -m demo.train --out OUTDIR --steps STEPS

then, for the second stage the shipped weights had (see docs/demo.md for the exact numbers)::

    python -m demo.train --out OUTDIR2 --init OUTDIR/mini_wan.safetensors --seed 1 \
        --lr 2.5e-4 --warmup 100 --steps STEPS2

with the steps as recorded in the weights file's metadata (``train.steps``); without ``--steps``
the script measures its speed for 30 steps and picks the number of steps that fits
``--minutes``. Same seed -> same initialisation and the same stream of training clips; GPU
kernels are not bit-deterministic, so a re-made model matches closely, not bit for bit.

Hyperparameters (defaults): batch 256 clips of 16x32x32, AdamW lr 5e-4, betas (0.9, 0.99),
weight decay 0.01, 300 warm-up steps then cosine decay to 10%, gradient clipping 1.0, bf16
autocast, EMA 0.999 of the weights (the EMA is what ships), prompt dropped to empty for 10% of
clips (for classifier-free guidance), t = shift(u) with u uniform and shift 3 (Wan's shifted
schedule), loss = MSE between predicted and true velocity (noise - x0).

Writes OUTDIR/mini_wan.safetensors (fp16, EMA weights, re-written every ``--save-every``
seconds so an interrupted run keeps its progress) and OUTDIR/train_log.txt.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import time

import torch
import torch.nn.functional as F

from .clips import NUM_PROMPTS, all_labels, labels_to_prompt_ids, make_clips, task_accuracy
from .model import MiniWan, MiniWanConfig, save_mini_wan
from .sampling import sample, shift_time


def save_weights(model, path, **meta):
    """fp16 safetensors; a numpy .npz beside it if safetensors is missing on this machine."""
    try:
        save_mini_wan(model, path, extra_meta=meta)
    except ImportError:
        import numpy as np
        np.savez(str(path) + ".npz", __config__=np.frombuffer(model.cfg.to_json().encode(), np.uint8),
                 **{k: v.detach().cpu().half().numpy() for k, v in model.state_dict().items()})


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m demo.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--steps", type=int, default=0, help="training steps (0: fit --minutes)")
    p.add_argument("--stop-at", type=int, default=0, help="stop after this many steps (the LR schedule "
                   "still plans --steps); re-makes a run that its time budget cut short")
    p.add_argument("--minutes", type=float, default=8.0, help="time budget when --steps is 0, and a hard stop")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--p-uncond", type=float, default=0.1)
    p.add_argument("--shift", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=float, default=90.0, help="seconds between checkpoints")
    p.add_argument("--init", default=None, help="start from these mini-Wan weights (a second stage)")
    p.add_argument("--tiny", action="store_true", help="a tiny model for a CPU smoke test")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step (CUDA)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def lr_at(step, total, base, warmup):
    if step < warmup:
        return base * (step + 1) / warmup
    frac = (step - warmup) / max(total - warmup, 1)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


@torch.no_grad()
def evaluate(model, device, seed=1234, steps=20, cfg=5.0, shift=3.0, per_prompt=2):
    """Sample every prompt ``per_prompt`` times; detector accuracy on the samples."""
    labels = all_labels().repeat(per_prompt, 1).to(device)
    g = torch.Generator(device=device).manual_seed(seed)
    noise = torch.randn(labels.shape[0], 3, 16, 32, 32, generator=g, device=device)
    out = []
    for i in range(0, labels.shape[0], 72):
        out.append(sample(model, noise[i:i + 72], labels_to_prompt_ids(labels[i:i + 72]),
                          steps=steps, cfg=cfg, shift=shift, record=False).video)
    return task_accuracy(torch.cat(out), labels)


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    cfg = MiniWanConfig(dim=64, ffn_dim=128, num_layers=2, num_heads=2, freq_dim=64, text_dim=32) \
        if args.tiny else MiniWanConfig()
    model = MiniWan(cfg)
    if args.init:
        from .model import load_mini_wan
        model = load_mini_wan(args.init)
        cfg = model.cfg
    model = model.to(device)
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    data_gen = torch.Generator(device=device).manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    log_file = open(os.path.join(args.out, "train_log.txt"), "a")

    def log(msg):
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    def loss_fn(x0, labels):
        b = x0.shape[0]
        ids = labels_to_prompt_ids(labels)
        drop = torch.rand(b, generator=data_gen, device=device) < args.p_uncond
        ids = torch.where(drop[:, None], torch.zeros_like(ids), ids)
        t = shift_time(torch.rand(b, generator=data_gen, device=device), args.shift)
        noise = torch.randn(x0.shape, generator=data_gen, device=device)
        tb = t.view(b, 1, 1, 1, 1)
        xt = (1 - tb) * x0 + tb * noise
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            pred = forward(xt, t, ids)
        return F.mse_loss(pred.float(), noise - x0)

    forward = torch.compile(model) if args.compile else model
    log(f"mini-Wan: {n_params / 1e6:.2f} M parameters, config {cfg.to_json()}, device {device}, "
        f"batch {args.batch}, seed {args.seed}")

    total = args.steps or 10 ** 9
    t_start = time.time()
    last_save = t_start
    step = 0
    ema_loss = None
    while step < total:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total if args.steps or step >= 30 else 10 ** 9, args.lr, args.warmup)
        x0, labels = make_clips(args.batch, data_gen, device)
        try:
            loss = loss_fn(x0, labels)
        except Exception as exc:  # a torch.compile failure must not cost the run
            if forward is model:
                raise
            log(f"torch.compile failed ({type(exc).__name__}: {exc}); training eagerly")
            forward = model
            loss = loss_fn(x0, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        step += 1
        ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
        elapsed = time.time() - t_start
        if step == 30 and not args.steps:
            # Fit the run into the time budget (the first steps include warm-up/compile time).
            t30 = elapsed
            if device.type == "cuda":
                torch.cuda.synchronize()
            t_a = time.time()
            for _ in range(10):
                x0, labels = make_clips(args.batch, data_gen, device)
                loss = loss_fn(x0, labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
            if device.type == "cuda":
                torch.cuda.synchronize()
            per_step = (time.time() - t_a) / 10
            left = args.minutes * 60 - (time.time() - t_start) - 45  # keep time for the final eval
            total = step + max(int(left / per_step), 1)
            total = max(step + 1, (total // 100) * 100 or total)
            log(f"first 30 steps {t30:.1f}s, {per_step * 1000:.1f} ms/step -> {total} steps")
        if step % 200 == 0 or step == total:
            log(f"step {step}/{total} loss {ema_loss:.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{elapsed:.0f}s")
        if time.time() - last_save > args.save_every or step == total:
            save_weights(ema, os.path.join(args.out, "mini_wan.safetensors"),
                         **{"train.steps": step, "train.seed": args.seed, "train.batch": args.batch})
            last_save = time.time()
        if args.stop_at and step >= args.stop_at:
            log(f"stopping at step {step} (--stop-at)")
            break
        if elapsed > args.minutes * 60:
            log(f"time budget reached at step {step}")
            break
    save_weights(ema, os.path.join(args.out, "mini_wan.safetensors"),
                 **{"train.steps": step, "train.seed": args.seed, "train.batch": args.batch,
                    "train.planned_steps": total, "train.lr": args.lr, "train.init": args.init or ""})
    log(f"trained {step} steps in {time.time() - t_start:.0f}s; evaluating {NUM_PROMPTS} prompts x 2")
    eval_steps = 4 if args.tiny else 20
    acc = evaluate(ema, device, steps=eval_steps, per_prompt=1 if args.tiny else 2)
    log(f"detector on samples (CFG 5, {eval_steps} steps): " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    return acc


if __name__ == "__main__":
    main()
