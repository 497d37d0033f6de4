"""The Train tab's controller and the engine calls behind it (no browser; issue 13 item 12):
the autoencoder is checked before a job starts and what loads offline is offered first; the
status says the method's real phase; latent methods get a reconstruction preview; a resumed run
continues its loss curve and shows its real last step and loss; one short model name per run.

Everything runs offline on small synthetic data: a random-init TAEF2 (``taef2:random``) where a
real job trains, empty TAEF2 files where only the folder's contents are checked, a Hub cache
folder written by the test.
"""
from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.controller import AppController, Engine, UserError

DEFAULT_KL = "kl:stabilityai/sd-vae-ft-mse"


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    r = tmp_path / "data"
    r.mkdir()
    return r


@pytest.fixture()
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """HF_HUB_OFFLINE=1 and an empty Hub cache folder (returned)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    return cache


def _ctl(root: Path, tmp_path: Path, cache: Path, train: Any = None) -> AppController:
    c = AppController(data_root=root, state_dir=tmp_path / "state", samples_dir=None, demo_dir=None,
                      engine=Engine(train=train) if train is not None else None)
    c.hub_cache_dir = str(cache)
    c.hub_probe = lambda: False
    return c


def _taef2_folder(d: Path, files: tuple[str, ...] = ("taef2_encoder.pth", "taef2_decoder.pth")) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for f in files:
        (d / f).write_bytes(b"")  # only the folder's contents are checked before a start
    return d


def _cache_repo(cache: Path, repo_id: str, filename: str = "config.json") -> None:
    """A Hub cache entry as huggingface_hub writes it (refs/main -> snapshots/<commit>/file)."""
    base = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0" * 40
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    f = base / "snapshots" / commit / filename
    f.parent.mkdir(parents=True)
    f.write_text("{}")


def _synth(root: Path) -> None:
    from ccad.data.synthetic import write_dataset

    write_dataset(root / "synth", kinds=("fibrous",), n_train=6, n_test_good=1, n_test_defect=1, size=32, seed=2,
                  defects=("spot",))


# ------------------------------------------------------------------------------- the autoencoder field

def test_autoencoder_problem_checks_folders_and_the_hub_cache(tmp_path: Path, offline: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from ccad.models.autoencoder_check import autoencoder_problem, offline_autoencoders

    folder = _taef2_folder(tmp_path / "taef2")
    assert autoencoder_problem(f"taef2:{folder}", cache_dir=str(offline)) is None
    assert autoencoder_problem("taef2:random") is None
    # the file instead of its folder: say which folder to give
    msg = autoencoder_problem(f"taef2:{folder / 'taef2_encoder.pth'}")
    assert msg is not None and "is a file" in msg and f"taef2:{folder}" in msg
    half = _taef2_folder(tmp_path / "half", ("taef2_encoder.pth",))
    msg = autoencoder_problem(f"taef2:{half}")
    assert msg is not None and "taef2_decoder.pth" in msg
    msg = autoencoder_problem(f"taef2:{tmp_path / 'nowhere'}")
    assert msg is not None and "no folder" in msg
    # a Hub id: fine once cached; offline and not cached it is named with what to do
    msg = autoencoder_problem(DEFAULT_KL, cache_dir=str(offline))
    assert msg is not None and "not in the local Hub cache" in msg and "HF_HUB_OFFLINE" in msg
    assert "huggingface-cli download stabilityai/sd-vae-ft-mse" in msg
    _cache_repo(offline, "stabilityai/sd-vae-ft-mse")
    assert autoencoder_problem(DEFAULT_KL, cache_dir=str(offline)) is None
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert autoencoder_problem("tiny:madebyollin/taesd", online=True, cache_dir=str(offline)) is None
    msg = autoencoder_problem("tiny:madebyollin/taesd", online=False, cache_dir=str(offline))
    assert msg is not None and "cannot be reached" in msg
    # what loads offline, best first: TAEF2 folders found under the search folders, then cached Hub ids
    assert offline_autoencoders([tmp_path], cache_dir=str(offline)) == [f"taef2:{folder}", DEFAULT_KL]


def test_bad_autoencoder_is_refused_before_a_job_starts(root: Path, tmp_path: Path, offline: Path) -> None:
    (root / "good").mkdir()
    _synth(root)
    started: list[dict[str, Any]] = []
    c = _ctl(root, tmp_path, offline, train=lambda *a, **k: started.append(k))
    # the default (SD's KL autoencoder) offline, not cached: the field is named, with what to enter
    with pytest.raises(UserError) as err:
        c.start_training("synth/fibrous", None, None, "tiny", 32, 2, 2, variant="deco-diff", autoencoder=DEFAULT_KL)
    msg = str(err.value)
    assert f"Autoencoder {DEFAULT_KL!r}" in msg and "HF_HUB_OFFLINE" in msg and "Nothing was started" in msg
    assert "taef2:/path/to/folder (the folder holding taef2_encoder.pth and taef2_decoder.pth)" in msg
    assert "ccad train" not in msg  # the app's words, not the command line's
    # a TAEF2 file given instead of its folder
    folder = _taef2_folder(root / "weights" / "taef2")
    with pytest.raises(UserError, match=rf"is a file; give the folder .*taef2:{folder}"):
        c.start_training("synth/fibrous", None, None, "tiny", 32, 2, 2, variant="deco-diff",
                         autoencoder=f"taef2:{folder}/taef2_encoder.pth")
    # set through the advanced options it is checked too
    with pytest.raises(UserError, match="not in the local Hub cache"):
        c.start_training("synth/fibrous", None, None, "tiny", 32, 2, 2, variant="deco-diff",
                         options="autoencoder=tiny:madebyollin/taesd")
    # every refusal above is raised before a job thread exists: nothing to wait for
    assert c.jobs.snapshot() is None and started == []
    # the message offers what loads here
    with pytest.raises(UserError, match=rf"Loads offline here: taef2:{folder}"):
        c.start_training("synth/fibrous", None, None, "tiny", 32, 2, 2, variant="deco-diff", autoencoder=DEFAULT_KL)
    # a folder with both files starts
    assert "Started" in c.start_training("synth/fibrous", None, None, "tiny", 32, 2, 2, variant="deco-diff",
                                         autoencoder=f"taef2:{folder}")
    c.jobs.join(30)
    assert started and started[0]["method"].autoencoder == f"taef2:{folder}"


def test_autoencoder_field_offers_what_loads_offline_first(root: Path, tmp_path: Path, offline: Path) -> None:
    c = _ctl(root, tmp_path, offline)
    f = c.autoencoder_field("deco-diff")
    assert f["visible"] and f["value"] == DEFAULT_KL and f["offline"] == []  # nothing better to offer
    assert "Nothing loads offline here yet" in f["info"]
    assert "taef2:/path/to/folder (the folder holding taef2_encoder.pth and taef2_decoder.pth)" in f["info"]
    assert "taef2.pth" not in f["info"]
    folder = _taef2_folder(root / "weights" / "taef2")
    f = c.autoencoder_field("deco-diff")
    assert f["value"] == f"taef2:{folder}" and f["info"].startswith(f"Loads offline here: taef2:{folder}.")
    _cache_repo(offline, "stabilityai/sd-vae-ft-mse")  # the method's default loads now: it stays the default
    f = c.autoencoder_field("deco-diff")
    assert f["value"] == DEFAULT_KL and f["offline"] == [f"taef2:{folder}", DEFAULT_KL]
    assert c.autoencoder_field("ccad-v")["visible"] is False  # a pixel method has no autoencoder


# ------------------------------------------------------------------------------- phase, preview, resume, names

def test_status_says_the_methods_own_phase(root: Path, tmp_path: Path, offline: Path) -> None:
    """DeCo-Diff builds no feature bank: its job never says so; what the engine says it does is shown."""
    _synth(root)
    seen: list[str] = []
    go = threading.Event()

    def train(data: str, out_dir: str, **kw: Any) -> None:
        go.wait(10)
        kw["phase"]("encoding the training images into latents")
        kw["progress"](3, 6)
        seen.append(c.training_status()["status"])
        return None

    c = _ctl(root, tmp_path, offline, train=train)
    c.start_training("synth/fibrous", None, None, "tiny", 32, 2, 2, variant="deco-diff", autoencoder="taef2:random")
    first = c.training_status()["status"]
    go.set()
    c.jobs.join(30)
    assert "bank" not in first
    assert seen == [f"Job {c.jobs.snapshot()['id']}: running - encoding the training images into latents (3/6)"]


def test_engine_phases_follow_the_method(root: Path, tmp_path: Path) -> None:
    """train_detector says "building the feature bank" only for a method that builds one."""
    import torch

    from ccad.methods import get_method
    from ccad.pipeline import train_detector
    from ccad.training import TrainConfig

    torch.set_num_threads(1)
    _synth(root)
    phases: list[str] = []
    cfg = get_method("deco-diff").default_config("tiny")
    cfg.autoencoder = "taef2:random"
    train_detector(str(root / "synth/fibrous"), tmp_path / "run", variant="deco-diff", method=cfg, image_size=32,
                   train=TrainConfig(steps=1, batch_size=2, show_progress=False), phase=phases.append)
    assert "building the feature bank" not in phases
    assert phases[:3] == ["loading the autoencoder and building the model",
                          "encoding the training images into latents (once; cached in the run folder)", "training"]
    assert phases[-1] == "saving the model"
    phases.clear()
    cfg_v = get_method("ccad-v").default_config("tiny")
    train_detector(str(root / "synth/fibrous"), tmp_path / "run-v", variant="ccad-v", method=cfg_v, image_size=32,
                   bank_size=20, train=TrainConfig(steps=1, batch_size=2, show_progress=False), phase=phases.append)
    assert phases[0] == "building the feature bank" and "training" in phases


def stop_training_at(controller: Any, step: int) -> dict[str, int]:
    """Make the controller's training jobs stop (as the Stop button does) after ``step``; returns
    the dict whose ``"step"`` can be changed later (-1: never stop). The real engine trains."""
    real = controller.engine.train
    stop_at = {"step": step}

    def train(*a: Any, **k: Any) -> Any:
        def stopper(st: Any) -> bool:
            if st.step == stop_at["step"]:
                controller.jobs.stop()
            return False
        return real(*a, **dict(k, callbacks=(*k["callbacks"], stopper)))

    controller.engine.train = train
    return stop_at


def test_resumed_latent_job_continues_curve_preview_and_name(root: Path, tmp_path: Path, offline: Path) -> None:
    """A real DeCo-Diff job (random TAEF2, 32 px): a reconstruction preview appears; stopped at
    step 1 and resumed, the loss curve goes on at step 2 (steps 1, 2, 3, no restart); resumed
    once more with nothing left to train, it shows step 3/3 and the last loss, never "nan"; the
    run keeps one short model name (method + run folder) throughout."""
    import torch

    torch.set_num_threads(1)
    _synth(root)
    c = _ctl(root, tmp_path, offline)
    stop_at = stop_training_at(c, 1)
    c.start_training("synth/fibrous", None, None, "tiny", 32, 3, 2, preview_every=1, variant="deco-diff",
                     autoencoder="taef2:random")
    c.jobs.join(600)
    st = c.training_status()
    assert st["state"] == "stopped", c.jobs.snapshot()["error"]
    first_losses = list(st["losses"])
    assert [s for s, _ in first_losses] == [1]
    assert st["preview"] is not None and st["preview"].ndim == 3 and st["preview"].shape[-1] == 3
    name = st["model_name"]
    run = Path(c.jobs.snapshot()["params"]["out_dir"]).name
    assert name == f"deco-diff {run}" and "stopped" not in name
    stop_at["step"] = -1
    assert "resumed" in c.start_training(None, None, None, "", 0, 0, 0, resume=True)
    c.jobs.join(600)
    st = c.training_status()
    assert st["state"] == "finished", c.jobs.snapshot()["error"]
    assert "finished - finished" not in st["status"]  # the state is said once
    assert [s for s, _ in st["losses"]] == [1, 2, 3]
    np.testing.assert_allclose(st["losses"][0][1], first_losses[0][1], rtol=1e-6)
    last = st["losses"][-1][1]
    assert st["progress"].startswith("step 3/3") and f"loss {last:.4f}" in st["progress"]
    # nothing left to train: the real last step and loss, the curve and preview kept
    c.start_training(None, None, None, "", 0, 0, 0, resume=True)
    c.jobs.join(600)
    st = c.training_status()
    assert st["state"] == "finished", c.jobs.snapshot()["error"]
    assert st["progress"].startswith("step 3/3") and f"loss {last:.4f}" in st["progress"]
    assert "nan" not in st["progress"] and [s for s, _ in st["losses"]] == [1, 2, 3]
    assert st["preview"] is not None
    assert c.registry.names() == [name] and st["model_name"] == name
    assert c.registry.detector(name).info["train_steps"] == 3
    assert all(math.isfinite(v) for _, v in st["losses"])


def test_paths_typed_in_the_train_tab_are_confined_to_the_data_root(root: Path, tmp_path: Path,
                                                                     offline: Path) -> None:
    """Issue 20 item 7: the Autoencoder box (and any path-valued advanced option) is confined to the
    data root like the folder boxes: a folder outside it, a missing one, ``..`` and a symlink out are
    refused before anything is read or started; a relative path means a folder inside the root; a
    Hub id cached offline stays allowed."""
    _synth(root)
    outside = _taef2_folder(tmp_path / "outside" / "taef2")  # a real TAEF2 folder, outside the root
    inside = _taef2_folder(root / "weights" / "taef2")
    (root / "link").symlink_to(outside, target_is_directory=True)
    started: list[dict[str, Any]] = []
    c = _ctl(root, tmp_path, offline, train=lambda *a, **k: started.append(k))

    def start(**kw: Any) -> str:
        return c.start_training("synth/fibrous", None, None, "tiny", 32, 2, 2, **kw)

    for spec in (f"taef2:{outside}", "taef2:/etc", "taef2:/nonexistent", f"taef2:{root}/../outside/taef2",
                 "taef2:link", str(outside)):
        with pytest.raises(UserError, match="outside the allowed data root|'..' is not allowed|does not exist"):
            start(variant="deco-diff", autoencoder=spec)
        with pytest.raises(UserError, match="outside the allowed data root|'..' is not allowed|does not exist"):
            start(variant="deco-diff", options=f"autoencoder={spec}")  # the options box too
    with pytest.raises(UserError, match="outside the allowed data root"):
        start(variant="glad", options=f"feature_weights={outside / 'taef2_encoder.pth'}")
    with pytest.raises(UserError, match="outside the allowed data root"):
        start(variant="ccad-c", autoencoder="taef2:random", options=f"pretrained_unet={tmp_path / 'outside'}")
    # every refusal above is raised before a job thread exists: nothing to wait for
    assert c.jobs.snapshot() is None and started == []
    # a relative folder is read inside the data root, whatever the server's working directory is
    assert "Started" in start(variant="deco-diff", autoencoder="taef2:weights/taef2")
    c.jobs.join(30)
    assert started[-1]["method"].autoencoder == f"taef2:{inside.resolve()}"
    # a Hub id in the local Hub cache stays allowed
    _cache_repo(offline, "madebyollin/taesd")
    assert "Started" in start(variant="deco-diff", autoencoder="tiny:madebyollin/taesd")
    c.jobs.join(30)
    assert started[-1]["method"].autoencoder == "tiny:madebyollin/taesd"


def test_the_hub_box_never_loads_a_server_folder(root: Path, tmp_path: Path, offline: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A 'Hub id' that names a folder relative to the server's working directory is not loaded from
    there (it would bypass the data root)."""
    from ccad import fit_detector  # noqa: F401 - a real saved model in the server's working directory

    work = tmp_path / "cwd"
    (work / "models" / "m").mkdir(parents=True)
    (work / "models" / "m" / "config.json").write_text("{}")
    monkeypatch.chdir(work)
    c = _ctl(root, tmp_path, offline)
    with pytest.raises(UserError, match="folder on the server.*folder box"):
        c.load_from_hub("models/m", None)
