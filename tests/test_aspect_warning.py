"""Images keep their shape, or the user is told (issue 24 item 3, the warning part): a square
resize that changes an image's aspect ratio by more than 1.5x is said once per run, naming the
file and both shapes; near-square images say nothing."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

import ccad.data.convert as conv
from ccad.data.convert import AspectRatioWarning, warn_aspect


@pytest.fixture(autouse=True)
def fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conv, "_aspect_warned", set())


def test_a_squashed_image_is_said_once_naming_the_file_and_shapes() -> None:
    with pytest.warns(AspectRatioWarning, match=r"surface\.png: a 500 x 1250 image is resized to 256 x 256, "
                                                r"changing its aspect ratio 2\.50x"):
        assert warn_aspect((500, 1250), 256, "surface.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not warn_aspect((1250, 500), 256, "other.png")  # once per run and target size
        assert not warn_aspect((600, 800), 256, "part.png")  # 1.33x: under the 1.5x bar


def test_prediction_warns_for_an_elongated_image(tmp_path) -> None:
    from ccad.data.synthetic import write_dataset
    from ccad.pipeline import fit_detector

    root = write_dataset(tmp_path / "d", kinds=("granular",), n_train=6, n_test_good=1, n_test_defect=1,
                         size=48, seed=0)
    det = fit_detector(root / "granular", image_size=48, bank_size=8, calibration_fraction=0.34, device="cpu")
    with pytest.warns(AspectRatioWarning, match="a 40 x 120 image is resized to 48 x 48"):
        det.predict(np.random.default_rng(0).random((40, 120, 3)).astype(np.float32))
