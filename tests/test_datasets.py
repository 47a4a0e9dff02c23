from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from harness.datasets import check_data
from harness.errors import HarnessError
from harness.spec import DataSpec
from tests.conftest import folder_layout


def _spec(root: Path, **kw: object) -> DataSpec:
    return DataSpec(root=str(root), categories=["disc"], **kw)


def test_valid_root_hash(synth_root: Path) -> None:
    check = check_data(_spec(synth_root), "disc")
    assert check.sha256 == check_data(_spec(synth_root), "disc").sha256
    assert check.sha256 != check_data(_spec(synth_root), "weave").sha256


def test_hash_follows_content_not_path(own_root: Path, tmp_path: Path) -> None:
    moved = tmp_path / "moved"
    shutil.copytree(own_root, moved)
    assert check_data(_spec(moved), "disc").sha256 == check_data(_spec(own_root), "disc").sha256
    img = moved / "disc" / "train" / "good" / "000.png"
    shutil.copy(moved / "disc" / "train" / "good" / "001.png", img)
    assert check_data(_spec(moved), "disc").sha256 != check_data(_spec(own_root), "disc").sha256


def test_missing_root_says_where_and_never_downloads(tmp_path: Path) -> None:
    with pytest.raises(HarnessError, match=r"data root .*nowhere not found \(nothing is downloaded\); expected MVTec"):
        check_data(_spec(tmp_path / "nowhere"), "disc")


def test_unknown_category_lists_the_available(synth_root: Path) -> None:
    with pytest.raises(HarnessError, match=r"category 'bottle' not found .*available: disc, weave"):
        check_data(_spec(synth_root), "bottle")


def test_empty_train_dir(own_root: Path) -> None:
    for p in (own_root / "disc" / "train" / "good").iterdir():
        p.unlink()
    with pytest.raises(HarnessError, match="no training images in"):
        check_data(_spec(own_root), "disc")


def test_file_that_is_not_an_image(own_root: Path) -> None:
    bad = own_root / "disc" / "test" / "hole" / "000.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(HarnessError, match=r"test/hole/000.png: not a readable image"):
        check_data(_spec(own_root), "disc")


def test_truncated_image(own_root: Path) -> None:
    img = own_root / "disc" / "train" / "good" / "003.png"
    img.write_bytes(img.read_bytes()[:200])
    with pytest.raises(HarnessError, match=r"003\.png: not a readable image"):
        check_data(_spec(own_root), "disc")


def test_mask_without_image(own_root: Path) -> None:
    (own_root / "disc" / "test" / "scratch" / "001.png").unlink()
    with pytest.raises(HarnessError, match=r"001_mask.png: mask without an image"):
        check_data(_spec(own_root), "disc")


def test_defect_image_without_mask(own_root: Path) -> None:
    (own_root / "disc" / "ground_truth" / "stain" / "000_mask.png").unlink()
    with pytest.raises(HarnessError, match=r"stain/000.png: defect image without a mask"):
        check_data(_spec(own_root), "disc")


def test_folder_format(synth_root: Path, tmp_path: Path) -> None:
    folder_layout(synth_root / "disc", tmp_path, masks=True)
    spec = DataSpec(
        format="folder",
        root=str(tmp_path),
        categories=["part"],
        normal_dir="normal",
        abnormal_dir="abnormal",
        mask_dir="masks",
    )
    first = check_data(spec, "part").sha256
    nested = tmp_path / "part" / "normal" / "batch2"
    nested.mkdir()
    shutil.copy(tmp_path / "part" / "normal" / "000.png", nested / "000.png")
    assert check_data(spec, "part").sha256 != first, "anomalib reads sub-directories: so does the hash"
    (tmp_path / "part" / "abnormal" / "hole_000.png").unlink()
    with pytest.raises(HarnessError, match=r"hole_000_mask\.png: mask without an image"):
        check_data(spec, "part")
    with pytest.raises(HarnessError, match=r"no anomalous images in .*missing"):
        check_data(spec.model_copy(update={"abnormal_dir": "missing"}), "part")
    with pytest.raises(HarnessError, match=r"no normal test images in .*typo"):
        check_data(spec.model_copy(update={"normal_test_dir": "typo"}), "part")


def test_mvtec_reads_png_only(own_root: Path) -> None:
    img = own_root / "disc" / "train" / "good" / "004.png"
    Image.open(img).save(img.with_suffix(".jpg"))
    with pytest.raises(HarnessError, match=r"004\.jpg: the MVTec layout is read as \.png only"):
        check_data(_spec(own_root), "disc")


def test_image_outside_the_layout(own_root: Path) -> None:
    extra = own_root / "disc" / "test" / "hole" / "more"
    extra.mkdir()
    shutil.copy(own_root / "disc" / "test" / "hole" / "000.png", extra / "x.png")
    with pytest.raises(HarnessError, match=r"more/x\.png: outside the layout"):
        check_data(_spec(own_root), "disc")


def test_masks_pair_in_sorted_order_as_anomalib_pairs_them(own_root: Path) -> None:
    """Same stems as sets, yet sorted a_b_mask pairs with a and a_mask with a_b: an error here, not mid-run."""
    hole, gt = own_root / "disc" / "test" / "hole", own_root / "disc" / "ground_truth" / "hole"
    for p in [*hole.iterdir(), *gt.iterdir()]:
        p.unlink()
    src = own_root / "disc" / "test" / "scratch" / "000.png"
    mask = own_root / "disc" / "ground_truth" / "scratch" / "000_mask.png"
    for stem in ("a", "a_b"):
        shutil.copy(src, hole / f"{stem}.png")
        shutil.copy(mask, gt / f"{stem}_mask.png")
    with pytest.raises(HarnessError, match=r"hole/a_mask\.png: does not match a_b\.png"):
        check_data(_spec(own_root), "disc")


def test_test_split_without_defects(own_root: Path) -> None:
    for defect in ("scratch", "hole", "stain"):
        shutil.rmtree(own_root / "disc" / "test" / defect)
        shutil.rmtree(own_root / "disc" / "ground_truth" / defect)
    with pytest.raises(HarnessError, match="needs good and defective test images"):
        check_data(_spec(own_root), "disc")
