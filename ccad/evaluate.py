"""Run a detector over a labelled dataset and report the metrics everyone reports.

Per category (and the mean over categories): image AUROC / AP / F1-max, pixel AUROC / AP /
F1-max and pixel AUPRO (FPR <= 0.3), with ROC and PR curves for plots and per-image records
(for browsing the worst false negatives and false positives).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .methods.base import ABLATION_VIEW
from .metrics import METRIC_KEYS  # the one list (ccad.metrics.pixel); re-exported here for the app and benchmarks


@dataclass
class EvalReport:
    per_category: dict[str, dict[str, float]]
    records: list[dict[str, Any]]
    curves: dict[str, Any] = field(default_factory=dict)
    errors: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0  # scoring time only (reading, inference, maps), the same for every view
    metrics_seconds: float = 0.0  # computing this report's metrics and curves, separately

    @property
    def mean(self) -> dict[str, float]:
        return self.per_category.get("mean", {})

    def table(self) -> str:
        """A fixed-width text table, one row per category and the mean."""
        head = f"{'category':<16}" + "".join(f"{k:>13}" for k in METRIC_KEYS)
        lines = [head, "-" * len(head)]
        for cat, row in self.per_category.items():
            lines.append(f"{cat:<16}" + "".join(f"{_fmt(row.get(k)):>13}" for k in METRIC_KEYS))
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        clean = lambda v: None if isinstance(v, float) and math.isnan(v) else v  # noqa: E731
        return {"per_category": {c: {k: clean(v) for k, v in r.items()} for c, r in self.per_category.items()},
                "records": self.records, "errors": [list(e) for e in self.errors], "seconds": self.seconds,
                "metrics_seconds": self.metrics_seconds}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1, default=float))

    def worst(self, kind: str, n: int = 8) -> list[dict[str, Any]]:
        """The ``n`` worst false negatives (``"fn"``: anomalous, lowest scores) or false positives
        (``"fp"``: good, highest scores) at the detector's threshold."""
        if kind == "fn":
            rows = [r for r in self.records if r["label"] == 1 and not r["is_anomalous"]]
            return sorted(rows, key=lambda r: r["score"])[:n]
        if kind == "fp":
            rows = [r for r in self.records if r["label"] == 0 and r["is_anomalous"]]
            return sorted(rows, key=lambda r: -r["score"])[:n]
        raise ValueError(f"kind must be 'fn' or 'fp', got {kind!r}")


