"""Procedural video clips for the mini-Wan demo, and a detector for this domain.

A clip is 16 frames of 32x32 RGB: one shape (square, circle, triangle) of one colour on a black
background, moving left, right, up or down at about one pixel per frame. Its prompt is the three
words (colour, shape, motion), e.g. "a red circle moving left"; 6 x 3 x 4 = 72 prompts. Size,
speed and start position vary per clip. Pixels are in [-1, 1] (black = -1).

The detector reads colour, shape and motion back from any clip (real or generated): foreground =
pixels whose brightest channel is above half; colour = nearest palette entry to the mean
foreground colour; shape = which of a square, a circle and a triangle of the same area at the same
centroid overlaps the mask best (IoU), by majority over frames; motion = sign of the dominant axis of the centroid's
displacement from the first to the last frame.
"""
from __future__ import annotations

import torch

COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan")
PALETTE = torch.tensor([[1.0, 0.1, 0.1], [0.1, 1.0, 0.1], [0.2, 0.35, 1.0],
                        [1.0, 1.0, 0.1], [1.0, 0.1, 1.0], [0.1, 1.0, 1.0]])
SHAPES = ("square", "circle", "triangle")
MOTIONS = ("left", "right", "up", "down")
_MOTION_VEC = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.0, 1.0]])  # (dx, dy), y down

# Prompt token ids: 0 = empty prompt (the unconditional branch of CFG).
VOCAB = ("",) + COLOURS + SHAPES + MOTIONS
_SHAPE_BASE = 1 + len(COLOURS)
_MOTION_BASE = _SHAPE_BASE + len(SHAPES)

FRAMES, SIZE = 16, 32
NUM_PROMPTS = len(COLOURS) * len(SHAPES) * len(MOTIONS)


def labels_to_prompt_ids(labels: torch.Tensor) -> torch.Tensor:
    """labels [N, 3] (colour, shape, motion indices) -> prompt token ids [N, 3]."""
    offsets = torch.tensor([1, _SHAPE_BASE, _MOTION_BASE], device=labels.device)
    return labels + offsets


def prompt_text(label) -> str:
    c, s, m = (int(v) for v in label)
    return f"a {COLOURS[c]} {SHAPES[s]} moving {MOTIONS[m]}"


def parse_prompt(text: str) -> torch.Tensor:
    """'a red circle moving left' -> labels [3]; raises ValueError naming the allowed words."""
    words = text.lower().replace(",", " ").split()
    found = []
    for names in (COLOURS, SHAPES, MOTIONS):
        hit = [i for i, n in enumerate(names) if n in words]
        if len(hit) != 1:
            raise ValueError(f"prompt {text!r} must name exactly one of {', '.join(names)}")
        found.append(hit[0])
    return torch.tensor(found)


def all_labels() -> torch.Tensor:
    """Every (colour, shape, motion) combination, [72, 3]."""
    c, s, m = torch.meshgrid(torch.arange(len(COLOURS)), torch.arange(len(SHAPES)),
                             torch.arange(len(MOTIONS)), indexing="ij")
    return torch.stack([c.flatten(), s.flatten(), m.flatten()], dim=1)


def make_clips(n: int, generator: torch.Generator, device="cpu", labels: torch.Tensor | None = None):
    """Render n clips. Returns (video [n, 3, 16, 32, 32] float32 in [-1, 1], labels [n, 3]).

    All randomness comes from ``generator`` (which must live on ``device``), so a seed gives the
    same clips on the same device."""
    dev = torch.device(device)

    def rand(*shape):
        return torch.rand(*shape, generator=generator, device=dev)

    if labels is None:
        labels = torch.stack([
            torch.randint(len(COLOURS), (n,), generator=generator, device=dev),
            torch.randint(len(SHAPES), (n,), generator=generator, device=dev),
            torch.randint(len(MOTIONS), (n,), generator=generator, device=dev)], dim=1)
    labels = labels.to(dev)
    half = 4.0 + 2.0 * rand(n)                         # half-size 4..6 px
    speed = 0.8 + 0.4 * rand(n)                        # px per frame
    vec = _MOTION_VEC.to(dev)[labels[:, 2]] * speed[:, None]
    travel = vec * (FRAMES - 1)
    # Start so the whole path stays inside the frame (1 px margin).
    lo = half[:, None] + 1 - torch.clamp(travel, max=0)
    hi = SIZE - half[:, None] - 1 - torch.clamp(travel, min=0)
    start = lo + (hi - lo) * rand(n, 2)

    f = torch.arange(FRAMES, device=dev, dtype=torch.float32)
    centre = start[:, None, :] + f[None, :, None] * vec[:, None, :]       # [n, F, 2]
    pix = torch.arange(SIZE, device=dev, dtype=torch.float32) + 0.5
    dx = pix[None, None, None, :] - centre[..., 0, None, None]            # [n, F, 1, W]
    dy = pix[None, None, :, None] - centre[..., 1, None, None]            # [n, F, H, 1]
    r = half[:, None, None, None]
    square = (dx.abs() <= r) & (dy.abs() <= r)
    circle = dx * dx + dy * dy <= r * r
    triangle = (dy.abs() <= r) & (dx.abs() <= (dy + r) / 2)              # apex up
    shape = labels[:, 1][:, None, None, None]
    mask = torch.where(shape == 0, square, torch.where(shape == 1, circle, triangle)).float()
    colour = PALETTE.to(dev)[labels[:, 0]]                                 # [n, 3]
    video = mask[:, None] * colour[:, :, None, None, None]                 # [n, 3, F, H, W]
    return video * 2 - 1, labels


