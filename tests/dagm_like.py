"""Tiny DAGM-like folders for the review tests (no shared data): grey noise textures with a dark
blob as the defect and a larger ellipse as its weak label, in the two layouts the loader reads.

* published: ``ClassN/Train/*.PNG`` with ``Train/Label/<stem>_label.PNG`` and ``Label/Labels.txt``
  (rows ``index flag file labelflag labelfile``; flag 0 = non-defective, label file ``0``);
* loose (like the DAGM sample): ``test_data/classN/*.PNG`` with ``true_masks/<stem>_label.PNG``
  and no ``Labels.txt``.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    noise = rng.normal(0.0, 1.0, (size, size)).astype(np.float32)
    tex = cv2.GaussianBlur(noise, (0, 0), 1.2)
    tex = 128 + 30 * tex / (tex.std() + 1e-6)
    return np.clip(tex, 0, 255).astype(np.uint8)


def defect_image(rng: np.random.Generator, size: int, centre: tuple[int, int],
                 axes: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(image with a dark elliptic blob at ``centre`` (x, y), its ellipse weak label (0/255) with
    axes 1.6x the blob's)."""
    img = _texture(rng, size)
    blob = np.zeros((size, size), np.uint8)
    cv2.ellipse(blob, centre, axes, 0, 0, 360, 1, -1)
    img[blob > 0] = (img[blob > 0] * 0.25).astype(np.uint8)
    label = np.zeros((size, size), np.uint8)
    cv2.ellipse(label, centre, (int(axes[0] * 1.6), int(axes[1] * 1.6)), 0, 0, 360, 255, -1)
    return img, label


def write_dagm_like(root: Path, n_good: int = 4, n_defect: int = 2, size: int = 128,
                    cls: str = "Class1", loose: bool = False, seed: int = 0,
                    axes: tuple[int, int] = (18, 12), split: str = "Train") -> dict[str, list[str]]:
    """Write one class; returns ``{"good": [names], "defect": [names]}`` (the file names).

    Defective images come first (0001.PNG ...), each with its blob at the image centre. ``split``:
    the published layout's ``Train`` or ``Test`` folder."""
    rng = np.random.default_rng(seed)
    folder = root / ("test_data" / Path(cls) if loose else Path(cls) / split)
    label_dir = folder / ("true_masks" if loose else "Label")
    label_dir.mkdir(parents=True, exist_ok=True)
    names: dict[str, list[str]] = {"good": [], "defect": []}
    rows = ["No.\tFlag\tImage\tLabelFlag\tLabel"]
    for i in range(n_defect + n_good):
        name = f"{i + 1:04d}.PNG"
        if i < n_defect:
            img, label = defect_image(rng, size, (size // 2, size // 2), axes)
            lab_name = f"{i + 1:04d}_label.PNG"
            assert cv2.imwrite(str(label_dir / lab_name), label)
            rows.append(f"{i + 1}\t1\t{name}\t1\t{lab_name}")
            names["defect"].append(name)
        else:
            img = _texture(rng, size)
            rows.append(f"{i + 1}\t0\t{name}\t0\t0")
            names["good"].append(name)
        assert cv2.imwrite(str(folder / name), img)
    if not loose:
        (label_dir / "Labels.txt").write_text("\n".join(rows) + "\n")
    return names
