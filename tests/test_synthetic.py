"""ccad.data.synthetic: determinism, exact masks, DAGM-style ellipses, writers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from ccad.data.io import load_image, load_mask
from ccad.data.synthetic import (
    DEFECTS,
    TEXTURES,
    ellipse_label,
    generate_texture,
    make_sample,
    write_dataset,
)

SIZE = 96


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


@pytest.mark.parametrize("kind", TEXTURES)
def test_texture_deterministic_and_valid(kind: str) -> None:
    a = generate_texture(kind, SIZE, seed=5)
    b = generate_texture(kind, SIZE, seed=5)
    c = generate_texture(kind, SIZE, seed=6)
    assert a.dtype == np.float32 and a.shape == (SIZE, SIZE)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)
    assert 0.0 < a.min() and a.max() < 1.0
    assert a.std() > 0.03  # a texture, not a flat image
    # 8-bit levels exactly
    np.testing.assert_array_equal(np.round(a * 255) / 255, a)


def test_texture_classes_differ_statistically() -> None:
    """Classes are distinguishable: their mean gradient energy and autocorrelation differ."""
    feats = []
    for kind in TEXTURES:
        t = generate_texture(kind, 128, seed=1)
        gx = np.abs(np.diff(t, axis=1)).mean()
        gy = np.abs(np.diff(t, axis=0)).mean()
        feats.append((gx, gy))
    feats_a = np.array(feats)
    d = np.abs(feats_a[:, None, :] - feats_a[None, :, :]).sum(-1)
    assert (d + np.eye(len(TEXTURES))).min() > 0.003
    # the brushed texture is anisotropic (smeared along ~18 degrees, mostly horizontal)
    fib = feats[TEXTURES.index("fibrous")]
    assert fib[1] > 1.3 * fib[0]


def test_non_square_size() -> None:
    s = make_sample("cloud", (64, 100), seed=2, defect="stain")
    assert s.image.shape == s.mask.shape == s.ellipse.shape == (64, 100)


@pytest.mark.parametrize("defect", DEFECTS)
@pytest.mark.parametrize("kind", ["fibrous", "woven", "cloud"])
def test_defect_mask_exact_and_visible(kind: str, defect: str) -> None:
    s = make_sample(kind, SIZE, seed=11, defect=defect)
    assert s.defect == defect and s.label == 1
    m = s.mask > 0
    assert set(np.unique(s.mask)) == {0.0, 1.0}
    assert 5 <= m.sum() < 0.25 * m.size
    # clean texture is exactly the texture generator's output
    np.testing.assert_array_equal(s.clean, generate_texture(kind, SIZE, 11))
    diff = np.abs(s.image - s.clean)
    assert diff[~m].max() == 0.0  # nothing changes outside the exact mask
    assert diff[m].mean() > 0.05  # the defect differs from the background
    # the defect region is statistically distinguishable from the defect-free texture there
    assert abs(float(s.image[m].mean() - s.clean[m].mean())) > 0.04 or defect == "blur"


@pytest.mark.parametrize("defect", DEFECTS)
def test_ellipse_encloses_mask_and_is_looser(defect: str) -> None:
    for seed in range(4):
        s = make_sample("granular", SIZE, seed=seed, defect=defect)
        m, e = s.mask > 0, s.ellipse > 0
        assert np.all(e[m]), f"mask pixel outside the ellipse (seed {seed})"
        iou = (m & e).sum() / (m | e).sum()
        assert iou < 0.75, f"ellipse too tight: IoU {iou:.2f}"
        assert e.sum() > m.sum()
        assert s.ellipse_params is not None
        cx, cy, a, b, _ = s.ellipse_params
        assert a >= b > 0
        # a filled ellipse: area close to pi*a*b when fully inside the image
        if 0 < cx - a and cx + a < SIZE and 0 < cy - a and cy + a < SIZE:
            assert e.sum() == pytest.approx(np.pi * a * b, rel=0.1)


def test_ellipse_label_empty_and_single_pixel() -> None:
    e, p = ellipse_label(np.zeros((20, 20), np.float32))
    assert e.sum() == 0 and p is None
    m = np.zeros((40, 40), np.float32)
    m[20, 20] = 1
    e, p = ellipse_label(m)
    assert e[20, 20] == 1 and e.sum() > 1


def test_sample_deterministic_bytes() -> None:
    for d in (None,) + DEFECTS:
        a = make_sample("speckle", SIZE, seed=3, defect=d)
        b = make_sample("speckle", SIZE, seed=3, defect=d)
        for x, y in ((a.image, b.image), (a.mask, b.mask), (a.ellipse, b.ellipse)):
            assert _digest(x) == _digest(y)
    good = make_sample("speckle", SIZE, seed=3)
    assert good.defect is None and good.mask.sum() == 0 and good.ellipse.sum() == 0


def test_unknown_names_raise() -> None:
    with pytest.raises(ValueError, match="unknown texture kind 'wood'"):
        generate_texture("wood", 32, 0)
    with pytest.raises(ValueError, match="unknown defect 'hole'"):
        make_sample("cloud", 32, 0, defect="hole")


def test_write_mvtec_layout(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "syn", kinds=["woven"], n_train=2, n_test_good=1,
                         n_test_defect=1, size=48, seed=4, defects=["scratch", "stain"])
    cat = root / "woven"
    assert sorted(p.name for p in (cat / "train" / "good").iterdir()) == ["000.png", "001.png"]
    assert sorted(p.name for p in (cat / "test").iterdir()) == ["good", "scratch", "stain"]
    for d in ("scratch", "stain"):
        img = load_image(cat / "test" / d / "000.png")
        mask = load_mask(cat / "ground_truth" / d / "000_mask.png")
        ell = load_mask(cat / "weak_labels" / d / "000_ellipse.png")
        assert img.shape == (48, 48, 3) and mask.shape == (48, 48)
        assert mask.sum() > 0 and np.all(ell[mask > 0] > 0)
    meta = json.loads((root / "synthetic.json").read_text())
    assert meta["layout"] == "mvtec" and len(meta["images"]) == 2 + 1 + 2
    # the written pixels are exactly the generated sample (8-bit round trip is lossless)
    rec = next(r for r in meta["images"] if r["defect"] == "stain")
    s = make_sample("woven", 48, rec["seed"], "stain")
    np.testing.assert_array_equal(load_image(root / rec["image"])[..., 0], s.image)


def test_write_is_deterministic(tmp_path: Path) -> None:
    def tree_hash(root: Path) -> str:
        h = hashlib.sha256()
        for p in sorted(root.rglob("*")):
            if p.is_file():
                h.update(str(p.relative_to(root)).encode())
                h.update(p.read_bytes())
        return h.hexdigest()

    a = write_dataset(tmp_path / "a", kinds=["cloud"], n_train=1, n_test_good=1, n_test_defect=1, size=32,
                      seed=9, layout="dagm")
    b = write_dataset(tmp_path / "b", kinds=["cloud"], n_train=1, n_test_good=1, n_test_defect=1, size=32,
                      seed=9, layout="dagm")
    c = write_dataset(tmp_path / "c", kinds=["cloud"], n_train=1, n_test_good=1, n_test_defect=1, size=32,
                      seed=10, layout="dagm")
    assert tree_hash(a) == tree_hash(b) != tree_hash(c)


def test_write_dagm_layout(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "dagm", kinds=["fibrous", "granular"], n_train=2, n_test_good=2,
                         n_test_defect=1, size=40, seed=1, layout="dagm")
    for n in (1, 2):
        test = root / f"Class{n}" / "Test"
        lines = (test / "Label" / "Labels.txt").read_text().splitlines()
        rows = [ln.split("\t") for ln in lines[1:]]
        assert len(rows) == 2 + len(DEFECTS)
        labelled = [r for r in rows if r[3] == "1"]
        assert len(labelled) == len(DEFECTS)
        for r in labelled:
            stem = r[2][:-4]
            assert r[4] == f"{stem}_label.PNG"
            ell = load_mask(test / "Label" / r[4])
            exact = load_mask(test / "Exact" / f"{stem}_mask.PNG")
            assert exact.sum() > 0 and np.all(ell[exact > 0] > 0) and ell.sum() > exact.sum()
        for r in rows:
            assert (test / r[2]).is_file()
        train_rows = (root / f"Class{n}" / "Train" / "Label" / "Labels.txt").read_text().splitlines()[1:]
        assert len(train_rows) == 2 and all(r.split("\t")[1] == "0" for r in train_rows)


def test_write_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="layout"):
        write_dataset(tmp_path, kinds=["cloud"], layout="coco")
    with pytest.raises(ValueError, match="texture kind"):
        write_dataset(tmp_path, kinds=["marble"])
