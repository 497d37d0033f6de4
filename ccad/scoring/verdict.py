"""The verdict of one image score: the project's one rule (every summary, table and file uses it).

A NaN / inf score or an error is never "good"; without a finite threshold the verdict is
"uncalibrated"; otherwise "anomalous" above the threshold and "good" at or below it.
"""
from __future__ import annotations

import math
from typing import Optional

STATUSES = ("good", "anomalous", "uncalibrated", "error")


def status_of(score: float, threshold: float, error: Optional[str] = None) -> str:
    """The verdict of one image score (:attr:`Prediction.status`): ``"error"`` for an error or a
    NaN / inf score, ``"uncalibrated"`` without a finite threshold, else ``"anomalous"`` above the
    threshold and ``"good"`` at or below it."""
    if error is not None or not math.isfinite(float(score)):
        return "error"
    if not math.isfinite(float(threshold)):
        return "uncalibrated"
    return "anomalous" if float(score) > float(threshold) else "good"
