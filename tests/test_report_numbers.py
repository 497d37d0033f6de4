"""Numbers that mean one thing (issue 24 item 4): a report's ``seconds`` is the scoring time and
``metrics_seconds`` the metric computation, for ``evaluate`` and ``evaluate --views`` alike; the
progress bar's first update shows no made-up rate."""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import ccad.evaluate as ev


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _scored() -> ev.ScoredSet:
    rng = np.random.default_rng(0)
    return ev.ScoredSet(rng.random(4), rng.random((4, 8, 8)).astype(np.float32), np.array([0, 0, 1, 1]),
                        np.zeros((4, 8, 8), bool), [{"category": "c", "path": f"{i}.png"} for i in range(4)], [])


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    c = FakeClock()
    monkeypatch.setattr(ev, "_clock", c)
    real = ev._report_from_scored

    def metrics(detector: Any, scored: Any) -> Any:
        c.now += 3.0  # the metrics take 3 "seconds"
        return real(detector, scored)

    def score(*a: Any, **k: Any) -> Any:
        c.now += 10.0  # scoring takes 10
        return _scored()

    def score_views(detector: Any, samples: Any, batch_size: int, progress: Any, views: Any) -> Any:
        c.now += 10.0
        return {v: _scored() for v in views}

    monkeypatch.setattr(ev, "_report_from_scored", metrics)
    monkeypatch.setattr(ev, "score_samples", score)
    monkeypatch.setattr(ev, "score_views", score_views)
    return c


class Det:
    threshold = 0.5


def test_seconds_is_scoring_time_and_metrics_time_is_apart_for_evaluate_and_views(clock: FakeClock) -> None:
    rep = ev.evaluate(Det(), [])
    assert (rep.seconds, rep.metrics_seconds) == (10.0, 3.0)
    assert rep.to_json()["seconds"] == 10.0 and rep.to_json()["metrics_seconds"] == 3.0
    views = ev.evaluate_views(Det(), [], views=("fused", "method", "bank"))
    assert {v: (r.seconds, r.metrics_seconds) for v, r in views.items()} == {
        "fused": (10.0, 3.0), "method": (10.0, 3.0), "bank": (10.0, 3.0)}


def test_the_progress_bar_first_update_shows_no_rate(capsys: pytest.CaptureFixture) -> None:
    from ccad.cli import _Bar

    bar = _Bar("evaluate")
    bar(8, 100)  # the first callback arrives after the first batch of 8
    bar.close()
    first = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[0]
    assert "8/100" in first and "?img/s" in first, first
