"""Synthetic data sets in MVTec AD layout, for tests and the demo.

Each image is drawn from its own RNG stream, keyed by (seed, category, split, index), so a
data set is a pure function of its options and growing ``n_train`` never changes the
images already there. Masks are exactly the pixels a defect changed.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from harness.errors import HarnessError
from harness.fsutil import staged_dir

DEFECTS = ("scratch", "hole", "stain")
MARKER = ".harness-synth"  # marks a category directory as synth's own, safe to replace
Canvas = np.ndarray  # float32 array (H, W, 3) in [0, 1]


def _weave(rng: np.random.Generator, size: int) -> Canvas:
    """A woven texture: two crossing sinusoids with random phase, colour and grain."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    period = size / rng.uniform(7.5, 8.5)
    phase = rng.uniform(0, 2 * np.pi, size=2)
    a = np.sin(2 * np.pi * x / period + phase[0])
    b = np.sin(2 * np.pi * y / period + phase[1])
    pattern = 0.5 + 0.25 * np.where((a > 0) ^ (b > 0), a, b)
    base = np.array([0.55, 0.45, 0.3]) + rng.normal(0, 0.02, 3)
    img = pattern[..., None] * base[None, None, :] * 1.4
    return img + rng.normal(0, 0.03, (size, size, 3))


def _disc(rng: np.random.Generator, size: int) -> Canvas:
    """An object on a plain background: a shaded metal disc with a small jitter in place."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = size / 2 + rng.uniform(-0.04, 0.04, 2) * size
    radius = size * rng.uniform(0.3, 0.33)
    r = np.hypot(y - cy, x - cx)
    inside = (r < radius).astype(np.float32)
    shade = 0.75 - 0.3 * (r / radius) ** 2
    img = np.full((size, size, 3), 0.08, np.float32)
    img += inside[..., None] * (shade[..., None] * np.array([0.8, 0.82, 0.85]) - 0.08)
    return img + rng.normal(0, 0.015, (size, size, 3))


def _grid(rng: np.random.Generator, size: int) -> Canvas:
    """A regular structure: a lattice of bright lines, like a printed mesh."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    period = size / 6
    off = rng.uniform(0, period, 2)
    lines = (((x + off[0]) % period) < period * 0.18) | (((y + off[1]) % period) < period * 0.18)
    img = np.full((size, size, 3), 0.2, np.float32) + lines[..., None] * 0.6
    return img + rng.normal(0, 0.02, (size, size, 3))


PATTERNS: dict[str, Callable[[np.random.Generator, int], Canvas]] = {
    "weave": _weave,
    "disc": _disc,
    "grid": _grid,
}


def defect_mask(rng: np.random.Generator, size: int, defect: str) -> np.ndarray:
    """Where a defect of this type lands: a boolean mask of the changed pixels."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = rng.uniform(0.3, 0.7, 2) * size
    if defect == "scratch":
        angle = rng.uniform(0, np.pi)
        length = size * rng.uniform(0.25, 0.4)
        dy, dx = np.sin(angle), np.cos(angle)
        along = (y - cy) * dy + (x - cx) * dx
        across = -(y - cy) * dx + (x - cx) * dy
        return (np.abs(along) < length / 2) & (np.abs(across) < max(1.0, size / 64))
    if defect == "hole":
        return np.hypot(y - cy, x - cx) < size * rng.uniform(0.05, 0.08)
    if defect == "stain":
        ry, rx = size * rng.uniform(0.06, 0.12, 2)
        wobble = 1 + 0.25 * np.sin(3 * np.arctan2(y - cy, x - cx) + rng.uniform(0, 6.28))
        return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 < wobble
    raise HarnessError(f"unknown defect type {defect!r}; known: {', '.join(DEFECTS)}")


def _apply_defect(img: Canvas, mask: np.ndarray, defect: str, rng: np.random.Generator) -> Canvas:
    out = img.copy()
    if defect == "scratch":
        out[mask] = 0.95 + rng.normal(0, 0.02, (int(mask.sum()), 3))
    elif defect == "hole":
        out[mask] = 0.02
    else:  # stain: a brownish contamination that keeps some of the texture
        out[mask] = 0.35 * out[mask] + 0.65 * np.array([0.45, 0.25, 0.05])
    return out


def rng_for(seed: int, *keys: str | int) -> np.random.Generator:
    """The generator of one image: independent of every other image (public, like ``defect_mask``
    and ``to_uint8``, so a test can redraw an image without its defect)."""
    entropy = [seed] + [zlib.crc32(str(k).encode()) for k in keys]
    return np.random.default_rng(entropy)


def _save(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="PNG")


def to_uint8(img: Canvas) -> np.ndarray:
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


@dataclass(frozen=True)
class SynthSummary:
    """What `synth` wrote: counts per category, for the CLI's one-line summary."""

    root: Path
    categories: tuple[str, ...]
    n_train: int
    n_test_good: int
    n_test_defect: int
    size: int


# `harness data synth`'s defaults (the CLI shows these).
CATEGORIES = ("weave", "disc")
N_TRAIN, N_TEST, SIZE, SEED = 32, 24, 64, 0


def synth(
    out: Path,
    categories: tuple[str, ...] = CATEGORIES,
    n_train: int = N_TRAIN,
    n_test: int = N_TEST,
    size: int = SIZE,
    seed: int = SEED,
) -> SynthSummary:
    """Write a synthetic MVTec-layout data set under ``out``.

    A third of the test images are good; the rest cycle through scratch, hole and stain.
    Each category is built aside and swapped in whole, so a rerun with other options
    leaves no stale images; a category directory that synth did not write is never replaced.
    """
    unknown = [c for c in categories if c not in PATTERNS]
    if unknown:
        raise HarnessError(f"unknown synthetic category {unknown[0]!r}; known: {', '.join(PATTERNS)}")
    if not categories:
        raise HarnessError("--categories needs at least one category")
    if n_train < 1 or n_test < 2:
        raise HarnessError("need --n-train >= 1 and --n-test >= 2 (one good, one defective)")
    if not 32 <= size <= 1024:
        raise HarnessError(f"--size must be between 32 and 1024 pixels, got {size}")
    if seed < 0:
        raise HarnessError(f"--seed must be >= 0, got {seed}")
    n_good = max(1, n_test // 3)
    for category in categories:
        with staged_dir(out / category, MARKER) as cat_dir:
            _draw_category(cat_dir, category, n_train, n_good, n_test - n_good, size, seed)
    return SynthSummary(out, tuple(categories), n_train, n_good, n_test - n_good, size)


def _draw_category(
    cat_dir: Path, category: str, n_train: int, n_good: int, n_defect: int, size: int, seed: int
) -> None:
    draw = PATTERNS[category]
    for i in range(n_train):
        _save(cat_dir / "train" / "good" / f"{i:03d}.png", to_uint8(draw(rng_for(seed, category, "train", i), size)))
    for i in range(n_good):
        _save(cat_dir / "test" / "good" / f"{i:03d}.png", to_uint8(draw(rng_for(seed, category, "test", i), size)))
    for j in range(n_defect):
        defect = DEFECTS[j % len(DEFECTS)]
        rng = rng_for(seed, category, "defect", j)
        mask = defect_mask(rng, size, defect)
        img = _apply_defect(draw(rng, size), mask, defect, rng)
        stem = f"{j // len(DEFECTS):03d}"
        _save(cat_dir / "test" / defect / f"{stem}.png", to_uint8(img))
        _save(cat_dir / "ground_truth" / defect / f"{stem}_mask.png", mask.astype(np.uint8) * 255)
