"""The one sample record every dataset loader returns, and its counts for display (:func:`summarize`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable

__all__ = ["Sample", "LABEL_GOOD", "LABEL_ANOMALOUS", "LABEL_UNKNOWN", "summarize"]

LABEL_GOOD = 0
LABEL_ANOMALOUS = 1
LABEL_UNKNOWN = -1


@dataclass
class Sample:
    """One image of a dataset, by reference (nothing is decoded until it is read).

    Attributes:
        image_path: path of the image file.
        mask_path: path of the pixel ground-truth mask (``H x W``, > 0 is defect), or ``None``
            when the image has no mask (good images, or anomalous ones without pixel labels).
            Layouts with several masks per image (MVTec LOCO) store the union as a list in
            ``extra_masks``; :meth:`mask_paths` returns all of them.
        label: 0 good, 1 anomalous, -1 unknown.
        category: object / texture class (e.g. ``"bottle"``, ``"Class1"``); ``""`` if none.
        defect_type: ``"good"`` or the defect folder name (``"crack"``, ``"logical_anomalies"``).
        split: ``"train"``, ``"validation"`` or ``"test"``.
        extra_masks: further mask files whose union with ``mask_path`` is the ground truth.
    """

    image_path: str
    mask_path: str | None = None
    label: int = LABEL_UNKNOWN
    category: str = ""
    defect_type: str = "good"
    split: str = "test"
    extra_masks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.image_path = str(self.image_path)
        if self.mask_path is not None:
            self.mask_path = str(self.mask_path)
        self.label = int(self.label)
        if self.label not in (LABEL_GOOD, LABEL_ANOMALOUS, LABEL_UNKNOWN):
            raise ValueError(
                f"Sample '{self.image_path}': label must be 0 (good), 1 (anomalous) or -1 "
                f"(unknown), got {self.label}"
            )
        self.extra_masks = tuple(str(p) for p in self.extra_masks)

    @property
    def is_anomalous(self) -> bool:
        """True for label 1."""
        return self.label == LABEL_ANOMALOUS

    @property
    def has_mask(self) -> bool:
        """True when at least one mask file is attached."""
        return self.mask_path is not None or bool(self.extra_masks)

    def mask_paths(self) -> list[str]:
        """All mask files of this sample (their union is the ground truth)."""
        out = [self.mask_path] if self.mask_path is not None else []
        out.extend(self.extra_masks)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (``extra_masks`` as a list)."""
        d = asdict(self)
        d["extra_masks"] = list(self.extra_masks)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Sample":
        """Inverse of :meth:`to_dict` (unknown keys are ignored)."""
        keys = {"image_path", "mask_path", "label", "category", "defect_type", "split", "extra_masks"}
        kw = {k: v for k, v in d.items() if k in keys}
        if "extra_masks" in kw:
            kw["extra_masks"] = tuple(kw["extra_masks"] or ())
        return cls(**kw)


def summarize(samples: Iterable[Sample]) -> dict[str, Any]:
    """Counts for display: total, per split, per label (good/anomalous/unknown), per category and
    defect type, and how many anomalous samples have masks."""
    s = list(samples)
    def count(key: Callable[[Sample], str]) -> dict[str, int]:
        d: dict[str, int] = {}
        for x in s:
            d[key(x)] = d.get(key(x), 0) + 1
        return dict(sorted(d.items()))
    names = {LABEL_GOOD: "good", LABEL_ANOMALOUS: "anomalous", LABEL_UNKNOWN: "unknown"}
    return dict(
        n=len(s), splits=count(lambda x: x.split), labels=count(lambda x: names[x.label]),
        categories=count(lambda x: x.category), defect_types=count(lambda x: x.defect_type),
        anomalous_with_mask=sum(1 for x in s if x.label == LABEL_ANOMALOUS and x.has_mask),
    )
