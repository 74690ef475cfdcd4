"""Tiny image writers for the demo (no imaging dependency): PNG, animated PNG (APNG), a 3x5
pixel font for labels, and an SVG step plot."""
from __future__ import annotations

import struct
import zlib

import numpy as np

# 3x5 glyphs, rows top to bottom, '1' = ink.
_FONT = {
    "A": "010101111101101", "B": "110101110101110", "C": "011100100100011", "D": "110101101101110",
    "E": "111100110100111", "F": "111100110100100", "G": "011100101101011", "H": "101101111101101",
    "I": "111010010010111", "J": "001001001101010", "K": "101101110101101", "L": "100100100100111",
    "M": "101111111101101", "N": "110101101101101", "O": "010101101101010", "P": "110101110100100",
    "Q": "010101101110011", "R": "110101110101101", "S": "011100010001110", "T": "111010010010010",
    "U": "101101101101111", "V": "101101101101010", "W": "101101111111101", "X": "101101010101101",
    "Y": "101101010010010", "Z": "111001010100111", "0": "111101101101111", "1": "010110010010111",
    "2": "110001010100111", "3": "110001010001110", "4": "101101111001001", "5": "111100110001110",
    "6": "011100111101111", "7": "111001010010010", "8": "111101111101111", "9": "111101111001110",
    " ": "000000000000000", "-": "000000111000000", "/": "001001010100100", ".": "000000000000010",
    "|": "010010010010010", "=": "000111000111000", ":": "000010000010000",
}


def draw_text(img: np.ndarray, text: str, x: int, y: int, colour=(255, 255, 255), scale: int = 1):
    """Draw ``text`` (upper-cased; unknown characters as blanks) into uint8 img [H, W, 3]."""
    for ch in text.upper():
        glyph = _FONT.get(ch, _FONT[" "])
        for i, bit in enumerate(glyph):
            if bit == "1":
                r, c = divmod(i, 3)
                y0, x0 = y + r * scale, x + c * scale
                img[y0:y0 + scale, x0:x0 + scale] = colour
        x += 4 * scale
    return img


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _scanlines(rgb: np.ndarray) -> bytes:
    h = rgb.shape[0]
    rows = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, -1)], axis=1)
    return zlib.compress(rows.tobytes(), 9)


def _check(frames: np.ndarray) -> np.ndarray:
    frames = np.ascontiguousarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    return frames


def write_png(path, rgb: np.ndarray):
    rgb = _check(rgb[None])[0]
    h, w, _ = rgb.shape
    data = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    data += _chunk(b"IDAT", _scanlines(rgb)) + _chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(data)


def write_apng(path, frames: np.ndarray, fps: float = 8.0):
    """Animated PNG of uint8 frames [T, H, W, 3], looping forever (browsers play it; viewers
    without APNG support show the first frame)."""
    frames = _check(frames)
    t, h, w, _ = frames.shape
    delay = (int(round(1000 / fps)), 1000)
    out = [b"\x89PNG\r\n\x1a\n", _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)),
           _chunk(b"acTL", struct.pack(">II", t, 0))]
    seq = 0
    for i in range(t):
        out.append(_chunk(b"fcTL", struct.pack(">IIIIIHHBB", seq, w, h, 0, 0, *delay, 0, 0)))
        seq += 1
        payload = _scanlines(frames[i])
        if i == 0:
            out.append(_chunk(b"IDAT", payload))
        else:
            out.append(_chunk(b"fdAT", struct.pack(">I", seq) + payload))
            seq += 1
    out.append(_chunk(b"IEND", b""))
    with open(path, "wb") as f:
        f.write(b"".join(out))


