"""The proof of the method seam: a toy method defined here, outside ``ccad/``, is registered and then
trained, saved, loaded, used and evaluated through the public API and the CLI like a built-in one.

The toy is a two-layer conv autoencoder (a diffusers ``ModelMixin, ConfigMixin``) trained as a
denoising autoencoder; its anomaly map is the squared reconstruction error.
"""
import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

import ccad
from ccad.cli import main
from ccad.config import ConfigError
from ccad.data.detect import load_dataset
from ccad.data.synthetic import write_dataset
from ccad.evaluate import evaluate
from ccad.methods import Method, MethodOutput, get_method, method_names, register_method, unregister_method
from ccad.pipeline import AnomalyDetector

TOY = "toy-ae"


@dataclass
class ToyConfig:
    """The toy's typed config section: the hidden width and the training noise level."""

    width: int = 4
    noise: float = 0.1

    def validate(self) -> None:
        if int(self.width) < 1:
            raise ConfigError(f"method.width must be >= 1, got {self.width}")
        if float(self.noise) < 0:
            raise ConfigError(f"method.noise must be >= 0, got {self.noise}")


class ToyAutoencoder(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.encode = nn.Conv2d(3, width, 3, padding=1)
        self.decode = nn.Conv2d(width, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decode(torch.relu(self.encode(x))))


class ToyMethod(Method):
    name = TOY
    title = "Toy autoencoder"
    description = "two-layer conv denoising autoencoder, squared reconstruction error map"
    paper = "tests/test_method_plugin.py"
    space = "pixel"
    Config = ToyConfig
    uses_bank = False
    components = {"ae": ToyAutoencoder}
    default_image_size = 32

    def build(self, train):
        torch.manual_seed(self.ctx.seed)
        self.modules["ae"] = ToyAutoencoder(width=int(self.config.width))

    def training_loss(self, modules, batch, generator):
        x = batch["image"]
        noise = torch.randn(x.shape, generator=generator).to(x.device)
        return F.mse_loss(modules["ae"](x + float(self.config.noise) * noise), x)

    @torch.no_grad()
    def maps(self, x):
        rec = self.modules["ae"](x)
        return MethodOutput(((x - rec) ** 2).mean(1, keepdim=True), rec)


@pytest.fixture
def toy():
    register_method(ToyMethod)
    yield ToyMethod
    unregister_method(TOY)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # not square and not the model size: predictions must come back at the original size
    root = write_dataset(tmp_path_factory.mktemp("toy") / "data", kinds=("fibrous",), n_train=6, n_test_good=2,
                         n_test_defect=2, size=(40, 48), seed=3, defects=("spot",))
    return root / "fibrous"


def test_registered_toy_is_listed_and_removed(toy):
    assert TOY in method_names() and get_method(TOY) is ToyMethod
    unregister_method(TOY)
    assert TOY not in method_names()
    register_method(ToyMethod)


def test_toy_trains_saves_loads_predicts_evaluates(toy, data, tmp_path):
    losses = []
    det = ccad.train_detector(data, tmp_path / "run", variant=TOY, method=ToyConfig(width=6, noise=0.05),
                              steps=25, batch_size=4, lr=1e-2, device="cpu",
                              callbacks=[lambda state: losses.append(state.loss)])
    assert det.variant == TOY and det.bank is None and np.isfinite(det.threshold)
    assert len(losses) == 25 and np.mean(losses[-5:]) < np.mean(losses[:5])

    model = tmp_path / "run" / "model"
    cfg = json.loads((model / "config.json").read_text())
    assert cfg["variant"] == TOY and cfg["method"] == {"width": 6, "noise": 0.05}
    ae = ToyAutoencoder.from_pretrained(str(model / "ae"))  # the component loads alone
    assert ae.config.width == 6
    torch.testing.assert_close(ae.state_dict(), det.method.modules["ae"].cpu().state_dict())

    loaded = AnomalyDetector.from_pretrained(str(model), device="cpu")
    assert isinstance(loaded.method, ToyMethod) and loaded.threshold == pytest.approx(det.threshold)
    test_img = sorted((data / "test" / "spot").glob("*.png"))[0]
    p = loaded.predict(test_img)
    assert p.anomaly_map.shape == (40, 48) and p.reconstruction.shape == (40, 48, 3)
    assert np.isfinite(p.score) and p.verdict in ("good", "anomalous")
    assert p.score == pytest.approx(det.predict(test_img).score, rel=1e-5)
    assert p.heatmap().shape == (40, 48, 3)

    report = evaluate(loaded, load_dataset(data, split="test"))
    assert not report.errors and len(report.records) == 4
    assert 0.0 <= report.mean["image_auroc"] <= 1.0
    assert loaded.card()["variant"] == TOY and loaded.card()["denoiser_parameters"] > 0


def test_toy_through_the_cli(toy, data, tmp_path, capsys):
    with pytest.raises(SystemExit) as ex:
        main(["train", "--help"])
    assert ex.value.code == 0
    help_text = capsys.readouterr().out
    assert TOY in help_text and ToyMethod.description in help_text
    assert "width=4" in help_text and "noise=0.1" in help_text

    run = tmp_path / "run"
    assert main(["train", str(data), "--variant", TOY, "--out", str(run), "--steps", "3", "--batch-size", "2",
                 "--option", "width=8", "--option", "noise=0.2", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["variant"] == TOY and out["steps"] == 3
    cfg = json.loads((run / "model" / "config.json").read_text())
    assert cfg["method"] == {"width": 8, "noise": 0.2}

    pred = tmp_path / "pred"
    assert main(["predict", str(run / "model"), str(data / "test"), "--out", str(pred), "--quiet"]) == 0
    assert "4 images" in capsys.readouterr().out
    assert len(list(pred.glob("*_reconstruction.png"))) == 4 and (pred / "scores.csv").is_file()

    report = tmp_path / "report.json"
    assert main(["evaluate", str(run / "model"), str(data), "--json", str(report), "--quiet"]) == 0
    assert "image_auroc" in capsys.readouterr().out
    assert len(json.loads(report.read_text())["records"]) == 4


def test_toy_bad_option_is_one_clear_line(toy, data, tmp_path, capsys):
    code = main(["train", str(data), "--variant", TOY, "--out", str(tmp_path / "run"), "--steps", "1",
                 "--option", "nosuch=1"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nosuch" in err[0] and "width" in err[0]
    assert main(["train", str(data), "--variant", TOY, "--out", str(tmp_path / "run"), "--steps", "1",
                 "--option", "width=wide"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "width" in err[0]
