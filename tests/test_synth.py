from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness.errors import HarnessError
from harness.synth import DEFECTS, PATTERNS, defect_mask, rng_for, synth, to_uint8


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_layout_and_counts(tmp_path: Path) -> None:
    s = synth(tmp_path, ("weave", "disc", "grid"), n_train=5, n_test=9, size=48, seed=1)
    assert (s.n_test_good, s.n_test_defect) == (3, 6)
    for cat in ("weave", "disc", "grid"):
        assert len(list((tmp_path / cat / "train" / "good").glob("*.png"))) == 5
        assert len(list((tmp_path / cat / "test" / "good").glob("*.png"))) == 3
        for defect in DEFECTS:
            images = sorted(p.stem for p in (tmp_path / cat / "test" / defect).glob("*.png"))
            masks = sorted(p.stem for p in (tmp_path / cat / "ground_truth" / defect).glob("*.png"))
            assert len(images) == 2
            assert masks == [f"{stem}_mask" for stem in images]
        img = Image.open(tmp_path / cat / "train" / "good" / "000.png")
        assert img.size == (48, 48)
        assert img.mode == "RGB"


def test_same_seed_same_bytes_other_seed_other_images(tmp_path: Path) -> None:
    synth(tmp_path / "a", ("disc",), n_train=3, n_test=3, seed=7)
    synth(tmp_path / "b", ("disc",), n_train=3, n_test=3, seed=7)
    synth(tmp_path / "c", ("disc",), n_train=3, n_test=3, seed=8)
    a, b, c = (_files(tmp_path / x) for x in "abc")
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a if "train" in k)


def test_growing_the_set_keeps_existing_images(tmp_path: Path) -> None:
    synth(tmp_path / "small", ("weave",), n_train=2, n_test=3, seed=0)
    synth(tmp_path / "big", ("weave",), n_train=6, n_test=3, seed=0)
    small, big = _files(tmp_path / "small"), _files(tmp_path / "big")
    assert all(big[k] == v for k, v in small.items())


def test_categories_look_different(tmp_path: Path) -> None:
    synth(tmp_path, tuple(PATTERNS), n_train=1, n_test=2, seed=0)
    means = [
        np.asarray(Image.open(tmp_path / c / "train/good/000.png"), float).std(axis=(0, 1)).sum() for c in PATTERNS
    ]
    assert len({round(m) for m in means}) == len(PATTERNS)


@pytest.mark.parametrize("category", list(PATTERNS))
def test_masks_are_exactly_the_changed_pixels(tmp_path: Path, category: str) -> None:
    """Redraw each defective image without its defect: it differs only, and almost everywhere, inside the mask."""
    synth(tmp_path, (category,), n_train=1, n_test=9, size=64, seed=3)
    for j in range(6):
        defect = DEFECTS[j % 3]
        stem = f"{j // 3:03d}"
        rng = rng_for(3, category, "defect", j)
        expected_mask = defect_mask(rng, 64, defect)
        clean = to_uint8(PATTERNS[category](rng, 64))
        img = np.asarray(Image.open(tmp_path / category / "test" / defect / f"{stem}.png"))
        mask = np.asarray(Image.open(tmp_path / category / "ground_truth" / defect / f"{stem}_mask.png")) > 0
        np.testing.assert_array_equal(mask, expected_mask)
        changed = (img != clean).any(axis=-1)
        assert mask.sum() > 0
        assert not changed[~mask].any(), "pixels outside the mask changed"
        assert changed[mask].mean() > 0.9, "the mask covers pixels the defect left alone"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"categories": ("carpet",)}, "unknown synthetic category 'carpet'"),
        ({"n_test": 1}, "--n-test >= 2"),
        ({"size": 8}, "--size must be between"),
    ],
)
def test_bad_options(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(HarnessError, match=message):
        synth(tmp_path, **kwargs)


def test_rerun_with_other_options_leaves_nothing_stale(tmp_path: Path) -> None:
    synth(tmp_path, ("disc",), n_train=6, n_test=3, seed=0)
    synth(tmp_path, ("disc",), n_train=2, n_test=3, seed=0)
    assert sorted(p.name for p in (tmp_path / "disc" / "train" / "good").iterdir()) == ["000.png", "001.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disc"], "no staging directory left behind"


def test_never_replaces_a_directory_it_did_not_write(tmp_path: Path) -> None:
    mine = tmp_path / "disc" / "train" / "good" / "real.png"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"a user's image")
    with pytest.raises(HarnessError, match="exists and was not written by this tool"):
        synth(tmp_path, ("disc",), n_train=2, n_test=3)
    assert mine.read_bytes() == b"a user's image"


def test_negative_seed(tmp_path: Path) -> None:
    with pytest.raises(HarnessError, match="--seed must be >= 0"):
        synth(tmp_path, seed=-1)
