import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ccad.scoring import Calibration, anomaly_map, gaussian_blur, image_score
from ccad.scoring.anomaly_map import feature_cosine_map


class PoolExtractor:
    """A deterministic stand-in for a backbone: two 'layers' of pooled colour features."""

    def layer_maps(self, x):
        return [F.avg_pool2d(torch.cat([x, x ** 2], 1), 4), F.avg_pool2d(torch.cat([x, 1 - x], 1), 8)]


def test_identical_reconstruction_gives_zero_map_and_defect_lights_up_where_it_is():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 64, 64, generator=g) * 0.5 + 0.25
    m = anomaly_map(x, x.clone(), PoolExtractor(), sigma=0)
    assert m.shape == (2, 1, 64, 64)
    assert float(m.abs().max()) < 1e-5
    x_hat = x.clone()
    x_hat[1, :, 40:56, 8:24] = torch.tensor([0.9, 0.1, 0.1]).view(3, 1, 1)  # a red square the input lacks
    m = anomaly_map(x, x_hat, PoolExtractor(), sigma=4)
    assert float(m[0].max()) < 1e-5
    peak = np.unravel_index(int(m[1, 0].argmax()), (64, 64))
    assert 36 <= peak[0] <= 60 and 4 <= peak[1] <= 28


def test_pixel_term_is_scaled_to_the_feature_map():
    x = torch.full((1, 3, 32, 32), 0.5)
    x_hat = x.clone()
    x_hat[..., 10:20, 10:20] = 0.8
    f = feature_cosine_map(x, x_hat, PoolExtractor())
    both = anomaly_map(x, x_hat, PoolExtractor(), pixel_weight=1.0, sigma=0)
    # DDAD: f + v * (max f / max p) * p, so the maximum at most doubles and the pixel term peaks at max f.
    assert float(both.max()) == pytest.approx(2 * float(f.max()), rel=1e-4)


def test_gaussian_blur_preserves_mass_and_spreads_a_peak():
    m = torch.zeros(1, 1, 41, 41)
    m[0, 0, 20, 20] = 1.0
    b = gaussian_blur(m, 2.0)
    assert float(b.sum()) == pytest.approx(1.0, rel=1e-3)
    assert float(b[0, 0, 20, 20]) < 0.1 and float(b[0, 0, 20, 22]) > 0.0
    assert torch.equal(gaussian_blur(m, 0), m)


def test_image_score_modes():
    m = torch.zeros(1, 1, 10, 10)
    m[0, 0, 0, :4] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    assert float(image_score(m, "max")) == 4.0
    assert float(image_score(m, "topk", topk_ratio=0.02)) == pytest.approx(3.5)
    with pytest.raises(ValueError, match="score mode"):
        image_score(m, "mean")


def test_calibration_by_fpr_and_sigma_and_false_alarm_count():
    rng = np.random.default_rng(0)
    good = rng.normal(1.0, 0.1, 500)
    cal = Calibration.fit(good, "fpr", fpr=0.02)
    assert cal.false_alarm_rate() <= 0.02
    assert cal.false_alarms(cal.threshold - 1.0) == 500
    assert cal.false_alarms(np.inf) == 0
    sig = Calibration.fit(good, "sigma", sigma=3.0)
    assert sig.threshold == pytest.approx(good.mean() + 3 * good.std(), rel=1e-6)
    back = Calibration.from_dict(cal.to_dict())
    assert back.threshold == cal.threshold and np.allclose(back.good_scores, cal.good_scores)
    with pytest.raises(ValueError, match="at least one"):
        Calibration.fit([])
    with pytest.raises(ValueError, match="NaN"):
        Calibration.fit([1.0, float("nan")])


def test_domain_adaptation_pulls_input_and_reconstruction_features_together_and_keeps_the_original():
    from ccad.features import get_backbone
    from ccad.scoring import domain_adapt
    from ccad.scoring.domain_adapt import _cos_gap

    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 64, 64, generator=g)
    x_hat = (x + 0.15 * torch.randn(4, 3, 64, 64, generator=g)).clamp(0, 1)  # 'reconstructions' with artefacts
    base = get_backbone("tf_efficientnet_lite0", layers=(1, 2))
    before = [p.detach().clone() for p in base.parameters()]
    with torch.no_grad():
        gap0 = float(_cos_gap(base.layer_maps(x), base.layer_maps(x_hat)))
    tuned = domain_adapt(base, [(x, x_hat)], epochs=6, lr=1e-3)
    with torch.no_grad():
        gap1 = float(_cos_gap(tuned.layer_maps(x), tuned.layer_maps(x_hat)))
        drift = float(_cos_gap(tuned.layer_maps(x), base.layer_maps(x)))
    assert gap1 < 0.8 * gap0  # eq. 10 went down
    assert drift < 0.5  # the regulariser keeps the tuned features near ImageNet's (no collapse)
    assert all(torch.equal(a, b) for a, b in zip(before, base.parameters()))  # the shared backbone is untouched
    assert not any(p.requires_grad for p in tuned.parameters())


def test_one_heatmap_renderer_for_predictions_and_the_review_screen():
    import cv2

    from ccad import relabel
    from ccad.pipeline import Prediction
    from ccad.scoring import render_heatmap

    assert relabel.render_heatmap is render_heatmap
    amap = np.random.default_rng(0).normal(0.5, 0.4, (37, 53)).astype(np.float32)
    p = Prediction(image=np.zeros((37, 53, 3), np.float32), reconstruction=None, anomaly_map=amap, score=1.0,
                   threshold=1.0, seconds=0.0)
    heat = p.heatmap()
    lo, hi = p.display_range()  # the model's fixed scale, the threshold at mid-scale
    np.testing.assert_array_equal(heat, render_heatmap(amap, vmin=lo, vmax=hi))
    jet = cv2.applyColorMap((np.clip((amap - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)
    np.testing.assert_array_equal(heat, cv2.cvtColor(jet, cv2.COLOR_BGR2RGB))  # OpenCV's JET, RGB order
