"""DAGM mask review: tight-mask proposals for weak ellipse labels, and a persistent review store.

The original DAGM 2007 labels are coarse ellipses around each defect; CCAD (Sec. 4.2, App. D.7)
re-annotated them into tight masks, which raised pixel AUROC for every method. This package
does the method side of that re-annotation for a human annotator:

* :func:`propose_mask` turns an ellipse label into a tight mask proposal from two cues, the
  model's anomaly map (the eq. 16 map of the detector, when one is loaded) and the image itself
  (the defect deviates from the surrounding texture), refined with OpenCV GrabCut seeded by the
  ellipse (outside = sure background).
* :class:`ReviewSession` walks a DAGM folder (published layout, CCAD re-annotated layout,
  the synthetic DAGM-style set, or the flat ``test_data/classN`` sample layout), keeps the
  annotator's accept / reject / edit decisions on disk after every action (atomic writes) and
  exports binary PNG masks plus a CSV of decisions.

No UI code lives here; ``app/review.py`` is the Gradio face of this package.

The package is split along those ideas: :mod:`.proposals` (the mask proposal and its cues),
:mod:`.discovery` (finding images, labels and a class's normal images), :mod:`.session` (the
persistent review store and its export) and :mod:`.masks` (mask files, IoU and overlays). Every
public name is importable from ``ccad.relabel``.
"""

from __future__ import annotations

from ccad.data.io import IMAGE_EXTENSIONS
from ccad.scoring.heatmap import render_heatmap

from .discovery import NormalImages, ReviewItem, class_normal_images, discover_items
from .masks import mask_iou, overlay, read_image, read_mask, write_mask_png
from .proposals import ProposalSettings, _otsu, image_cues, propose_mask  # noqa: F401  (_otsu: benchmarks)
from .session import ReviewSession

__all__ = [
    "IMAGE_EXTENSIONS",
    "ReviewItem",
    "NormalImages",
    "ReviewSession",
    "ProposalSettings",
    "class_normal_images",
    "discover_items",
    "image_cues",
    "mask_iou",
    "overlay",
    "propose_mask",
    "read_image",
    "read_mask",
    "render_heatmap",
    "write_mask_png",
]