def detect(video: torch.Tensor) -> dict:
    """Read (colour, shape, motion) from clips [n, 3, F, H, W] in [-1, 1].

    Returns a dict of tensors: ``labels`` [n, 3] (-1 where nothing was found), ``found`` [n],
    ``traj_rmse_px`` [n] (RMS distance of the centroid track from its best straight line) and
    ``area_cv`` [n] (frame-to-frame variation of the object's area): the last two measure the
    temporal consistency of the clip itself."""
    v = ((video.float().clamp(-1, 1) + 1) / 2).cpu()                      # [n, 3, F, H, W] in [0, 1]
    n, _, nf, h, w = v.shape
    mask = v.amax(dim=1) > 0.5                                             # [n, F, H, W]
    area = mask.flatten(2).sum(-1).float()                                 # [n, F]
    present = area >= 4
    found = present.sum(1) >= nf // 2

    # Colour: mean foreground colour over all frames -> nearest palette entry.
    m = mask[:, None].float()
    mean_rgb = (v * m).flatten(2).sum(-1) / m.flatten(2).sum(-1).clamp(min=1)
    colour = torch.cdist(mean_rgb, PALETTE).argmin(1)

    # Shape: per frame, IoU of the mask with a square, a circle and an apex-up triangle of the
    # same area placed at the mask's centroid; majority vote over frames. (Robust to ragged edges.)
    ys = torch.arange(h, dtype=torch.float32).view(1, 1, h, 1) + 0.5
    xs = torch.arange(w, dtype=torch.float32).view(1, 1, 1, w) + 0.5
    a = area.clamp(min=1)[..., None, None]
    cxm = ((mask * xs).flatten(2).sum(-1) / area.clamp(min=1))[..., None, None]
    cym = ((mask * ys).flatten(2).sum(-1) / area.clamp(min=1))[..., None, None]
    dx, dy = xs - cxm, ys - cym
    half = a.sqrt() / 2
    r_circle = (a / torch.pi).sqrt()
    r_tri = (a / 2).sqrt()
    dyt = dy + r_tri / 3                       # the triangle's centroid lies r/3 below its centre
    templates = [(dx.abs() <= half) & (dy.abs() <= half),
                 dx * dx + dy * dy <= r_circle * r_circle,
                 (dyt.abs() <= r_tri) & (dx.abs() <= (dyt + r_tri) / 2)]
    iou = torch.stack([(t & mask).flatten(2).sum(-1) / (t | mask).flatten(2).sum(-1).clamp(min=1)
                       for t in templates], dim=-1)                         # [n, F, 3]
    per_frame = iou.argmax(-1)
    votes = torch.stack([((per_frame == k) & present).sum(1) for k in range(len(SHAPES))], dim=1)
    shape = votes.argmax(1)

    # Motion: centroid track; dominant axis of the displacement between first and last quarter.
    cx, cy = cxm[..., 0, 0], cym[..., 0, 0]
    q = max(nf // 4, 1)
    w_first, w_last = present[:, :q].float(), present[:, -q:].float()

    def avg(c, wts, sl):
        return (c[:, sl] * wts).sum(1) / wts.sum(1).clamp(min=1)
    ddx = avg(cx, w_last, slice(nf - q, nf)) - avg(cx, w_first, slice(0, q))
    ddy = avg(cy, w_last, slice(nf - q, nf)) - avg(cy, w_first, slice(0, q))
    horizontal = ddx.abs() >= ddy.abs()
    motion = torch.where(horizontal, torch.where(ddx < 0, 0, 1), torch.where(ddy < 0, 2, 3))

    # Temporal consistency: straight-line fit of the centroid track, area variation.
    t = torch.arange(nf, dtype=torch.float32)[None].expand(n, nf)
    pw = present.float()
    cnt = pw.sum(1).clamp(min=2)

    def line_residual(c):
        tm = (t * pw).sum(1) / cnt
        cm = (c * pw).sum(1) / cnt
        slope = ((t - tm[:, None]) * (c - cm[:, None]) * pw).sum(1) / \
            ((t - tm[:, None]) ** 2 * pw).sum(1).clamp(min=1e-6)
        fit = cm[:, None] + slope[:, None] * (t - tm[:, None])
        return ((c - fit) ** 2 * pw).sum(1) / cnt
    traj_rmse = (line_residual(cx) + line_residual(cy)).sqrt()
    area_mean = (area * pw).sum(1) / cnt
    area_cv = (((area - area_mean[:, None]) ** 2 * pw).sum(1) / cnt).sqrt() / area_mean.clamp(min=1)

    labels = torch.stack([colour, shape, motion], dim=1)
    labels[~found] = -1
    return {"labels": labels, "found": found, "traj_rmse_px": traj_rmse, "area_cv": area_cv}


def task_accuracy(video: torch.Tensor, labels: torch.Tensor) -> dict:
    """Fractions of clips whose detected colour / shape / motion / all three match ``labels``,
    and the mean temporal-consistency measures."""
    det = detect(video)
    hit = det["labels"] == labels.cpu()
    return {"colour": hit[:, 0].float().mean().item(), "shape": hit[:, 1].float().mean().item(),
            "motion": hit[:, 2].float().mean().item(), "all": hit.all(1).float().mean().item(),
            "traj_rmse_px": det["traj_rmse_px"].mean().item(), "area_cv": det["area_cv"].mean().item()}
