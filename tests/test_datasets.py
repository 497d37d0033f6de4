"""ccad.data.layouts / detect / dataset: every layout loader on tiny generated trees, auto-detection, errors,
skip-and-report batching, and the synthetic write -> load round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ccad.data.dataset import ImageDataset, iter_batches, load_sample_mask
from ccad.data.detect import detect_layout, load_dataset
from ccad.data.layouts import (
    load_anomalib_folder,
    load_csv_manifest,
    load_dagm,
    load_dagm_ccad,
    load_folder,
    load_mvtec,
    load_mvtec3d,
    load_mvtec_loco,
    load_visa,
)
from ccad.data.sample import summarize
from ccad.data.tree import DatasetLayoutError
from ccad.data.io import load_mask
from ccad.data.sample import Sample
from ccad.data.synthetic import DEFECTS, make_sample, write_dataset


def img(path: Path, value: int = 128, size: tuple[int, int] = (12, 16), mode: str = "L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.full(size, value, np.uint8)
    if mode == "RGB":
        a = np.dstack([a, a // 2, 255 - a])
    fmt = {".jpg": "JPEG", ".png": "PNG", ".bmp": "BMP"}.get(path.suffix.lower(), "PNG")
    Image.fromarray(a).save(path, format=fmt)
    return path


def mask(path: Path, box: tuple[int, int, int, int], size: tuple[int, int] = (12, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.zeros(size, np.uint8)
    y0, y1, x0, x1 = box
    a[y0:y1, x0:x1] = 255
    Image.fromarray(a).save(path)
    return path


def names(samples: list[Sample]) -> list[str]:
    return [Path(s.image_path).name for s in samples]


# ------------------------------------------------------------------------------ plain folder


def test_load_folder_skips_masks_and_non_images(tmp_path: Path) -> None:
    img(tmp_path / "b.png")
    img(tmp_path / "a.JPG")
    img(tmp_path / "a_mask.png")
    (tmp_path / "notes.txt").write_text("x")
    img(tmp_path / "sub" / "c.png")
    s = load_folder(tmp_path)
    assert names(s) == ["a.JPG", "b.png"]
    assert all(x.label == 0 and x.defect_type == "good" and x.mask_path is None for x in s)
    assert all(Path(x.image_path).is_absolute() for x in s)
    assert names(load_folder(tmp_path, recursive=True)) == ["a.JPG", "b.png", "c.png"]
    unk = load_folder(tmp_path, label=-1)
    assert {x.label for x in unk} == {-1}
    assert detect_layout(tmp_path) == "folder"
    assert len(load_dataset(tmp_path, "train")) == 2


# ------------------------------------------------------------------------------ MVTec AD


def _mvtec_tree(root: Path, cat: str = "bottle", anomalib_masks: bool = False) -> Path:
    c = root / cat
    img(c / "train" / "good" / "000.png")
    img(c / "train" / "good" / "001.png")
    img(c / "test" / "good" / "000.png")
    img(c / "test" / "crack" / "000.png")
    img(c / "test" / "crack" / "001.png")  # no mask for this one
    name = "000.png" if anomalib_masks else "000_mask.png"
    mask(c / "ground_truth" / "crack" / name, (2, 5, 3, 9))
    return c


@pytest.mark.parametrize("anomalib_masks", [False, True])
def test_load_mvtec(tmp_path: Path, anomalib_masks: bool) -> None:
    cat = _mvtec_tree(tmp_path, anomalib_masks=anomalib_masks)
    _mvtec_tree(tmp_path, "cable")
    train = load_mvtec(tmp_path, "train", category="bottle")
    assert len(train) == 2 and {s.split for s in train} == {"train"} and {s.label for s in train} == {0}
    test = load_mvtec(cat, "test")
    by = {(s.defect_type, Path(s.image_path).name): s for s in test}
    assert len(test) == 3
    assert by[("good", "000.png")].label == 0 and by[("good", "000.png")].mask_path is None
    crack = by[("crack", "000.png")]
    assert crack.label == 1 and crack.category == "bottle"
    assert crack.mask_path is not None and load_mask(crack.mask_path).sum() == 3 * 6
    assert by[("crack", "001.png")].label == 1 and by[("crack", "001.png")].mask_path is None
    assert {s.category for s in load_mvtec(tmp_path, "test")} == {"bottle", "cable"}
    assert len(load_mvtec(tmp_path, "all")) == 2 * 5
    with pytest.raises(DatasetLayoutError, match="category 'screw' not found.*bottle, cable"):
        load_mvtec(tmp_path, "test", category="screw")
    assert detect_layout(tmp_path) == "mvtec" and detect_layout(cat) == "mvtec"
    assert len(load_dataset(tmp_path, "test", category="cable")) == 3


# ------------------------------------------------------------------------------ anomalib Folder


def test_load_anomalib_folder(tmp_path: Path) -> None:
    for i in range(5):
        img(tmp_path / "good" / f"{i:03d}.png")
    img(tmp_path / "scratch" / "s1.png")
    img(tmp_path / "scratch" / "s2.png")
    mask(tmp_path / "mask" / "scratch" / "s1.png", (0, 3, 0, 3))
    assert detect_layout(tmp_path) == "anomalib_folder"
    train = load_anomalib_folder(tmp_path, "train")
    test = load_anomalib_folder(tmp_path, "test")
    assert len(train) == 4 and all(s.label == 0 for s in train)
    assert not set(names(train)) & {n for s, n in zip(test, names(test)) if s.label == 0}
    assert sum(s.label == 0 for s in test) == 1 and sum(s.label == 1 for s in test) == 2
    s1 = next(s for s in test if Path(s.image_path).name == "s1.png")
    s2 = next(s for s in test if Path(s.image_path).name == "s2.png")
    assert s1.mask_path is not None and s1.defect_type == "scratch" and s2.mask_path is None
    assert len(load_dataset(tmp_path, "all")) == 7


# ------------------------------------------------------------------------------ CSV and VisA


def test_load_csv_manifest(tmp_path: Path) -> None:
    d = tmp_path / "data"
    img(d / "imgs" / "g1.png")
    img(d / "imgs" / "g2.png")
    img(d / "imgs" / "b1.png")
    mask(d / "masks" / "b1.png", (1, 4, 1, 4))
    absolute = img(tmp_path / "elsewhere" / "abs.png")
    csv = d / "manifest.csv"
    csv.write_text(
        "image,split,label,mask,category,defect_type\r\n"
        "imgs/g1.png,train,0,,tile,\r\n"
        "imgs/g2.png,test,good,,tile,good\r\n"
        "imgs/b1.png,test,1,masks/b1.png,tile,crack\r\n"
        f"{absolute},test,,,tile,\r\n"
        "imgs/b1.png,train,1,masks/b1.png,tile,crack\r\n",
        encoding="utf-8-sig",
    )
    allrows = load_csv_manifest(csv)
    assert len(allrows) == 4  # the anomalous train row is not a training image
    test = load_csv_manifest(csv, "test")
    assert names(test) == ["g2.png", "b1.png", "abs.png"]
    assert [s.label for s in test] == [0, 1, -1]
    assert test[1].mask_path == str((d / "masks" / "b1.png").resolve())
    assert test[1].defect_type == "crack" and test[0].category == "tile"
    assert test[2].image_path == str(absolute.resolve())
    train = load_csv_manifest(csv, "train")
    assert names(train) == ["g1.png"] and train[0].split == "train"
    # root= overrides the CSV folder
    moved = tmp_path / "m.csv"
    moved.write_text("image,label\nimgs/g1.png,0\n")
    assert Path(load_csv_manifest(moved, root=d)[0].image_path).exists()
    assert detect_layout(csv) == "csv" and detect_layout(d) == "csv"
    assert len(load_dataset(d, "test")) == 3


def test_csv_manifest_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("file_name_wrong,label\nx.png,0\n")
    with pytest.raises(DatasetLayoutError, match=r"bad\.csv.*no image column"):
        load_csv_manifest(bad)
    lab = tmp_path / "lab.csv"
    lab.write_text("image,label\nx.png,maybe\n")
    with pytest.raises(DatasetLayoutError, match=r"lab\.csv', line 2.*maybe"):
        load_csv_manifest(lab)
    with pytest.raises(DatasetLayoutError, match="not found"):
        load_csv_manifest(tmp_path / "missing.csv")


def test_load_visa(tmp_path: Path) -> None:
    root = tmp_path / "VisA"
    img(root / "candle" / "Data" / "Images" / "Normal" / "0000.JPG", mode="RGB")
    img(root / "candle" / "Data" / "Images" / "Normal" / "0001.JPG", mode="RGB")
    img(root / "candle" / "Data" / "Images" / "Anomaly" / "000.JPG", mode="RGB")
    m = np.zeros((12, 16), np.uint8)
    m[2:4, 2:6] = 1  # VisA masks hold small integer ids, not 255
    (root / "candle" / "Data" / "Masks" / "Anomaly").mkdir(parents=True)
    Image.fromarray(m).save(root / "candle" / "Data" / "Masks" / "Anomaly" / "000.png")
    (root / "split_csv").mkdir()
    (root / "split_csv" / "1cls.csv").write_text(
        "object,split,label,image,mask\n"
        "candle,train,normal,candle/Data/Images/Normal/0000.JPG,\n"
        "candle,test,normal,candle/Data/Images/Normal/0001.JPG,\n"
        "candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png\n"
    )
    test = load_visa(root, split="test")
    assert [s.label for s in test] == [0, 1] and {s.category for s in test} == {"candle"}
    assert load_sample_mask(test[1]).sum() == 8
    assert len(load_visa(root, "split_csv/1cls.csv", "train")) == 1
    assert detect_layout(root) == "visa" and detect_layout(root / "split_csv" / "1cls.csv") == "visa"
    # the CSV alone resolves paths from its parent folder (VisA root)
    assert [s.label for s in load_dataset(root / "split_csv" / "1cls.csv", "test")] == [0, 1]
    assert len(load_dataset(root, "test")) == 2


# ------------------------------------------------------------------------------ MVTec LOCO / 3D


def test_load_mvtec_loco_unions_masks(tmp_path: Path) -> None:
    c = tmp_path / "juice_bottle"
    img(c / "train" / "good" / "000.png")
    img(c / "validation" / "good" / "000.png")
    img(c / "test" / "good" / "000.png")
    img(c / "test" / "logical_anomalies" / "000.png")
    img(c / "test" / "structural_anomalies" / "000.png")
    mask(c / "ground_truth" / "logical_anomalies" / "000" / "000.png", (0, 2, 0, 2))
    mask(c / "ground_truth" / "logical_anomalies" / "000" / "001.png", (5, 7, 5, 8))
    mask(c / "ground_truth" / "structural_anomalies" / "000" / "000.png", (1, 3, 1, 3))
    assert detect_layout(tmp_path) == "mvtec_loco"
    assert len(load_mvtec_loco(tmp_path, "train")) == 1
    assert load_mvtec_loco(tmp_path, "validation")[0].split == "validation"
    test = load_mvtec_loco(tmp_path, "test")
    assert len(test) == 3
    log = next(s for s in test if s.defect_type == "logical_anomalies")
    assert log.label == 1 and len(log.mask_paths()) == 2
    assert load_sample_mask(log).sum() == 4 + 6  # union of both masks
    ds = ImageDataset([log], image_size=(12, 16))
    assert ds[0]["mask"].sum() == 10
    good = next(s for s in test if s.defect_type == "good")
    assert good.label == 0 and load_sample_mask(good) is None


def test_load_mvtec3d_rgb_only(tmp_path: Path) -> None:
    c = tmp_path / "bagel"
    img(c / "train" / "good" / "rgb" / "000.png", mode="RGB")
    (c / "train" / "good" / "xyz").mkdir(parents=True)
    (c / "train" / "good" / "xyz" / "000.tiff").write_bytes(b"II*\x00")
    img(c / "validation" / "good" / "rgb" / "000.png", mode="RGB")
    img(c / "test" / "good" / "rgb" / "000.png", mode="RGB")
    img(c / "test" / "hole" / "rgb" / "000.png", mode="RGB")
    mask(c / "test" / "hole" / "gt" / "000.png", (3, 6, 3, 6))
    assert detect_layout(tmp_path) == "mvtec3d"
    tr = load_mvtec3d(tmp_path, "train")
    assert names(tr) == ["000.png"] and "/rgb/" in tr[0].image_path.replace("\\", "/")
    test = load_mvtec3d(tmp_path, "test", category="bagel")
    hole = next(s for s in test if s.defect_type == "hole")
    assert hole.label == 1 and load_mask(hole.mask_path).sum() == 9
    assert len(load_dataset(tmp_path, "validation")) == 1


# ------------------------------------------------------------------------------ DAGM


def _dagm_tree(root: Path) -> Path:
    cls = root / "Class3"
    for sp, rows in (("Train", [("0001", 0), ("0002", 0), ("0003", 1)]),
                     ("Test", [("0001", 0), ("0002", 1)])):
        lines = ["1"]
        for i, (stem, lab) in enumerate(rows, 1):
            img(cls / sp / f"{stem}.PNG")
            if lab:
                mask(cls / sp / "Label" / f"{stem}_label.PNG", (2, 8, 2, 12))
                lines.append(f"{i}\t1\t{stem}.PNG\t1\t{stem}_label.PNG")
            else:
                lines.append(f"{i}\t0\t{stem}.PNG\t0\t0")
        (cls / sp / "Label").mkdir(parents=True, exist_ok=True)
        (cls / sp / "Label" / "Labels.txt").write_text("\n".join(lines) + "\n")
    return cls


def test_load_dagm_published(tmp_path: Path) -> None:
    cls = _dagm_tree(tmp_path)
    assert detect_layout(tmp_path) == "dagm" and detect_layout(cls) == "dagm"
    train = load_dagm(tmp_path, "train")
    assert names(train) == ["0001.PNG", "0002.PNG"] and {s.label for s in train} == {0}
    assert len(load_dagm(tmp_path, "train", include_defective=True)) == 3
    test = load_dagm(cls, "test")
    assert [s.label for s in test] == [0, 1] and test[0].category == "Class3"
    assert test[1].mask_path is not None and load_mask(test[1].mask_path).sum() == 60
    assert test[0].mask_path is None
    with pytest.raises(DatasetLayoutError, match="Class9"):
        load_dagm(tmp_path, "test", category="Class9")


def test_load_dagm_without_labels_txt_marks_unlabelled_unknown(tmp_path: Path) -> None:
    c = tmp_path / "test_data" / "class1"
    img(c / "0001.PNG")
    img(c / "0002.PNG")
    mask(c / "true_masks" / "0002_label.PNG", (0, 4, 0, 4))
    assert detect_layout(tmp_path) == "dagm"
    s = load_dataset(tmp_path, "test")
    assert [x.label for x in s] == [-1, 1]
    assert s[1].mask_path is not None and s[0].mask_path is None


def test_load_dagm_ccad_layout(tmp_path: Path) -> None:
    c = tmp_path / "Class1_defect"
    img(c / "train" / "good" / "0001.png")
    img(c / "test" / "good" / "0002.png")
    img(c / "test" / "anomal" / "0003.png")
    img(c / "test" / "anomal" / "0004.png")
    mask(c / "ground_truth" / "anomal" / "0003_mask.png", (0, 2, 0, 2))
    mask(c / "ground_truth" / "anomal" / "0004.png", (0, 3, 0, 3))
    assert detect_layout(tmp_path) == "dagm_ccad"
    test = load_dagm_ccad(tmp_path, "test")
    an = [s for s in test if s.label == 1]
    assert [load_mask(s.mask_path).sum() for s in an] == [4, 9]
    assert {s.defect_type for s in an} == {"anomal"} and test[0].category == "Class1_defect"


# ------------------------------------------------------------------------------ load_dataset errors


def test_load_dataset_errors_name_the_path(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetLayoutError, match=r"cannot recognise a dataset layout in '.*empty'"):
        load_dataset(empty)
    txt = tmp_path / "txtonly"
    txt.mkdir()
    (txt / "readme.txt").write_text("no images")
    with pytest.raises(DatasetLayoutError, match="txtonly"):
        load_dataset(txt)
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        load_dataset(tmp_path / "nope")
    _mvtec_tree(tmp_path / "mv")
    with pytest.raises(DatasetLayoutError, match=r"no images found in '.*mv' \(layout mvtec, split 'validation'\)"):
        load_dataset(tmp_path / "mv", "validation")
    with pytest.raises(ValueError, match="unknown layout 'coco'"):
        load_dataset(tmp_path / "mv", layout="coco")
    with pytest.raises(ValueError, match="unknown split"):
        load_dataset(tmp_path / "mv", split="dev")
    assert summarize(load_dataset(tmp_path / "mv", "test"))["labels"] == {"anomalous": 2, "good": 1}


# ------------------------------------------------------------------------------ skip and report


def _mixed(tmp_path: Path) -> list[Sample]:
    s = []
    for i in range(5):
        p = tmp_path / f"{i}.png"
        if i == 2:
            p.write_bytes(b"\x89PNG\r\n\x1a\ncorrupt!")
        else:
            img(p, value=40 * i, size=(10 + i, 14))
        s.append(Sample(str(p), None, 0))
    m = mask(tmp_path / "3_mask.png", (0, 13, 0, 7), size=(13, 14))
    s[3] = Sample(s[3].image_path, str(m), 1, "c", "crack")
    return s


def test_image_dataset_skip_and_report(tmp_path: Path) -> None:
    samples = _mixed(tmp_path)
    ds = ImageDataset(samples, image_size=8, on_error="skip")
    items = [ds[i] for i in range(len(ds))]
    assert [Path(it["path"]).name for it in items] == ["0.png", "1.png", "3.png", "3.png", "4.png"]
    assert len(ds.errors) == 1 and ds.errors[0][0].endswith("2.png") and "decode" in ds.errors[0][1]
    it = items[2]
    assert it["image"].shape == (3, 8, 8) and it["mask"].shape == (1, 8, 8)
    assert it["label"] == 1 and it["original_size"] == (13, 14) and it["defect_type"] == "crack"
    assert 0.4 < float(it["mask"].mean()) < 0.6
    assert items[0]["mask"].sum() == 0
    strict = ImageDataset(samples, image_size=8)
    with pytest.raises(Exception, match=r"2\.png"):
        strict[2]
    bad = ImageDataset([Sample(str(tmp_path / "gone.png"), None, 0)], 8, on_error="skip")
    with pytest.raises(RuntimeError, match="none of the 1 images"):
        bad[0]


@pytest.mark.parametrize("workers", [0, 2])
def test_iter_batches_never_dies(tmp_path: Path, workers: int) -> None:
    samples = _mixed(tmp_path)
    errors: list[tuple[str, str]] = []
    batches = list(iter_batches(samples, image_size=8, batch_size=2, errors=errors, num_workers=workers))
    assert [b["image"].shape[0] for b in batches] == [2, 2]
    assert [i for b in batches for i in b["index"]] == [0, 1, 3, 4]
    assert len(errors) == 1 and Path(errors[0][0]).name == "2.png"
    assert sum(len(b["errors"]) for b in batches) == 1
    b = batches[1]
    assert b["image"].dtype == torch.float32 and b["mask"].shape == (2, 1, 8, 8)
    assert b["label"].tolist() == [1, 0] and b["mask"][0].sum() > 0
    # images keep their own content: brighter files give brighter batches
    assert float(batches[0]["image"][1].mean()) > float(batches[0]["image"][0].mean())
    with pytest.raises(Exception, match=r"2\.png"):
        list(iter_batches(samples, 8, 2, on_error="raise"))


# ------------------------------------------------------------------------------ synthetic round trip


@pytest.mark.parametrize("layout", ["mvtec", "dagm", "dagm_ccad"])
def test_synthetic_round_trip(tmp_path: Path, layout: str) -> None:
    root = write_dataset(tmp_path / layout, kinds=["fibrous", "speckle"], n_train=3, n_test_good=2,
                         n_test_defect=1, size=40, seed=7, layout=layout)
    assert detect_layout(root) == layout
    train = load_dataset(root, "train")
    test = load_dataset(root, "test")
    assert len(train) == 2 * 3 and all(s.label == 0 for s in train)
    assert len(test) == 2 * (2 + len(DEFECTS))
    assert sum(s.label for s in test) == 2 * len(DEFECTS)
    assert all(s.mask_path for s in test if s.label == 1)
    # read back through the batch reader: masks align with the generated truth
    batches = list(iter_batches(test, image_size=40, batch_size=4))
    assert sum(b["image"].shape[0] for b in batches) == len(test)
    labels = torch.cat([b["label"] for b in batches])
    masks = torch.cat([b["mask"] for b in batches])
    assert torch.all((masks.flatten(1).sum(1) > 0) == (labels == 1))
    if layout == "dagm":
        exact = load_dagm(root, "test", mask_source="exact")
        for s_ell, s_ex in zip(test, exact):
            if s_ell.label == 1:
                e, m = load_mask(s_ell.mask_path), load_mask(s_ex.mask_path)
                assert np.all(e[m > 0] > 0) and e.sum() > m.sum()
    if layout == "mvtec":
        s = next(x for x in test if x.defect_type == "spot" and x.category == "speckle")
        import json
        meta = json.loads((root / "synthetic.json").read_text())
        rec = next(r for r in meta["images"] if r["defect"] == "spot" and r["category"] == "speckle")
        np.testing.assert_array_equal(load_mask(s.mask_path), make_sample("speckle", 40, rec["seed"], "spot").mask)
