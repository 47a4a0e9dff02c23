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
from harness.streams import DATA_SPLIT_SEED

if TYPE_CHECKING:
    from harness.spec import DataSpec, ValidationSpec

# What anomalib reads: MVTecAD takes exactly these suffixes; Folder takes torchvision's
# IMG_EXTENSIONS in any case, searching each directory recursively.
MVTEC_SUFFIXES = (".png", ".PNG")
FOLDER_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# The split of a folder data set and any validation split are fixed, not the run's seed:
# every seed of a study must be scored on the same test images.
MVTEC_LAYOUT = (
    "expected MVTec AD layout ROOT/<category>/train/good/*.png, ROOT/<category>/test/<good|defect>/*.png, "
    "ROOT/<category>/ground_truth/<defect>/<stem>_mask.png"
)


@dataclass(frozen=True)
class DataCheck:
    """A checked category: where it is and a content hash that identifies it."""

    root: Path
    category: str
    sha256: str


def _files(directory: Path, suffixes: tuple[str, ...], recursive: bool) -> list[Path]:
    if not directory.is_dir():
        return []
    found = directory.rglob("*") if recursive else directory.iterdir()
    lowered = {x.lower() for x in suffixes}
    # Sorted as strings, as anomalib sorts them (Path order differs, e.g. for 'a-b' vs 'a/b').
    return sorted((p for p in found if p.is_file() and p.suffix.lower() in lowered), key=str)


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


def _check_masks(images: list[Path], masks: list[Path]) -> None:
    """Masks pair with anomalous images as anomalib pairs them: one to one, both sorted by
    path, each image's stem inside its mask's stem. The first file out of step is named."""
    rule = "masks pair one to one with anomalous images, both in sorted order"
    for i in range(max(len(images), len(masks))):
        if i < len(images) and i < len(masks) and images[i].stem in masks[i].stem:
            continue
        if len(masks) > len(images):
            raise HarnessError(f"{masks[i]}: mask without an image ({rule})")
        if len(images) > len(masks):
            raise HarnessError(f"{images[i]}: defect image without a mask ({rule})")
        raise HarnessError(f"{masks[i]}: does not match {images[i].name} ({rule}; name it {images[i].stem}_mask)")


def check_mvtec(root: Path, category: str) -> DataCheck:
    """Check one category of an MVTec-layout root; raise a one-line error for what is wrong."""
    cat_dir = _category_dir(root, category, MVTEC_LAYOUT)
    everything = _files(cat_dir, FOLDER_SUFFIXES, recursive=True)
    for path in everything:
        parts = path.relative_to(cat_dir).parts
        if path.suffix not in MVTEC_SUFFIXES:
            raise HarnessError(f"{path}: the MVTec layout is read as .png only; convert it or use data.format=folder")
        if (
            len(parts) != 3
            or parts[0] not in ("train", "test", "ground_truth")
            or parts[:2] == ("ground_truth", "good")
        ):
            raise HarnessError(f"{path}: outside the layout; {MVTEC_LAYOUT}")
    train = [p for p in everything if p.relative_to(cat_dir).parts[0] == "train"]
    if not train:
        raise HarnessError(f"no training images in {cat_dir / 'train' / 'good'}; {MVTEC_LAYOUT}")
    test = [p for p in everything if p.relative_to(cat_dir).parts[0] == "test"]
    defects = [p for p in test if p.parent.name != "good"]
    if len(defects) in (0, len(test)):
        raise HarnessError(f"{cat_dir / 'test'} needs good and defective test images for AUROC; {MVTEC_LAYOUT}")
    masks = [p for p in everything if p.relative_to(cat_dir).parts[0] == "ground_truth"]
    _check_masks(defects, masks)
    return DataCheck(root, category, _hash_and_verify(everything, cat_dir))


def check_folder(root: Path, category: str, data: DataSpec) -> DataCheck:
    """Check a user's own images: ROOT/<category>/<normal_dir>, <abnormal_dir>, optional masks."""
    layout = (
        f"expected folder layout ROOT/<category>/{data.normal_dir}/ (normal images), "
        f"ROOT/<category>/{data.abnormal_dir}/ (anomalous images)"
        + (f", ROOT/<category>/{data.mask_dir}/ (masks)" if data.mask_dir else "")
    )
    cat_dir = _category_dir(root, category, layout)
    dirs = {
        "normal": data.normal_dir,
        "anomalous": data.abnormal_dir,
        "normal test": data.normal_test_dir,
        "mask": data.mask_dir,
    }
    found: dict[str, list[Path]] = {}
    for kind, name in dirs.items():
        if name is None:
            continue
        found[kind] = _files(cat_dir / name, FOLDER_SUFFIXES, recursive=True)
        if not found[kind]:
            raise HarnessError(f"no {kind} images in {cat_dir / name}; {layout}")
    if "mask" in found:
        _check_masks(found["anomalous"], found["mask"])
    return DataCheck(root, category, _hash_and_verify([p for v in found.values() for p in v], cat_dir))


def check_data(data: DataSpec, category: str) -> DataCheck:
    root = Path(data.root).expanduser()
    return check_mvtec(root, category) if data.format == "mvtec" else check_folder(root, category, data)


def build_datamodule(data: DataSpec, category: str, validation: ValidationSpec | None = None) -> Any:
    """anomalib's datamodule for a checked category; a validation split only when asked.

    anomalib's default validation split is the test set itself (``same_as_test``), so any
    threshold or selection fitted on it would leak test labels; runs here choose nothing from
    data, and HPO trials ask for a split carved from the training images instead.
    """
    common: dict[str, Any] = {
        "train_batch_size": data.train_batch_size,
        "eval_batch_size": data.eval_batch_size,
        "num_workers": data.num_workers,
        "val_split_mode": validation.split if validation else "none",
        "seed": DATA_SPLIT_SEED,
    }
    if validation:
        common["val_split_ratio"] = validation.ratio
    root = Path(data.root).expanduser().resolve()  # absolute: a split may be built from another folder
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
        # anomalib's Folder keeps `normal_split_ratio` but splits by `test_split_ratio`.
        normal_split_ratio=data.normal_split_ratio,
        test_split_ratio=data.normal_split_ratio,
        **common,
    )
