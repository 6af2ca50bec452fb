"""Data sets made in code (nothing is downloaded).

``make_digits``: images of the ten digits drawn with a pen: each digit is a few strokes
(polylines) whose vertices are jittered, then the whole glyph is rotated, sheared, scaled and
moved at random, drawn with a random pen width (anti-aliased), and Gaussian pixel noise is
added. Different seeds give different samples of the same distribution, so a train and a test set
come from two seeds. It plays the part of a small handwritten-digits set (like the 8x8 digits
that ship with scikit-learn) without a dependency.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np

__all__ = ["make_digits", "DIGIT_STROKES"]


def _arc(
    cx: float, cy: float, rx: float, ry: float, start: float, stop: float, points: int = 12
) -> List[Tuple[float, float]]:
    """Points on an ellipse, angles in turns (0 = right, 0.25 = down, since y grows down)."""
    t = np.linspace(start, stop, points) * 2 * np.pi
    return [(cx + rx * np.cos(a), cy + ry * np.sin(a)) for a in t]


#: Strokes of each digit in a unit box, x to the right and y down; each stroke is a polyline.
DIGIT_STROKES: Dict[int, List[List[Tuple[float, float]]]] = {
    0: [_arc(0.5, 0.5, 0.27, 0.38, 0.0, 1.0, 16)],
    1: [[(0.33, 0.28), (0.52, 0.1), (0.52, 0.9)]],
    2: [_arc(0.5, 0.32, 0.24, 0.2, 0.52, 1.08, 9) + [(0.25, 0.88), (0.78, 0.88)]],
    3: [_arc(0.48, 0.3, 0.22, 0.18, 0.6, 1.25, 8), _arc(0.48, 0.68, 0.25, 0.2, 0.75, 1.4, 9)],
    4: [[(0.64, 0.9), (0.64, 0.1), (0.2, 0.64), (0.82, 0.64)]],
    5: [[(0.75, 0.12), (0.32, 0.12), (0.29, 0.45)] + _arc(0.5, 0.64, 0.25, 0.23, 0.62, 1.35, 9)],
    6: [[(0.7, 0.12), (0.45, 0.3)] + _arc(0.5, 0.66, 0.23, 0.22, 0.55, 1.55, 14)],
    7: [[(0.22, 0.12), (0.8, 0.12), (0.42, 0.9)]],
    8: [_arc(0.5, 0.3, 0.19, 0.18, 0.0, 1.0, 12), _arc(0.5, 0.68, 0.24, 0.21, 0.0, 1.0, 13)],
    9: [_arc(0.5, 0.34, 0.22, 0.21, 0.0, 1.0, 12), [(0.72, 0.36), (0.6, 0.9)]],
}


def _segments(c: int) -> Tuple[np.ndarray, np.ndarray]:
    """Start and end points (m, 2) of every segment of digit ``c``."""
    a, b = [], []
    for stroke in DIGIT_STROKES[c]:
        s = np.asarray(stroke, np.float64)
        a.append(s[:-1])
        b.append(s[1:])
    return np.concatenate(a), np.concatenate(b)


def make_digits(
    n: int, size: int = 12, seed: int = 0, noise: float = 0.15, distortion: float = 1.0
) -> Tuple[np.ndarray, np.ndarray]:
    """``n`` images of digits (balanced over 0-9, in random order) as ``(X, y)``: ``X`` is
    float32 of shape ``(n, size * size)`` with pixel values about in [0, 1] (plus noise), ``y``
    int64 labels. ``distortion`` scales every random deformation (0 gives clean templates)."""
    if n < 0 or size < 4:
        raise ValueError(f"need n >= 0 and size >= 4, got n={n}, size={size}")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % 10)
    images = np.empty((n, size * size), np.float32)
    centres = (np.arange(size) + 0.5) / size
    px, py = np.meshgrid(centres, centres)  # py is the row (down)
    pixels = np.stack([px.ravel(), py.ravel()], axis=1)  # (P, 2)
    for c in range(10):
        rows = np.nonzero(labels == c)[0]
        k = len(rows)
        if k == 0:
            continue
        a, b = _segments(c)  # (m, 2) each
        # The jitter moves each vertex of the template; shared endpoints of consecutive
        # segments move together because b[i] == a[i+1] is the same vertex.
        verts = np.concatenate([a, b[-1:]])  # rough vertex list (m+1, 2)
        jitter = rng.normal(0.0, 0.025 * distortion, (k,) + verts.shape)
        ja = a[None] + jitter[:, :-1]
        jb = b[None] + jitter[:, 1:]
        # A random affine map about the centre: rotation, shear, anisotropic scale, shift.
        rot = rng.normal(0.0, 0.15 * distortion, k)
        shear = rng.normal(0.0, 0.15 * distortion, k)
        sx = np.exp(rng.normal(0.0, 0.1 * distortion, k))
        sy = np.exp(rng.normal(0.0, 0.08 * distortion, k))
        shift = rng.normal(0.0, 0.05 * distortion, (k, 2))
        cos, sin = np.cos(rot), np.sin(rot)
        M = np.empty((k, 2, 2))
        M[:, 0, 0] = sx * cos
        M[:, 0, 1] = sx * (-sin + shear * cos)
        M[:, 1, 0] = sy * sin
        M[:, 1, 1] = sy * (cos + shear * sin)
        ja = np.einsum("kij,kmj->kmi", M, ja - 0.5) + 0.5 + shift[:, None]
        jb = np.einsum("kij,kmj->kmi", M, jb - 0.5) + 0.5 + shift[:, None]
        # Distance from every pixel centre to every segment, then the nearest one.
        d = jb - ja  # (k, m, 2)
        rel = pixels[None, :, None, :] - ja[:, None]  # (k, P, m, 2)
        t = np.einsum("kpmi,kmi->kpm", rel, d) / np.maximum(np.sum(d * d, -1), 1e-12)[:, None]
        t = np.clip(t, 0.0, 1.0)
        nearest = rel - t[..., None] * d[:, None]
        dist = np.sqrt(np.min(np.sum(nearest * nearest, -1), axis=2))  # (k, P)
        width = rng.uniform(0.045, 0.085, k)[:, None]
        ink = np.clip((width + 0.5 / size - dist) * size, 0.0, 1.0)  # anti-aliased pen
        ink *= rng.uniform(0.7, 1.0, (k, 1))  # pen pressure
        images[rows] = ink + rng.normal(0.0, noise, ink.shape)
    return images, labels.astype(np.int64)


def show(images: np.ndarray, size: int = 12) -> str:
    """A text rendering of a few images (for a quick look in a terminal)."""
    shades = " .:-=+*#%@"
    out = []
    for row in range(size):
        line = []
        for img in images:
            v = np.clip(img.reshape(size, size)[row], 0, 0.999)
            line.append("".join(shades[int(x * len(shades))] for x in v))
        out.append("  ".join(line))
    return "\n".join(out)


def plot_digits(path: str, rows: int = 4, seed: int = 0, noise: float = 0.15):
    """A PNG of ``rows`` samples of every digit; None (with a note) without matplotlib."""
    from optkern.examples._common import new_figure, no_matplotlib_note, save_figure

    fig = new_figure(figsize=(7, 0.75 * rows + 0.3))
    if fig is None:
        no_matplotlib_note()
        return None
    X, y = make_digits(20 * rows, seed=seed, noise=noise)
    order = np.argsort(y, kind="stable")
    axes = fig.subplots(rows, 10)
    size = int(round(np.sqrt(X.shape[1])))
    for c in range(10):
        picks = order[y[order] == c][:rows]
        for r in range(rows):
            ax = axes[r, c] if rows > 1 else axes[c]
            ax.imshow(X[picks[r]].reshape(size, size), cmap="gray_r", vmin=-0.2, vmax=1.2)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"make_digits(seed={seed}, noise={noise}): {size}x{size} pen-drawn digits")
    return save_figure(fig, path)


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Draw samples of make_digits")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG grid of samples")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.plot:
        written = plot_digits(args.plot, seed=args.seed)
        if written:
            print(f"plot written to {written}")
    else:
        X, y = make_digits(10, seed=args.seed)
        order = np.argsort(y)
        print(show(X[order]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
