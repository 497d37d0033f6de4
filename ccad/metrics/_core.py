"""Shared machinery of ``ccad.metrics``: input validation and the one-pass curve sweep.

Every metric in this package (AUROC, AP, F1-max, AUPRO; CCAD paper Sec. 4.3, PRO of
Bergmann et al. as used in the D3AD paper Sec. 4) is a functional of the same object: the
sequence of operating points obtained by lowering a threshold ``t`` over the *distinct*
score values, predicting "anomalous" for ``score >= t``. For each distinct threshold
``t_k`` (descending) we need

* ``TP_k`` - positives with ``score >= t_k``,
* ``FP_k`` - negatives with ``score >= t_k``,
* ``PRO_k`` - (pixel level only) mean over ground-truth regions ``R`` of
  ``|{p in R: score_p >= t_k}| / |R|``, written as a weighted count with weight
  ``1 / (|R| K)`` for every pixel of region ``R`` (``K`` regions in total).

:class:`CurveSweep` consumes the scores sorted in descending order in chunks, keeps the
running totals as carries, and accumulates every metric on the fly, so a curve with tens of
millions of points is never materialised (bounded memory). Ties are grouped exactly: a
point is emitted only at the last element of a run of equal scores, which is what
``sklearn.metrics.roc_curve`` / ``precision_recall_curve`` do.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import numpy as np

__all__ = ["MetricWarning", "CurveSweep", "as_numpy", "undefined"]


class MetricWarning(UserWarning):
    """Emitted when a metric is undefined for the given data and NaN is returned."""


def undefined(name: str, reason: str, stacklevel: int = 3) -> float:
    """Warn that metric ``name`` is undefined because of ``reason`` and return NaN."""
    warnings.warn(f"{name} is undefined (NaN): {reason}", MetricWarning, stacklevel=stacklevel)
    return math.nan


def as_numpy(x: Any, field: str) -> np.ndarray:
    """Convert a numpy array, torch tensor, list or scalar sequence to a numpy array.

    Raises ``TypeError`` naming ``field`` when the value cannot be converted.
    """
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor without importing torch
        return x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except Exception as exc:  # pragma: no cover - exotic inputs
        raise TypeError(f"{field}: cannot convert {type(x).__name__} to an array ({exc})") from exc


def check_no_nan(values: np.ndarray, field: str) -> None:
    """Raise ``ValueError`` naming ``field`` and the first offending index if NaN is present."""
    if values.dtype.kind in "fc":
        nan = np.isnan(values)
        if nan.any():
            first = np.unravel_index(int(np.argmax(nan)), values.shape)
            where = first[0] if len(first) == 1 else tuple(int(i) for i in first)
            raise ValueError(
                f"{field} contains {int(nan.sum())} NaN value(s) (first at index {where}); "
                "scores must be numbers"
            )


# --------------------------------------------------------------------------------------
# order-preserving float -> unsigned integer keys (used to pack score and region id into
# one uint64 so that a single np.sort, not an argsort, orders the pixels)
# --------------------------------------------------------------------------------------

_SIGN32 = np.uint32(0x80000000)


def float32_to_key(values: np.ndarray) -> np.ndarray:
    """Map float32 values to uint32 keys with the same order (``a < b`` iff ``key a < key b``).

    ``-0.0`` is normalised to ``+0.0`` first so that equal floats get equal keys.
    Values must be NaN-free (checked by the caller).
    """
    v = np.asarray(values, dtype=np.float32) + np.float32(0.0)  # copy, and -0.0 -> +0.0
    u = v.view(np.uint32)
    neg = (u & _SIGN32) != 0
    np.invert(u, out=u, where=neg)
    np.bitwise_or(u, _SIGN32, out=u, where=~neg)
    return u


def key_to_float32(key: int) -> float:
    """Inverse of :func:`float32_to_key` for one key."""
    k = int(key) & 0xFFFFFFFF
    raw = (k ^ 0x80000000) if (k & 0x80000000) else (~k & 0xFFFFFFFF)
    return float(np.array([raw], dtype=np.uint32).view(np.float32)[0])


# --------------------------------------------------------------------------------------
# the sweep
# --------------------------------------------------------------------------------------


class CurveSweep:
    """Accumulate AUROC, AP, F1-max and (optionally) AUPRO over descending sorted scores.

    Feed chunks with :meth:`feed`; chunks must be consecutive pieces of the whole score
    sequence sorted in *descending* order. Equations (``P`` positives, ``N`` negatives,
    points ``k = 0..M`` with ``(TP_0, FP_0, PRO_0) = (0, 0, 0)`` the threshold above the
    maximum score):

    * AUROC = sum_k (FP_k - FP_{k-1}) (TP_k + TP_{k-1}) / (2 P N)  (trapezoid rule; computed
      in exact int64 arithmetic),
    * AP = sum_k (TP_k - TP_{k-1}) / P * TP_k / (TP_k + FP_k)  (step-wise, as in
      ``sklearn.metrics.average_precision_score``),
    * F1-max = max_k 2 TP_k / (TP_k + FP_k + P), the threshold is ``t_k`` of the maximum
      (the lowest such threshold on ties),
    * AUPRO = (1 / L) * integral_0^L PRO d(FPR) with FPR_k = FP_k / N, trapezoid rule and
      linear interpolation of PRO at FPR = L (L = ``fpr_limit``).

    ``pixel`` only changes the wording of the NaN warnings. ``region_weight`` (pixel level) maps a
    region id to the weight ``1 / (|R| K)`` of each of its pixels; id 0 is the normal class
    (weight 0). Any id > 0 counts as a positive.
    """

    def __init__(
        self,
        n_pos: int,
        n_neg: int,
        region_weight: np.ndarray | None = None,
        fpr_limit: float = 0.3,
        decode: Callable[[Any], float] = float,
        record: bool = False,
        pixel: bool = False,
    ) -> None:
        self.pixel = pixel
        self.P = int(n_pos)
        self.N = int(n_neg)
        self.weight = region_weight
        self.fpr_limit = float(fpr_limit)
        self.decode = decode
        self.record = record
        # running totals (carry between chunks)
        self.tp = 0
        self.fp = 0
        self.pro = 0.0
        # previous emitted point
        self.ptp = 0
        self.pfp = 0
        self.ppro = 0.0
        # accumulators
        self.auc2 = 0  # exact integer: 2 * P * N * AUROC
        self.ap_sum = 0.0  # P * AP
        self.best_f1 = -1.0
        self.best_thr: float = math.nan
        self.aupro_sum = 0.0
        self.aupro_done = False
        self._points: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def feed(self, vals: np.ndarray, regions: np.ndarray, next_val: Any = None) -> None:
        """Consume one chunk of scores (descending) and their region ids.

        ``vals`` holds tie-comparable score values (floats or order-preserving integer keys).
        ``next_val`` is the first value of the following chunk (``None`` for the last chunk);
        it decides whether the chunk's last element closes a run of equal scores.
        """
        n = vals.shape[0]
        if n == 0:
            return
        pos = regions > 0
        tp = np.cumsum(pos, dtype=np.int64)
        tp += self.tp
        fp = np.arange(1, n + 1, dtype=np.int64)
        fp -= tp - self.tp
        fp += self.fp
        pro = None
        if self.weight is not None:
            pro = np.cumsum(self.weight[regions])
            pro += self.pro
        end = np.empty(n, dtype=bool)
        np.not_equal(vals[:-1], vals[1:], out=end[:-1])
        end[-1] = True if next_val is None else bool(vals[-1] != next_val)
        idx = np.flatnonzero(end)
        self.tp, self.fp = int(tp[-1]), int(fp[-1])
        if pro is not None:
            self.pro = float(pro[-1])
        if idx.size == 0:
            return
        tpb, fpb = tp[idx], fp[idx]
        tpp = np.empty_like(tpb)
        tpp[0] = self.ptp
        tpp[1:] = tpb[:-1]
        fpp = np.empty_like(fpb)
        fpp[0] = self.pfp
        fpp[1:] = fpb[:-1]

        # AUROC (exact integer trapezoid)
        self.auc2 += int(np.dot(fpb - fpp, tpb + tpp))
        # AP
        self.ap_sum += float(np.dot((tpb - tpp).astype(np.float64), tpb / (tpb + fpb)))
        # F1-max: lowest threshold among ties of the maximum
        if self.P > 0:
            f1 = (2.0 * tpb) / (tpb + fpb + self.P)
            k = f1.size - 1 - int(np.argmax(f1[::-1]))
            if f1[k] >= self.best_f1:
                self.best_f1 = float(f1[k])
                self.best_thr = self.decode(vals[idx[k]])
        # AUPRO
        if pro is not None:
            prob = pro[idx]
            if not self.aupro_done and self.N > 0:
                self._aupro_chunk(fpb, fpp, prob)
            self.ppro = float(prob[-1])
        if self.record:
            self._points.append((tpb, fpb, np.asarray(vals[idx])))
        self.ptp, self.pfp = int(tpb[-1]), int(fpb[-1])

    def _aupro_chunk(self, fpb: np.ndarray, fpp: np.ndarray, prob: np.ndarray) -> None:
        lim = self.fpr_limit
        fpr = fpb / self.N
        fpr_prev = fpp / self.N
        pro_prev = np.empty_like(prob)
        pro_prev[0] = self.ppro
        pro_prev[1:] = prob[:-1]
        over = np.flatnonzero(fpr > lim)
        j = int(over[0]) if over.size else fpr.size
        self.aupro_sum += 0.5 * float(
            np.dot(fpr[:j] - fpr_prev[:j], prob[:j] + pro_prev[:j])
        )
        if over.size:
            f0, p0, f1, p1 = fpr_prev[j], pro_prev[j], fpr[j], prob[j]
            p_lim = p0 + (lim - f0) * (p1 - p0) / (f1 - f0)
            self.aupro_sum += 0.5 * (lim - f0) * (p0 + p_lim)
            self.aupro_done = True

    # results ---------------------------------------------------------------------------
    def auroc(self, name: str = "auroc") -> float:
        if self.P == 0 or self.N == 0:
            return undefined(name, _one_class_reason(self.P, self.N, self.pixel), stacklevel=4)
        return float(self.auc2 / (2.0 * self.P * self.N))

    def ap(self, name: str = "ap") -> float:
        if self.P == 0 or self.N == 0:
            return undefined(name, _one_class_reason(self.P, self.N, self.pixel), stacklevel=4)
        return float(self.ap_sum) / self.P

    def f1max(self, name: str = "f1max") -> tuple[float, float]:
        if self.P == 0 or self.N == 0:
            return undefined(name, _one_class_reason(self.P, self.N, self.pixel), stacklevel=4), math.nan
        return self.best_f1, self.best_thr

    def aupro(self, n_regions: int, name: str = "pixel_aupro") -> float:
        if n_regions == 0 or self.N == 0:
            return undefined(name, _one_class_reason(n_regions, self.N, pixel=True), stacklevel=4)
        return float(self.aupro_sum) / self.fpr_limit

    def points(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Recorded (TP_k, FP_k, t_k) for k = 1..M (descending thresholds)."""
        if not self._points:
            e = np.zeros(0, dtype=np.int64)
            return e, e, np.zeros(0, dtype=np.float64)
        tp = np.concatenate([p[0] for p in self._points])
        fp = np.concatenate([p[1] for p in self._points])
        thr = np.concatenate([np.asarray(p[2], dtype=np.float64) for p in self._points])
        return tp, fp, thr


def _one_class_reason(n_pos: int, n_neg: int, pixel: bool = False) -> str:
    what = "pixels" if pixel else "samples"
    if n_pos == 0 and n_neg == 0:
        return f"no {what} with a known label"
    if n_pos == 0:
        return (
            "no anomalous pixels or regions (masks are all zero)"
            if pixel
            else "only normal samples (label 0), no anomalous ones"
        )
    return (
        "no normal pixels (masks are all one)"
        if pixel
        else "only anomalous samples (label 1), no normal ones"
    )


def check_fpr_limit(fpr_limit: float) -> float:
    """Validate the AUPRO integration limit (0 < fpr_limit <= 1)."""
    lim = float(fpr_limit)
    if not (0.0 < lim <= 1.0):
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit!r}")
    return lim