def _fmt(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


@dataclass
class ScoredSet:
    """What scoring a dataset yields before any metric: per-image scores, ``N x S x S`` maps,
    labels, masks (bool) and ``path`` / ``category`` / ``defect_type`` records, plus skipped files.
    :func:`evaluate` is :func:`score_samples` then :func:`report_from_scored`; sharded runs
    (:mod:`ccad.distributed`) score slices in several processes and concatenate them first."""

    scores: np.ndarray
    maps: np.ndarray
    labels: np.ndarray
    masks: np.ndarray
    metas: list[dict[str, Any]]
    errors: list[tuple[str, str]]

    @classmethod
    def concatenate(cls, parts: Sequence["ScoredSet"], image_size: int) -> "ScoredSet":
        """The parts one after another (in the order given)."""
        errors = [e for p in parts for e in p.errors]
        parts = [p for p in parts if len(p.scores)]  # (an empty part's maps may have another shape)
        if not parts:
            out = cls.empty(image_size)
            out.errors = errors
            return out
        if any(isinstance(p.maps, list) for p in parts):  # images at their own sizes (keep-aspect / tile)
            return cls(np.concatenate([p.scores for p in parts]), [m for p in parts for m in p.maps],
                       np.concatenate([p.labels for p in parts]).astype(int), [m for p in parts for m in p.masks],
                       [m for p in parts for m in p.metas], errors)
        return cls(np.concatenate([p.scores for p in parts]), np.concatenate([p.maps for p in parts]),
                   np.concatenate([p.labels for p in parts]).astype(int), np.concatenate([p.masks for p in parts]),
                   [m for p in parts for m in p.metas], errors)

    @classmethod
    def empty(cls, image_size: int) -> "ScoredSet":
        s = int(image_size)
        return cls(np.zeros(0, np.float32), np.zeros((0, s, s), np.float32), np.zeros(0, int),
                   np.zeros((0, s, s), bool), [], [])


def score_samples(detector: Any, samples: Sequence[Any], batch_size: int = 8,
                  progress: Optional[Callable[[int, int], None]] = None) -> ScoredSet:
    """Score every readable sample (maps at the detector's ``input_size``); unreadable files are
    skipped and listed in ``errors``. An empty or all-unreadable ``samples`` gives an empty set."""
    return score_views(detector, samples, batch_size, progress, views=(None,))[None]


def score_views(detector: Any, samples: Sequence[Any], batch_size: int = 8,
                progress: Optional[Callable[[int, int], None]] = None,
                views: Sequence[Optional[str]] = (None,)) -> dict[Optional[str], ScoredSet]:
    """:func:`score_samples` for several views of one detector from one forward pass per batch.

    A fused detector (``scoring.fusion = "bank"``) has the views ``fused`` (what it predicts),
    ``method`` (the method's own map, unfused) and ``bank`` (the nearest-neighbour map alone);
    ``None`` is the detector's default view. ``ablation`` (when the method declares one,
    :attr:`ccad.methods.base.Method.ablation`) is the method's own map with its learned part
    replaced by the trivial one: the same weights and the same pass over the data, one more
    method inference per batch (without its learned part)."""
    from .data.dataset import iter_batches

    if getattr(getattr(detector, "config", None), "resize", "square") != "square":
        return _score_views_framed(detector, samples, batch_size, progress, views)
    size = int(getattr(detector, "input_size", detector.image_size))
    errors: list[tuple[str, str]] = []
    scores: dict[Optional[str], list] = {v: [] for v in views}
    maps: dict[Optional[str], list] = {v: [] for v in views}
    labels, masks, metas = [], [], []
    done = 0
    samples = list(samples)
    for batch in iter_batches(samples, size, batch_size, on_error="skip", errors=errors):
        if hasattr(detector, "map_parts"):
            plain = [v for v in views if v != ABLATION_VIEW]
            abl = None
            if plain and ABLATION_VIEW in views:  # one method call for both (shared work, e.g. features)
                m, bank, _, abl = detector.map_parts_and_ablation(batch["image"])
            elif plain:
                m, bank, _ = detector.map_parts(batch["image"])
            else:
                abl = detector.ablation_maps(batch["image"])
            for v in views:
                mv = abl if v == ABLATION_VIEW else detector.combine(m, bank, v)
                scores[v].append(detector._score(mv).cpu().numpy())
                maps[v].append(mv[:, 0].cpu().numpy().astype(np.float32))
        else:  # any object with score_batches (e.g. a wrapper in a benchmark)
            s, mm = detector.score_batches([batch])
            for v in views:
                scores[v].append(s)
                maps[v].append(mm)
        labels.append(np.asarray(batch["label"]).reshape(-1))
        masks.append(batch["mask"][:, 0].numpy() > 0.5)
        metas.extend({"path": p, "category": c, "defect_type": d}
                     for p, c, d in zip(batch["path"], batch["category"], batch["defect_type"]))
        done += len(labels[-1])
        if progress is not None:
            progress(done, len(samples))
    return _scored_sets(views, scores, maps, labels, masks, metas, errors, size, framed=False)


def _scored_sets(views: Sequence[Optional[str]], scores: dict, maps: dict, labels: list, masks: list,
                 metas: list, errors: list, size: int, framed: bool) -> dict[Optional[str], ScoredSet]:
    """One :class:`ScoredSet` per view from the per-batch lists (``framed``: maps and masks stay
    lists of arrays of each image's own size, one score per image)."""
    out: dict[Optional[str], ScoredSet] = {}
    for v in views:
        if not scores[v]:
            out[v] = ScoredSet.empty(size)
            out[v].errors = list(errors)
            continue
        if framed:
            out[v] = ScoredSet(np.asarray(scores[v], np.float32), list(maps[v]), np.concatenate(labels).astype(int),
                               list(masks), list(metas), list(errors))
        else:
            out[v] = ScoredSet(np.concatenate(scores[v]), np.concatenate(maps[v]),
                               np.concatenate(labels).astype(int), np.concatenate(masks), list(metas), list(errors))
    return out


def _score_views_framed(detector: Any, samples: Sequence[Any], batch_size: int,
                        progress: Optional[Callable[[int, int], None]],
                        views: Sequence[Optional[str]]) -> dict[Optional[str], ScoredSet]:
    """:func:`score_views` for a detector built with ``resize`` = ``keep-aspect`` or ``tile``
    (:mod:`ccad.data.framing`): every image is scored as ``predict`` scores it, and its map is
    compared with its mask at the image's own size (maps and masks are lists of ``H x W`` arrays,
    images of different sizes side by side), never at a square the image was not scored at."""
    from .data.dataset import iter_native

    errors: list[tuple[str, str]] = []
    scores: dict[Optional[str], list] = {v: [] for v in views}
    maps: dict[Optional[str], list] = {v: [] for v in views}
    labels, masks, metas = [], [], []
    plain = [v for v in views if v != ABLATION_VIEW]
    samples = list(samples)
    done = 0

    def fn(x: Any) -> dict[str, Any]:
        abl = None
        m = bank = None
        if plain and ABLATION_VIEW in views:
            m, bank, _, abl = detector.map_parts_and_ablation(x)
        elif plain:
            m, bank, _ = detector.map_parts(x)
        else:
            abl = detector.ablation_maps(x)
        return {str(v): (abl if v == ABLATION_VIEW else detector.combine(m, bank, v)) for v in views}

    for batch in iter_native(samples, batch_size, on_error="skip", errors=errors):
        layouts, per, _ = detector.framed_parts(batch["image"], fn, chunk=max(8, batch_size))
        for lay, got in zip(layouts, per):
            for v in views:
                sc, m = detector.framed_map(got[str(v)], lay)
                scores[v].append(sc)
                maps[v].append(m[0].numpy().astype(np.float32))
        labels.append(batch["label"])
        masks.extend(batch["mask"])
        metas.extend({"path": p, "category": c, "defect_type": d}
                     for p, c, d in zip(batch["path"], batch["category"], batch["defect_type"]))
        done += len(batch["image"])
        if progress is not None:
            progress(done, len(samples))
    size = int(getattr(detector, "input_size", detector.image_size))
    return _scored_sets(views, scores, maps, labels, masks, metas, errors, size, framed=True)


def _clock() -> float:
    """The clock the reports' ``seconds`` and ``metrics_seconds`` are read from (tests replace it)."""
    return time.perf_counter()


def report_from_scored(detector: Any, scored: ScoredSet, seconds: float = 0.0) -> EvalReport:
    """The metrics per category and their mean, records, curves, from a scored set; ``seconds`` is
    the scoring time, ``metrics_seconds`` what this call took."""
    t0 = _clock()
    report = _report_from_scored(detector, scored)
    report.seconds, report.metrics_seconds = seconds, _clock() - t0
    return report


def _report_from_scored(detector: Any, scored: ScoredSet) -> EvalReport:
    from .metrics import metrics_by_category, pr_points, roc_points

    errors = list(scored.errors)
    if not len(scored.scores):
        raise ValueError("no readable image in the evaluation set" + (f" (first error: {errors[0]})" if errors else ""))
    scores_a, maps_a, metas = scored.scores, scored.maps, scored.metas
    labels_a, masks_a = np.asarray(scored.labels).astype(int), scored.masks
    thr = detector.threshold
    from .scoring.verdict import status_of

    records = [{**meta, "label": int(y), "score": float(s), "status": status_of(s, thr),
                "is_anomalous": status_of(s, thr) == "anomalous"}
               for meta, y, s in zip(metas, labels_a, scores_a)]
    cats = [m["category"] or "all" for m in metas]
    has_masks = (any(bool(np.any(m)) for m in masks_a) if isinstance(masks_a, list)  # images at their own sizes
                 else bool(masks_a.any()))
    per = metrics_by_category(cats, labels_a, scores_a, masks_a if has_masks else None,
                              maps_a if has_masks else None)
    curves = {}
    if len(set(labels_a.tolist())) == 2:
        curves = {"roc": roc_points(labels_a, scores_a), "pr": pr_points(labels_a, scores_a)}
    return EvalReport(per, records, curves, errors)


def evaluate(detector: Any, samples: Sequence[Any], batch_size: int = 8,
             progress: Optional[Callable[[int, int], None]] = None) -> EvalReport:
    """Score every sample, then compute the metrics per category and their mean.

    Maps are compared with the masks at the detector's resolution (``input_size`` squared: the
    model's ``image_size``, or the fusion memory's when larger), as the papers do; a model built
    with ``resize`` = ``keep-aspect`` or ``tile`` is compared at each image's own size (the map
    ``predict`` returns against the full-size mask). Unreadable files are skipped and listed in
    ``report.errors``.
    """
    t0 = _clock()
    scored = score_samples(detector, samples, batch_size, progress)
    return report_from_scored(detector, scored, seconds=_clock() - t0)


def calibrate_labelled(detector: Any, data: Any, policy: str = "f1", batch_size: int = 8,
                       progress: Optional[Callable[[int, int], None]] = None) -> dict[str, Any]:
    """Set ``detector``'s threshold from labelled images (issue 21.1): ``data`` is a dataset path
    (any layout :func:`ccad.data.detect.load_dataset` reads, its test split: good and defective
    images with labels) or a list of samples; ``policy`` is ``f1``, ``recall=R`` or ``fpr=F``
    (:mod:`ccad.scoring.operating_point`). The threshold, the policy, the rates at it and where
    the images came from are recorded in the calibration (``method = "labelled"``, ``source``;
    the model card's ``operating_point``); the good-only statistics stay (the held-out false-alarm
    rate and the synthetic miss estimate are reported at the new threshold too). Returns the
    chosen point (threshold, recall, false-alarm rate, precision, F1, counts). Nothing is saved:
    call ``detector.save_pretrained`` (or ``ccad calibrate MODEL --labelled DATA --policy ...``)."""
    from .scoring.operating_point import parse_policy

    parse_policy(policy)  # a bad policy is refused before any image is scored
    where = str(data) if isinstance(data, (str, Path)) else "the given samples"
    if isinstance(data, (str, Path)):
        from .data.detect import load_dataset

        samples = list(load_dataset(data, split="test"))
    else:
        samples = list(data)
    scored = score_samples(detector, [s for s in samples if int(getattr(s, "label", -1)) in (0, 1)], batch_size,
                           progress)
    return set_operating_point(detector, scored.labels, scored.scores, policy, where, len(scored.errors))


def set_operating_point(detector: Any, labels: Any, scores: Any, policy: str, data: str,
                        unreadable: int = 0) -> dict[str, Any]:
    """:func:`calibrate_labelled` from scores already computed (e.g. an evaluation's records):
    the threshold ``policy`` picks on them becomes ``detector``'s, with its source recorded."""
    from .scoring.operating_point import choose_threshold
    from .scoring.threshold import Calibration

    try:
        point = choose_threshold(labels, scores, policy)
    except ValueError as exc:
        raise ValueError(f"{data}: {exc}") from None
    # rates rounded for reading; the threshold exact (rounding it could flip a verdict)
    point = {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) and k != "threshold" else v)
             for k, v in point.items()}
    point.update({"data": data, "unreadable": int(unreadable)})
    cal = detector.calibration
    if cal is None:
        cal = Calibration(threshold=float(point["threshold"]))
    cal.threshold = float(point["threshold"])
    cal.method = "labelled"
    cal.source = {"kind": "labelled images", **point}
    detector.calibration = cal
    return point


