"""What a heatmap means (issue 21 item 2): every map of a model is drawn on one scale in score
units with the threshold at mid-scale, so a good image's map (below the threshold) never shows
the red of a defect; the scale is drawn under the map with the threshold marked; a good verdict's
overlay outlines nothing; an out-of-domain image's verdict box says so first."""
from __future__ import annotations

import numpy as np

from app.batch import verdict_text
from ccad.prediction import Prediction
from ccad.scoring.heatmap import display_range, render_colorbar


def _pred(amap: np.ndarray, score: float, threshold: float = 2.0, floor: float = 0.5, **kw) -> Prediction:
    return Prediction(image=np.full((*amap.shape, 3), 0.5, np.float32), reconstruction=None, anomaly_map=amap,
                      score=score, threshold=threshold, seconds=0.0, map_floor=floor, **kw)


def _red(rgb: np.ndarray) -> np.ndarray:
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    return (r > 120) & (g < 110) & (b < 60)  # JET's upper end: orange-red to dark red


def test_a_good_image_just_below_the_threshold_shows_no_red_and_no_outline() -> None:
    amap = np.full((40, 40), 0.6, np.float32)
    amap[10:20, 10:20] = 1.98  # a hot spot just under the threshold 2.0 (a top-k score stays below it)
    p = _pred(amap, score=1.9)
    assert p.status == "good"
    assert not _red(p.heatmap()).any()
    assert (p.overlay() == p.overlay(alpha=0.5)).all() and not (p.overlay() == 255).all(axis=2).any()
    defect = _pred(np.where(amap > 1.0, 3.5, 0.6).astype(np.float32), score=3.5)
    assert defect.status == "anomalous" and _red(defect.heatmap())[10:20, 10:20].all()
    assert (defect.overlay() == 255).all(axis=2).any()  # the defect is outlined in white


def test_one_scale_per_model_the_same_value_gets_the_same_colour_in_every_image() -> None:
    rng = np.random.default_rng(0)
    a = rng.uniform(0.5, 1.5, (30, 30)).astype(np.float32)
    b = a * 0.7 + 0.2  # another image: another range
    b[0, 0] = a[0, 0]
    pa, pb = _pred(a, 1.0), _pred(b, 1.0)
    assert pa.display_range() == pb.display_range() == display_range(0.5, 2.0) == (0.5, 3.5)
    np.testing.assert_array_equal(pa.heatmap()[0, 0], pb.heatmap()[0, 0])


def test_the_colour_scale_is_drawn_under_the_map_with_the_threshold_marked() -> None:
    p = _pred(np.full((64, 96), 1.0, np.float32), 1.0)
    with_bar = p.heatmap(colorbar=True)
    assert with_bar.shape[1] == 96 and with_bar.shape[0] > 64
    np.testing.assert_array_equal(with_bar[:64], p.heatmap())
    bar = render_colorbar(200, 0.5, 3.5, 2.0)
    col = int(round((2.0 - 0.5) / 3.0 * 199))
    assert (bar[0, col] == 255).all()  # the white threshold tick at its place on the scale
    assert not (render_colorbar(200, 0.5, 3.5, None)[0, col] == 255).all()
    assert p.overlay(colorbar=True).shape == with_bar.shape


def test_an_out_of_domain_verdict_box_says_so_first() -> None:
    amap = np.full((8, 8), 3.0, np.float32)
    ood = _pred(amap, 3.0, domain_distance=9.0, domain_limit=1.0)
    assert ood.status == "anomalous" and ood.out_of_domain
    assert verdict_text(ood).startswith("OUT OF DOMAIN (score 3;") and "ANOMALOUS" in verdict_text(ood)
    assert verdict_text(_pred(amap, 3.0, domain_distance=0.5, domain_limit=1.0)) == "ANOMALOUS"


def test_the_out_of_domain_limit_is_tighter_when_enough_good_images_back_it() -> None:
    from ccad.scoring.domain import DomainStats

    few, many = DomainStats.fit([1.0, 2.0, 4.0]), DomainStats.fit(np.linspace(1.0, 4.0, 12))
    assert few.limit == 6.0 and few.factor == 1.5  # 3 images: their maximum says little
    assert many.limit == 5.0 and many.factor == 1.25  # measured on MTD: other good images <= 1.08x the max
    assert DomainStats.fit([2.0], factor=2.0).limit == 4.0


def test_scale_end_labels_read_zero_near_zero_and_keep_real_values() -> None:
    from ccad.scoring.heatmap import _label

    assert _label(-0.00369, 5.5) == "0"  # the screenshot's "-0.00369" on a 0..5.5 scale
    assert _label(5.5, 5.5) == "5.5"
    assert _label(0.4, 5.5) == "0.4"  # 7 % of the span is a real value
    assert _label(-0.00369) == "-0.00369"  # no span given: printed as is