def video_grid(rows: list, col_titles: list, row_titles: list, upscale: int = 3, pad: int = 2) -> np.ndarray:
    """Lay out clips as a grid: ``rows[r][c]`` is a clip [3, F, H, W] in [-1, 1] (numpy or torch).
    Returns uint8 frames [F, H', W', 3] with the column titles on top and row titles left."""
    clips = [[np.asarray(c, dtype=np.float32) for c in row] for row in rows]
    _, nf, h, w = clips[0][0].shape
    ch, cw = h * upscale, w * upscale
    title_h = 5 * 1 + 4 + 2
    left = max((len(t) for t in row_titles), default=0) * 4 + 4 if row_titles else 0
    n_r, n_c = len(clips), len(clips[0])
    col_w = max(cw, max(len(t) for t in col_titles) * 4 + 2)
    height = title_h + n_r * (ch + pad) + pad
    width = left + n_c * (col_w + pad) + pad
    canvas = np.full((nf, height, width, 3), 24, np.uint8)
    for c, title in enumerate(col_titles):
        for f in range(nf):
            draw_text(canvas[f], title, left + pad + c * (col_w + pad), 3)
    for r, row in enumerate(clips):
        y = title_h + pad + r * (ch + pad)
        for f in range(nf):
            if row_titles:
                draw_text(canvas[f], row_titles[r], 2, y + ch // 2 - 2, (200, 200, 200))
        for c, clip in enumerate(row):
            x = left + pad + c * (col_w + pad) + (col_w - cw) // 2
            pix = ((np.clip(clip, -1, 1) + 1) * 127.5 + 0.5).astype(np.uint8)     # [3, F, H, W]
            pix = pix.transpose(1, 2, 3, 0).repeat(upscale, 1).repeat(upscale, 2)
            canvas[:, y:y + ch, x:x + cw] = pix
    return canvas


def bits_svg(series: dict, indicator: list | None = None, title: str = "activation bits per step") -> str:
    """SVG step plot of bits per denoising step for each schedule in ``series`` (name -> list),
    with the delta-GBS indicator (relative L1 change of the model output) as bars if given."""
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    n = max(len(v) for v in series.values())
    w, h, ml, mr, mt, mb = 640, 300, 50, 150, 30, 40
    pw, ph = w - ml - mr, h - mt - mb
    lo, hi = 0, 16

    def px(i):
        return ml + pw * i / max(n, 1)

    def py(b):
        return mt + ph * (1 - (b - lo) / (hi - lo))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
             f'<rect width="{w}" height="{h}" fill="white"/>',
             f'<text x="{ml}" y="18" font-size="13">{title}</text>']
    if indicator:
        vals = [v for v in indicator if v is not None]
        top = max(vals) if vals else 1.0
        for i, v in enumerate(indicator):
            if v is None:
                continue
            bh = ph * 0.5 * v / top if top > 0 else 0
            parts.append(f'<rect x="{px(i) + 1:.1f}" y="{mt + ph - bh:.1f}" width="{pw / n - 2:.1f}" '
                         f'height="{bh:.1f}" fill="#ddd"/>')
        parts.append(f'<text x="{w - mr + 8}" y="{h - mb}" fill="#888">bars: L1 change</text>')
        parts.append(f'<text x="{w - mr + 8}" y="{h - mb + 13}" fill="#888">(max {top:.3f})</text>')
    for b in (4, 6, 8, 16):
        parts.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{py(b):.1f}" y2="{py(b):.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{ml - 8}" y="{py(b) + 4:.1f}" text-anchor="end">{b}</text>')
    for i in range(0, n + 1, max(1, n // 10)):
        parts.append(f'<text x="{px(i):.1f}" y="{h - mb + 15}" text-anchor="middle">{i}</text>')
    parts.append(f'<text x="{ml + pw / 2}" y="{h - 8}" text-anchor="middle">denoising step</text>')
    parts.append(f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>')
    for k, (name, bits) in enumerate(series.items()):
        col = colours[k % len(colours)]
        off = (k - (len(series) - 1) / 2) * 1.5  # keep overlapping lines visible
        pts = []
        for i, b in enumerate(bits):
            b = 16 if b is None else b
            pts += [f"{px(i):.1f},{py(b) + off:.1f}", f"{px(i + 1):.1f},{py(b) + off:.1f}"]
        parts.append(f'<polyline points="{" ".join(pts)}" fill="none" stroke="{col}" stroke-width="2"/>')
        parts.append(f'<text x="{w - mr + 8}" y="{mt + 12 + 14 * k}" fill="{col}">{name}</text>')
    parts.append("</svg>")
    return "\n".join(parts)
