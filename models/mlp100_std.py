"""The 100-layer MLP experiment of the seed lesson (seeds/001): why BatchNorm keeps the scale.

A stack of 100 Linear(256, 256, bias=False) + ReLU layers is fed one batch of 16 N(0, 1) rows,
and the standard deviation of every layer's output is recorded for four settings:

- default init: torch's Linear init, U(-1/sqrt(256), 1/sqrt(256)); each layer shrinks the
  scale (~0.41x), so the signal vanishes (std ~1e-39 at layer 100);
- N(0, 1) init: each layer multiplies the scale by ~sqrt(256/2) = 11; inf, then NaN, by layer ~40;
- Kaiming init: N(0, 2/fan_in) keeps the scale near 1 (He et al. 2015);
- bnfold BatchNorm1d after each Linear (default init, training mode): the scale is reset to
  ~0.58 (the std of ReLU(N(0, 1))) at every layer, whatever the init.

Writes std_per_layer.csv and std_per_layer.png (log10 std per layer) under --out and prints a
summary. matplotlib is not required: the PNG is drawn with numpy and written with zlib.

    python models/mlp100_std.py [--out models/out/] [--seed 1]
"""

from __future__ import annotations

import argparse
import csv
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from bnfold.torch import BatchNorm1d

LAYERS, UNITS, BATCH = 100, 256, 16
SETTINGS = {  # name -> (weight init or None for torch's default, BatchNorm after each Linear)
    "DEFAULT INIT": (None, False),
    "N(0,1) INIT": (lambda w: torch.nn.init.normal_(w, std=1.0), False),
    "KAIMING INIT": (torch.nn.init.kaiming_normal_, False),
    "BNFOLD BATCHNORM1D": (None, True),
}
CSV_NAMES = {"DEFAULT INIT": "default_init", "N(0,1) INIT": "normal_init",
             "KAIMING INIT": "kaiming_init", "BNFOLD BATCHNORM1D": "bnfold_batchnorm1d"}
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]


def build_mlp(init, with_bn: bool) -> torch.nn.Sequential:
    layers: list[torch.nn.Module] = []
    for _ in range(LAYERS):
        linear = torch.nn.Linear(UNITS, UNITS, bias=False)
        if init is not None:
            init(linear.weight)
        layers += [linear, BatchNorm1d(UNITS)] if with_bn else [linear]
        layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


@torch.no_grad()
def std_per_layer(model: torch.nn.Sequential, x: torch.Tensor) -> list[float]:
    """std of each ReLU's output, as the lesson prints it; NaN once the signal is no longer finite."""
    stds = []
    for module in model:
        x = module(x)
        if isinstance(module, torch.nn.ReLU):
            stds.append(x.std().item())
    return stds


def run(seed: int) -> dict[str, list[float]]:
    x = torch.randn(BATCH, UNITS, generator=torch.Generator().manual_seed(seed))
    results = {}
    for name, (init, with_bn) in SETTINGS.items():
        torch.manual_seed(seed)  # the same default weights for DEFAULT INIT and the BN run
        results[name] = std_per_layer(build_mlp(init, with_bn), x)
    return results


def first_bad_layer(stds: list[float]) -> int | None:
    """1-based layer where std stops being finite and positive (overflow, NaN or underflow to 0)."""
    for i, s in enumerate(stds):
        if not (math.isfinite(s) and s > 0):
            return i + 1
    return None


# ---- a minimal PNG line plot (no matplotlib): 5x7 bitmap font, numpy canvas, zlib -------------

