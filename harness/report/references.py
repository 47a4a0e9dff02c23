"""Published numbers to hold our intervals against: single runs, so points, not intervals.

A reference applies only where the model, backbone and category match and the test split has
MVTec AD's size for that category.
"""

from __future__ import annotations

from dataclasses import dataclass

# MVTec AD's categories in its papers' usual column order (textures, then objects), with the
# size of each test split: how a reference knows it applies.
MVTEC_TEST_IMAGES = {
    "carpet": 117,
    "grid": 78,
    "leather": 124,
    "tile": 117,
    "wood": 79,
    "bottle": 83,
    "cable": 150,
    "capsule": 132,
    "hazelnut": 110,
    "metal_nut": 115,
    "pill": 167,
    "screw": 160,
    "toothbrush": 42,
    "transistor": 100,
    "zipper": 151,
}


@dataclass(frozen=True)
class Reference:
    """A published number: single runs, so a point to hold against our interval."""

    model: str
    metric: str
    values: dict[str, float]  # category (or "mean") -> value
    source: str
    backbone: str  # the backbone it was measured with ("" where the model has none to choose)


def _per_category(row: str, mean: float) -> dict[str, float]:
    """A published row in MVTec AD's usual column order, plus its mean."""
    return dict(zip(MVTEC_TEST_IMAGES, map(float, row.split()), strict=True)) | {"mean": mean}


_ANOMALIB_R18 = "anomalib PatchCore README (ResNet-18, seed 42, one run)"
_PAPER = "PatchCore paper, Roth et al. CVPR 2022 (WideResNet-50, 10% coreset)"
REFERENCES = (
    Reference(
        "patchcore",
        "image_AUROC",
        _per_category(
            "0.970 0.947 1.000 0.997 0.997 1.000 0.986 0.965 1.000 0.991 0.916 0.943 0.931 0.996 0.953", 0.973
        ),
        _ANOMALIB_R18,
        backbone="resnet18",
    ),
    Reference(
        "patchcore",
        "pixel_AUROC",
        _per_category(
            "0.986 0.955 0.990 0.943 0.933 0.981 0.984 0.986 0.986 0.986 0.974 0.991 0.988 0.974 0.983", 0.976
        ),
        _ANOMALIB_R18,
        backbone="resnet18",
    ),
    Reference(
        "ganomaly",
        "image_AUROC",
        _per_category(
            "0.203 0.404 0.413 0.408 0.744 0.251 0.457 0.682 0.537 0.270 0.472 0.231 0.372 0.440 0.434", 0.421
        ),
        "anomalib GANomaly README (seed 42, one run)",
        backbone="",
    ),
    Reference("patchcore", "image_AUROC", {"mean": 0.990}, _PAPER, backbone="wide_resnet50_2"),
    Reference("patchcore", "pixel_AUROC", {"mean": 0.981}, _PAPER, backbone="wide_resnet50_2"),
)
