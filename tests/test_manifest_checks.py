"""CSV manifests a user got wrong are refused, naming the file, the line and the column (issue 20
item 7): a mask of another size than its image (was stretched onto it: pixel AUROC 0.78 -> 0.47),
no label column (was accepted), a good label with defect pixels in its mask, a Latin-1 file (was a
codec error naming no file)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ccad.data.detect import load_dataset
from ccad.data.layouts import load_csv_manifest
from ccad.data.tree import DatasetLayoutError


def _png(path: Path, w: int, h: int, value: int = 128, box: tuple | None = None) -> Path:
    a = np.full((h, w), value, np.uint8)
    if box is not None:
        a[:] = 0
        a[box[0]:box[1], box[2]:box[3]] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)
    return path


@pytest.fixture
def folder(tmp_path):
    _png(tmp_path / "good.png", 373, 248)
    _png(tmp_path / "bad.png", 373, 248)
    _png(tmp_path / "bad_mask.png", 373, 248, box=(10, 20, 10, 20))
    _png(tmp_path / "tiny_mask.png", 10, 10, box=(2, 4, 2, 4))
    return tmp_path


def test_a_good_manifest_still_loads(folder):
    (folder / "m.csv").write_text("image,split,label,mask\ngood.png,test,0,\nbad.png,test,1,bad_mask.png\n")
    assert [s.label for s in load_csv_manifest(folder / "m.csv")] == [0, 1]


@pytest.mark.parametrize("rows, match", [
    ("image,split,label,mask\ngood.png,test,0,\nbad.png,test,1,tiny_mask.png\n",
     r"m\.csv', line 3, column 'mask': the mask tiny_mask\.png is 10x10 but its image bad\.png is 373x248"),
    ("image,split,mask\ngood.png,test,\nbad.png,test,bad_mask.png\n",
     r"m\.csv' has no label column \(header: image, split, mask\)"),
    ("image,split,label,mask\ngood.png,test,0,bad_mask.png\n",
     r"m\.csv', line 2, column 'mask': the mask bad_mask\.png marks 100 defect pixel\(s\) but column 'label' "
     r"says the image is good"),
])
def test_a_wrong_manifest_is_refused_naming_file_line_and_column(folder, rows, match):
    (folder / "m.csv").write_text(rows)
    with pytest.raises(DatasetLayoutError, match=match):
        load_csv_manifest(folder / "m.csv")
    with pytest.raises(DatasetLayoutError, match=match):  # the same through layout detection
        load_dataset(folder / "m.csv", "test")


def test_a_latin1_manifest_is_refused_naming_file_line_and_column(folder):
    (folder / "m.csv").write_bytes("image,split,label,mask\ngood.png,test,0,\nbad.png,test,1,café.png\n"
                                   .encode("latin-1"))
    with pytest.raises(DatasetLayoutError, match=r"m\.csv', line 3, column 'mask': not UTF-8 text \(byte 0xe9\)"):
        load_csv_manifest(folder / "m.csv")
    # through layout detection (``ccad evaluate MODEL m.csv``): was "'utf-8' codec can't decode byte 0xe9 ..."
    with pytest.raises(DatasetLayoutError, match=r"m\.csv', line 3"):
        load_dataset(folder / "m.csv", "test")