_GLYPHS = {  # 5x7 bitmap font: seven rows of five pixels, '|' between rows
    'A': ' ### |#   #|#   #|#####|#   #|#   #|#   #',
    'B': '#### |#   #|#   #|#### |#   #|#   #|#### ',
    'C': ' ### |#   #|#    |#    |#    |#   #| ### ',
    'D': '#### |#   #|#   #|#   #|#   #|#   #|#### ',
    'E': '#####|#    |#    |#### |#    |#    |#####',
    'F': '#####|#    |#    |#### |#    |#    |#    ',
    'G': ' ### |#   #|#    |# ###|#   #|#   #| ####',
    'H': '#   #|#   #|#   #|#####|#   #|#   #|#   #',
    'I': ' ### |  #  |  #  |  #  |  #  |  #  | ### ',
    'J': '  ###|   # |   # |   # |   # |#  # | ##  ',
    'K': '#   #|#  # |# #  |##   |# #  |#  # |#   #',
    'L': '#    |#    |#    |#    |#    |#    |#####',
    'M': '#   #|## ##|# # #|# # #|#   #|#   #|#   #',
    'N': '#   #|#   #|##  #|# # #|#  ##|#   #|#   #',
    'O': ' ### |#   #|#   #|#   #|#   #|#   #| ### ',
    'P': '#### |#   #|#   #|#### |#    |#    |#    ',
    'Q': ' ### |#   #|#   #|#   #|# # #|#  # | ## #',
    'R': '#### |#   #|#   #|#### |# #  |#  # |#   #',
    'S': ' ####|#    |#    | ### |    #|    #|#### ',
    'T': '#####|  #  |  #  |  #  |  #  |  #  |  #  ',
    'U': '#   #|#   #|#   #|#   #|#   #|#   #| ### ',
    'V': '#   #|#   #|#   #|#   #|#   #| # # |  #  ',
    'W': '#   #|#   #|#   #|# # #|# # #|# # #| # # ',
    'X': '#   #|#   #| # # |  #  | # # |#   #|#   #',
    'Y': '#   #|#   #| # # |  #  |  #  |  #  |  #  ',
    'Z': '#####|    #|   # |  #  | #   |#    |#####',
    '0': ' ### |#   #|#  ##|# # #|##  #|#   #| ### ',
    '1': '  #  | ##  |  #  |  #  |  #  |  #  | ### ',
    '2': ' ### |#   #|    #|   # |  #  | #   |#####',
    '3': '#####|   # |  #  |   # |    #|#   #| ### ',
    '4': '   # |  ## | # # |#  # |#####|   # |   # ',
    '5': '#####|#    |#### |    #|    #|#   #| ### ',
    '6': '  ## | #   |#    |#### |#   #|#   #| ### ',
    '7': '#####|    #|   # |  #  | #   | #   | #   ',
    '8': ' ### |#   #|#   #| ### |#   #|#   #| ### ',
    '9': ' ### |#   #|#   #| ####|    #|   # | ##  ',
    ' ': '     |     |     |     |     |     |     ',
    '-': '     |     |     | ### |     |     |     ',
    '.': '     |     |     |     |     | ##  | ##  ',
    ',': '     |     |     |     | ##  |  #  | #   ',
    '(': '   # |  #  | #   | #   | #   |  #  |   # ',
    ')': ' #   |  #  |   # |   # |   # |  #  | #   ',
    '=': '     |     |#####|     |#####|     |     ',
    ':': '     | ##  | ##  |     | ##  | ##  |     ',
    '/': '     |    #|   # |  #  | #   |#    |     ',
    "'": '  #  |  #  |     |     |     |     |     ',
    '+': '     |  #  |  #  |#####|  #  |  #  |     ',
    '~': '     |     | #   |# # #|   # |     |     ',
}


