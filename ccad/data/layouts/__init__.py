"""Dataset layouts -> ``list[Sample]``: one module per family of layouts.

Loaders (each returns a :class:`ccad.data.skips.SampleList`, sorted, paths absolute):

* :func:`load_folder`: a plain folder of (good) images (:mod:`.folder`).
* :func:`load_mvtec`: MVTec AD (``<cat>/train/good``, ``<cat>/test/<type>``,
  ``<cat>/ground_truth/<type>/<stem>_mask.png``); masks sharing the image stem (anomalib) too
  (:mod:`.mvtec`).
* :func:`load_anomalib_folder`: anomalib's ``Folder`` layout (``good/``, ``<defect>/``,
  ``mask/<defect>/<stem>.png``), no train/test folders (:mod:`.folder`).
* :func:`load_csv_manifest`: a CSV with columns ``image, split, label, mask`` (+ optional
  ``category``, ``defect_type``); VisA's split CSV (``object, split, label, image, mask``) is the
  same reader (:func:`load_visa`) (:mod:`.manifest`).
* :func:`load_mvtec_loco`: MVTec LOCO AD; several masks per image (their union is the truth).
* :func:`load_mvtec3d`: MVTec 3D-AD, RGB only.
* :func:`load_dagm`: DAGM 2007 as published (``ClassN/Train|Test``, ``Label/Labels.txt``,
  ``<stem>_label.PNG`` ellipses) (:mod:`.dagm`); :func:`load_dagm_ccad`: CCAD's re-annotated
  layout (MVTec-shaped).

:func:`ccad.data.detect.load_dataset` auto-detects any of them. The CCAD paper (Sec. 4.1) trains
on the good training images only and tests on the test split; ``split="train"`` therefore
returns good images only for every layout (DAGM's training folders also hold defective images:
they are left out unless ``include_defective=True``).
"""

from __future__ import annotations

from ccad.data.layouts.dagm import load_dagm
from ccad.data.layouts.folder import load_anomalib_folder, load_folder
from ccad.data.layouts.manifest import load_csv_manifest, load_visa
from ccad.data.layouts.mvtec import load_dagm_ccad, load_mvtec, load_mvtec3d, load_mvtec_loco

__all__ = [
    "load_folder",
    "load_mvtec",
    "load_anomalib_folder",
    "load_csv_manifest",
    "load_visa",
    "load_mvtec_loco",
    "load_mvtec3d",
    "load_dagm",
    "load_dagm_ccad",
]
