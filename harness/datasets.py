"""Data sets on disk: checking a root before anything trains, and building anomalib's datamodules.

MVTec AD is never downloaded: anomalib's ``MVTecAD`` tries to when ``root/category`` is
missing, so every root is checked here first, and every image is opened once, so a corrupt
file is a one-line error instead of a crash halfway through a run.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, UnidentifiedImageError

from harness.errors import HarnessError

if TYPE_CHECKING:
    from harness.spec import DataSpec

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
# The split of a folder data set and any validation split are fixed, not the run's seed:
# every seed of a study must be scored on the same test images.
DATA_SPLIT_SEED = 0
MVTEC_LAYOUT = (
    "expected MVTec AD layout ROOT/<category>/train/good/*.png, ROOT/<category>/test/<good|defect>/*.png, "
    "ROOT/<category>/ground_truth/<defect>/<stem>_mask.png"
)


@dataclass(frozen=True)
class DataCheck:
    """What a checked category holds: counts, and a content hash that identifies the data."""

    root: Path
    category: str
    n_train: int
    n_test: int
    sha256: str


def _images(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _hash_and_verify(files: list[Path], base: Path) -> str:
    """SHA-256 over (relative path, bytes) of every file; each must decode as an image."""
    digest = hashlib.sha256()
    for path in files:
        data = path.read_bytes()
        try:
            with Image.open(BytesIO(data)) as img:
                img.verify()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            raise HarnessError(f"{path}: not a readable image") from None
        digest.update(str(path.relative_to(base)).encode() + b"\0")
        digest.update(hashlib.sha256(data).digest())
    return digest.hexdigest()


def _category_dir(root: Path, category: str, layout: str) -> Path:
    if not root.is_dir():
        raise HarnessError(f"data root {root} not found (nothing is downloaded); {layout}")
    cat_dir = root / category
    if not cat_dir.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise HarnessError(
            f"category {category!r} not found under {root} (available: {', '.join(found) or 'none'}); {layout}"
        )
    return cat_dir


def _check_masks(masks: list[Path], images: list[Path], where: Path) -> None:
    stems = {p.stem for p in images}
    for mask in masks:
        stem = mask.stem.removesuffix("_mask")
        if stem not in stems:
            raise HarnessError(f"{mask}: mask without an image (no {stem}.* in {where})")
    mask_stems = {m.stem.removesuffix("_mask") for m in masks}
    for image in images:
        if image.stem not in mask_stems:
            raise HarnessError(f"{image}: defect image without a mask in {masks[0].parent if masks else where}")


def check_mvtec(root: Path, category: str) -> DataCheck:
    """Check one category of an MVTec-layout root; raise a one-line error for what is wrong."""
    cat_dir = _category_dir(root, category, MVTEC_LAYOUT)
    train = _images(cat_dir / "train" / "good")
    if not train:
        raise HarnessError(f"no training images in {cat_dir / 'train' / 'good'}; {MVTEC_LAYOUT}")
    test_dir = cat_dir / "test"
    kinds = sorted(p.name for p in test_dir.iterdir() if p.is_dir()) if test_dir.is_dir() else []
    test = [img for kind in kinds for img in _images(test_dir / kind)]
    if not _images(test_dir / "good") or not any(_images(test_dir / k) for k in kinds if k != "good"):
        raise HarnessError(f"{test_dir} needs good and defective test images for AUROC; {MVTEC_LAYOUT}")
    masks: list[Path] = []
    gt_dir = cat_dir / "ground_truth"
    gt_kinds = [p.name for p in gt_dir.iterdir() if p.is_dir()] if gt_dir.is_dir() else []
    for kind in sorted({*(k for k in kinds if k != "good"), *gt_kinds}):
        kind_masks = _images(gt_dir / kind)
        _check_masks(kind_masks, _images(test_dir / kind), test_dir / kind)
        masks += kind_masks
    return DataCheck(root, category, len(train), len(test), _hash_and_verify(train + test + masks, cat_dir))


def check_folder(root: Path, category: str, data: DataSpec) -> DataCheck:
    """Check a user's own images: ROOT/<category>/<normal_dir>, <abnormal_dir>, optional masks."""
    layout = (
        f"expected folder layout ROOT/<category>/{data.normal_dir}/ (normal images), "
        f"ROOT/<category>/{data.abnormal_dir}/ (anomalous images)"
        + (f", ROOT/<category>/{data.mask_dir}/ (masks)" if data.mask_dir else "")
    )
    cat_dir = _category_dir(root, category, layout)
    normal = _images(cat_dir / data.normal_dir)
    if not normal:
        raise HarnessError(f"no normal images in {cat_dir / data.normal_dir}; {layout}")
    abnormal = _images(cat_dir / data.abnormal_dir)
    if not abnormal:
        raise HarnessError(f"no anomalous images in {cat_dir / data.abnormal_dir}; {layout}")
    normal_test = _images(cat_dir / data.normal_test_dir) if data.normal_test_dir else []
    masks = _images(cat_dir / data.mask_dir) if data.mask_dir else []
    if data.mask_dir:
        _check_masks(masks, abnormal, cat_dir / data.abnormal_dir)
    n_held_out = 0 if normal_test else round(len(normal) * data.normal_split_ratio)
    sha = _hash_and_verify(normal + abnormal + normal_test + masks, cat_dir)
    n_test = len(abnormal) + len(normal_test) + n_held_out
    return DataCheck(root, category, len(normal) - n_held_out, n_test, sha)


def check_data(data: DataSpec, category: str) -> DataCheck:
    root = Path(data.root).expanduser()
    return check_mvtec(root, category) if data.format == "mvtec" else check_folder(root, category, data)


def build_datamodule(data: DataSpec, category: str) -> Any:
    """anomalib's datamodule for a checked category, with no validation split.

    anomalib's default validation split is the test set itself (``same_as_test``), so any
    threshold or selection fitted on it would leak test labels; runs here choose nothing from
    data, and studies that select (HPO) ask for a separate split.
    """
    common: dict[str, Any] = {
        "train_batch_size": data.train_batch_size,
        "eval_batch_size": data.eval_batch_size,
        "num_workers": data.num_workers,
        "val_split_mode": "none",
        "seed": DATA_SPLIT_SEED,
    }
    root = Path(data.root).expanduser()
    if data.format == "mvtec":
        from anomalib.data import MVTecAD

        return MVTecAD(root=root, category=category, **common)
    from anomalib.data import Folder

    return Folder(
        name=category,
        root=root / category,
        normal_dir=data.normal_dir,
        abnormal_dir=data.abnormal_dir,
        mask_dir=data.mask_dir,
        normal_test_dir=data.normal_test_dir,
        normal_split_ratio=data.normal_split_ratio,
        **common,
    )