def evaluate_views(detector: Any, samples: Sequence[Any], batch_size: int = 8,
                   progress: Optional[Callable[[int, int], None]] = None,
                   views: Optional[Sequence[Optional[str]]] = None) -> dict[Optional[str], EvalReport]:
    """:func:`evaluate` for several views of one detector (:func:`score_views`): a fused row, the
    same method's unfused row, the bank's row and the method's ablation row (its learned part
    replaced by the trivial one) from the same trained weights and the same pass over the data.
    ``views`` None = every view the detector has (``detector.views``). The records' verdicts use
    the detector's threshold, which belongs to its default view."""
    if views is None:
        views = tuple(detector.views)
    t0 = _clock()
    scored = score_views(detector, samples, batch_size, progress, views)
    seconds = _clock() - t0
    return {v: report_from_scored(detector, sc, seconds=seconds) for v, sc in scored.items()}


def evaluate_sharded(detector: Any, samples: Sequence[Any], shard: Any, batch_size: int = 8,
                     progress: Any = None, folder: Optional[str] = None) -> Any:
    """:func:`evaluate` with the samples split across the processes.

    Each rank scores its slice (:func:`score_samples`) and writes its scores, maps,
    labels and masks to ``rank<k>.npz`` (records and skipped files to ``rank<k>.json``) in
    :func:`ccad.distributed.shard_folder`; after every rank is done, the main process reads them in rank order and
    computes the metrics once (:func:`report_from_scored`). Returns the
    :class:`~ccad.evaluate.EvalReport` on the main process and None on the others. Running
    alone it is plain :func:`~ccad.evaluate.evaluate`.
    """
    import shutil

    from .distributed import shard_folder

    if not shard.distributed:
        return evaluate(detector, samples, batch_size=batch_size, progress=progress)
    t0 = _clock()
    made = not folder
    where = Path(shard_folder(shard, folder))
    scored = score_samples(detector, shard.split(list(samples), batch_size), batch_size, progress)
    where.mkdir(parents=True, exist_ok=True)
    stem = where / f"rank{shard.rank}"
    if isinstance(scored.maps, list):  # images at their own sizes: flattened, with their shapes
        shapes = np.asarray([m.shape for m in scored.maps], np.int64).reshape(-1, 2)
        flat = lambda xs, dt: np.concatenate([np.asarray(x, dt).ravel() for x in xs]) if xs else np.zeros(0, dt)  # noqa: E731
        np.savez(f"{stem}.npz", scores=scored.scores, maps_flat=flat(scored.maps, np.float32), shapes=shapes,
                 labels=scored.labels, masks_flat=flat(scored.masks, bool))
    else:
        np.savez(f"{stem}.npz", scores=scored.scores, maps=scored.maps, labels=scored.labels, masks=scored.masks)
    Path(f"{stem}.json").write_text(json.dumps({"metas": scored.metas, "errors": [list(e) for e in scored.errors]}))
    shard.wait()
    if not shard.is_main:
        return None
    parts = []
    try:
        for k in range(shard.world):
            npz, meta = where / f"rank{k}.npz", where / f"rank{k}.json"
            if not npz.is_file() or not meta.is_file():
                raise FileNotFoundError(f"{npz}: process {k}'s results are missing (processes on several machines "
                                        f"need --shard-dir on a file system they all share)")
            with np.load(npz) as z:
                side = json.loads(meta.read_text())
                if "shapes" in z:  # keep-aspect / tile: per-image maps and masks at their own sizes
                    cuts = np.cumsum([0] + [int(h) * int(w) for h, w in z["shapes"]])
                    mp = [z["maps_flat"][a:b].reshape(hw) for a, b, hw in zip(cuts[:-1], cuts[1:], z["shapes"])]
                    mk = [z["masks_flat"][a:b].reshape(hw) for a, b, hw in zip(cuts[:-1], cuts[1:], z["shapes"])]
                    parts.append(ScoredSet(z["scores"], mp, z["labels"], mk, side["metas"],
                                           [tuple(e) for e in side["errors"]]))
                else:
                    parts.append(ScoredSet(z["scores"], z["maps"], z["labels"], z["masks"], side["metas"],
                                           [tuple(e) for e in side["errors"]]))
    finally:
        if made:
            shutil.rmtree(where, ignore_errors=True)
        else:
            for k in range(shard.world):
                for ext in (".npz", ".json"):
                    (where / f"rank{k}{ext}").unlink(missing_ok=True)
    size = int(getattr(detector, "input_size", detector.image_size))
    merged = ScoredSet.concatenate(parts, size)
    return report_from_scored(detector, merged, seconds=_clock() - t0)  # scoring + gathering the shards