class Canvas:
    """An RGB image with the few drawing primitives the plot needs."""

    def __init__(self, width: int, height: int):
        self.pixels = np.full((height, width, 3), 255, dtype=np.uint8)

    def rect(self, x0: int, y0: int, x1: int, y1: int, colour) -> None:
        h, w = self.pixels.shape[:2]
        self.pixels[max(y0, 0):min(y1, h), max(x0, 0):min(x1, w)] = colour

    def line(self, x0: float, y0: float, x1: float, y1: float, colour, width: int = 2) -> None:
        steps = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        for x, y in zip(np.linspace(x0, x1, steps), np.linspace(y0, y1, steps)):
            r = width // 2
            self.rect(round(x) - r, round(y) - r, round(x) - r + width, round(y) - r + width, colour)

    def text(self, x: int, y: int, text: str, colour=(0, 0, 0), scale: int = 2, vertical=False) -> None:
        """Upper-case text with its top-left corner at (x, y); vertical reads bottom to top."""
        for i, char in enumerate(text.upper()):
            rows = _GLYPHS.get(char, _GLYPHS[" "]).split("|")
            for r, row in enumerate(rows):
                for c, bit in enumerate(row):
                    if bit != "#":
                        continue
                    if vertical:
                        px, py = x + r * scale, y - (i * 6 + c) * scale
                    else:
                        px, py = x + (i * 6 + c) * scale, y + r * scale
                    self.rect(px, py, px + scale, py + scale, colour)

    def save_png(self, path: Path) -> None:
        h, w = self.pixels.shape[:2]
        raw = b"".join(b"\x00" + self.pixels[row].tobytes() for row in range(h))  # filter 0 per row

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit RGB
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                         + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def draw_panel(c: Canvas, box, series, y_ticks, title: str, y_label: str) -> None:
    """Axes, grid and one line per (values, colour) in box = (left, top, right, bottom); NaN
    values are skipped and a series that ends early gets an X at its last point."""
    left, top, right, bottom = box
    lo, hi = y_ticks[0][0], y_ticks[-1][0]

    def px(layer: int, value: float) -> tuple[float, float]:
        x = left + (layer - 1) / (LAYERS - 1) * (right - left)
        return x, bottom - (min(max(value, lo), hi) - lo) / (hi - lo) * (bottom - top)

    c.text(left, top - 26, title)
    for value, label in y_ticks:
        y = round(px(1, value)[1])
        c.rect(left, y, right, y + 1, (220, 220, 220))
        c.text(left - 12 - 12 * len(label), y - 7, label)
    for layer in (1, 20, 40, 60, 80, 100):
        x = round(px(layer, lo)[0])
        c.rect(x, top, x + 1, bottom, (235, 235, 235))
        c.text(x - 6 * len(str(layer)), bottom + 10, str(layer))
    c.rect(left, top, left + 2, bottom + 1, (0, 0, 0))
    c.rect(left, bottom, right + 1, bottom + 2, (0, 0, 0))
    c.text((left + right) // 2 - 30, bottom + 32, "LAYER")
    c.text(left - 100, (top + bottom) // 2 + 6 * len(y_label), y_label, vertical=True)
    for values, colour in series:
        points = [px(i + 1, v) for i, v in enumerate(values) if math.isfinite(v)]
        for (x0, y0), (x1, y1) in zip(points, points[1:]):
            c.line(x0, y0, x1, y1, colour)
        if len(points) < len(values) and points:
            x, y = points[-1]
            c.line(x - 6, y - 6, x + 6, y + 6, colour, 3)
            c.line(x - 6, y + 6, x + 6, y - 6, colour, 3)


def plot(results: dict[str, list[float]], path: Path) -> None:
    """Top: log10 std of all four settings. Bottom: linear std of the runs that stay near 1."""
    c = Canvas(1200, 940)
    left, right = 130, 850
    c.text(left, 14, f"{LAYERS}-LAYER MLP (LINEAR {UNITS}X{UNITS} + RELU), BATCH {BATCH}: "
                     "STD OF EACH LAYER'S OUTPUT", scale=2)
    logs = [[math.log10(s) if math.isfinite(s) and s > 0 else math.nan for s in v]
            for v in results.values()]
    finite = [v for vals in logs for v in vals if math.isfinite(v)]
    lo, hi = 10 * math.floor(min(finite) / 10), 10 * math.ceil(max(finite) / 10)
    draw_panel(c, (left, 80, right, 470), list(zip(logs, COLOURS)),
               [(t, f"1E{t}") for t in range(lo, hi + 1, 10)], "LOG SCALE", "STD")
    near_one = [(v, col) for v, col in zip(results.values(), COLOURS)
                if first_bad_layer(v) is None and max(v) < 2]
    draw_panel(c, (left, 580, right, 860), near_one,
               [(t / 10, f"{t / 10:.1f}") for t in range(0, 11, 2)],
               "LINEAR SCALE (FINITE RUNS)", "STD")

    for i, ((name, values), colour) in enumerate(zip(results.items(), COLOURS)):
        y = 90 + i * 60
        c.rect(right + 30, y + 5, right + 60, y + 9, colour)
        c.text(right + 68, y, name, colour)
        bad = first_bad_layer(values)
        note = f"INF/NAN AT LAYER {bad}" if bad else f"LAYER 100: {values[-1]:.2G}"
        c.text(right + 68, y + 20, note, (90, 90, 90))
    path.parent.mkdir(parents=True, exist_ok=True)
    c.save_png(path)


def write_csv(results: dict[str, list[float]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["layer", *[CSV_NAMES[n] for n in results]])
        for i in range(LAYERS):
            writer.writerow([i + 1, *[repr(v[i]) for v in results.values()]])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # 16x256 matmuls: threads only add waiting on a busy machine

    results = run(args.seed)
    write_csv(results, args.out / "std_per_layer.csv")
    plot(results, args.out / "std_per_layer.png")

    print(f"std of each layer's output, {LAYERS} x (Linear({UNITS}, {UNITS}) + ReLU), batch {BATCH}:")
    for name, stds in results.items():
        bad = first_bad_layer(stds)
        shown = ", ".join(f"{stds[i]:.3g}" for i in (0, 9, 49, 99))
        tail = f"not finite from layer {bad}" if bad else f"min {min(stds):.3g}, max {max(stds):.3g}"
        print(f"  {name.lower():<20} layers 1/10/50/100: {shown}   ({tail})")
    print("BatchNorm1d holds the std near 0.58 at every depth, with torch's default init.")
    print(f"wrote {args.out / 'std_per_layer.png'} and {args.out / 'std_per_layer.csv'}")


if __name__ == "__main__":
    main()
