"""Clear errors, nothing lost (issue 8): a malformed config.json names the file and the field; a
model path that does not exist says so (not a Hub repo-id format error); a repo id the Hub cannot
serve names the id."""
import json
import re

import pytest

from ccad.cli import main
from ccad.config import ConfigError, config_from_dict
from ccad.detector_config import DetectorConfig
from ccad.data.synthetic import write_dataset
from ccad.pipeline import AnomalyDetector, CheckpointError, fit_detector


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = write_dataset(tmp_path_factory.mktemp("data"), kinds=("fibrous",), n_train=6, n_test_good=2,
                         n_test_defect=1, size=64, seed=2, defects=("spot",))
    det = fit_detector(root / "fibrous", image_size=64, bank_size=8, calibration_fraction=0.25, device="cpu")
    out = tmp_path_factory.mktemp("model")
    det.save_pretrained(out)
    return out, root / "fibrous"


def _with(config: dict, dotted: str, value):
    cfg = json.loads(json.dumps(config))
    obj = cfg
    *parents, last = dotted.split(".")
    for p in parents:
        obj = obj[p]
    obj[last] = value
    return cfg


def test_config_from_dict_type_checks_every_scalar_field():
    with pytest.raises(ConfigError, match=r"^config\.image_size: expected an integer, got 'big'$"):
        config_from_dict(DetectorConfig, {"image_size": "big"}, "config")
    # accepted as before: ints for floats, integral floats for ints, lists for tuples
    from ccad.config import BankConfig, ScoringConfig

    assert config_from_dict(ScoringConfig, {"sigma": 2}, "scoring").sigma == 2.0
    assert config_from_dict(BankConfig, {"size": 20.0, "layers": [1, 2]}, "bank").size == 20
    with pytest.raises(ConfigError, match=r"bank\.size: expected an integer, got 2\.5"):
        config_from_dict(BankConfig, {"size": 2.5}, "bank")
    with pytest.raises(ConfigError, match=r"bank\.layers\[1\]: expected an integer, got 'x'"):
        config_from_dict(BankConfig, {"layers": [1, "x"]}, "bank")
    with pytest.raises(ConfigError, match=r"bank\.layers: expected a list"):
        config_from_dict(BankConfig, {"layers": 3}, "bank")
    with pytest.raises(ConfigError, match=r"bank\.backbone: expected a string, got 7"):
        config_from_dict(BankConfig, {"backbone": 7}, "bank")
    with pytest.raises(ConfigError, match=r"bank\.size: expected an integer, got True"):
        config_from_dict(BankConfig, {"size": True}, "bank")  # a bool is not a number here
    assert config_from_dict(BankConfig, {"weights": None}, "bank").weights is None  # Optional stays optional


@pytest.mark.parametrize("field, value, message", [
    ("image_size", "big", r"image_size: expected an integer, got 'big'"),
    ("bank.size", "many", r"bank\.size: expected an integer, got 'many'"),
    ("scoring.sigma", "wide", r"scoring\.sigma: expected a number, got 'wide'"),
    ("scoring.score", 3, r"scoring\.score: expected a string, got 3"),
    ("method.diffusion.steps", "ten", r"method\.diffusion\.steps: expected an integer, got 'ten'"),
    ("train.hflip", "sometimes", r"train\.hflip: expected true or false, got 'sometimes'"),
    ("train.lr", "fast", r"train\.lr: expected a number, got 'fast'"),
])
def test_a_malformed_config_file_names_the_file_and_the_field(tmp_path, field, value, message):
    base = DetectorConfig(variant="ccad-v").to_dict()
    from ccad.training import TrainConfig

    base["train"] = TrainConfig().to_dict()
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_with(base, field, value)))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: {message}$"):
        DetectorConfig.load(path)


def test_loading_a_model_with_a_bad_config_names_the_file_and_field(model_dir, tmp_path, capsys):
    src, data = model_dir
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in src.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((bad / "config.json").read_text())
    cfg["image_size"] = "big"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(bad / 'config.json'))}: image_size: "
                                              r"expected an integer, got 'big'$"):
        AnomalyDetector.from_pretrained(bad)
    assert main(["evaluate", str(bad), str(data), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: {bad / 'config.json'}: image_size: expected an integer, got 'big'"
    assert "invalid literal" not in err and "Traceback" not in err


@pytest.mark.parametrize("path", ["no/such/dir", "./missing-model", "~/surely-not-a-ccad-model-dir",
                                  "/abs/missing/model", "not a repo id"])
def test_a_missing_model_path_says_so(path, model_dir, capsys, monkeypatch):
    import huggingface_hub

    def no_network(*a, **k):  # the Hub must not even be asked for a path
        raise AssertionError("the Hub was asked for a local path")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(CheckpointError, match="no such model folder") as ex:
        AnomalyDetector.from_pretrained(path)
    assert str(ex.value) == f"{path}: no such model folder (and not a Hugging Face Hub repo id)"
    assert main(["evaluate", path, str(model_dir[1]), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: {path}: no such model folder (and not a Hugging Face Hub repo id)"
    assert "Repo id must" not in err


def test_a_repo_id_the_hub_cannot_serve_names_the_id(model_dir, tmp_path, monkeypatch, capsys):
    import httpx
    import huggingface_hub
    import huggingface_hub.constants as c
    from huggingface_hub.errors import RepositoryNotFoundError

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match=r"^someone/not-cached: .*'someone/not-cached'.*offline.*cache"):
        AnomalyDetector.from_pretrained("someone/not-cached")
    assert main(["predict", "someone/not-cached", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: someone/not-cached: ") and "could not be fetched" in err
    assert "Traceback" not in err

    def not_found(*a, **k):
        request = httpx.Request("GET", "https://huggingface.co/api/models/someone/gone")
        raise RepositoryNotFoundError("404 Repository Not Found", response=httpx.Response(404, request=request))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_found)
    with pytest.raises(CheckpointError, match=r"^someone/gone: .*'someone/gone' was not found"):
        AnomalyDetector.from_pretrained("someone/gone")
    # an existing folder is still a folder, whatever its name looks like
    assert AnomalyDetector.from_pretrained(model_dir[0], device="cpu").threshold > 0
