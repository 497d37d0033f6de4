"""Images keep their shape (issue 24 item 3): ``resize = square | keep-aspect | tile``.

What a user relies on: the mode is saved with the model and every scorer uses it; a keep-aspect
map has the image's size and its padding is never scored; a tile map has the image's size; a thin
defect that a square resize squashes away survives tiling; the CLI takes ``--resize`` and refuses
a bad value; the export runtime reproduces the mode (parity). Tiny generated images only."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from ccad.config import ConfigError
from ccad.data.framing import plan, tile_starts
from ccad.detector_config import DetectorConfig

ROOT = Path(__file__).resolve().parents[1]


def _fit(train, mode, size, **kw):
    from ccad.pipeline import fit_detector

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # square squashes the elongated images on purpose here
        return fit_detector(train, image_size=size, bank_size=16, calibration_fraction=0.25, device="cpu",
                            resize=mode, **kw)


@pytest.fixture(scope="module")
def elongated(tmp_path_factory):
    """64 x 320 granular textures; test defects: thin (1-2 px) dark lines across the long axis."""
    from benchmarks.resize_modes import write_elongated

    root = tmp_path_factory.mktemp("elong")
    return write_elongated(root, (64, 320), n_train=8, n_good=2, n_defect=4, seed=3)


# ---- the config ----------------------------------------------------------------------------------


def _row_index_maps(real):
    """``method.maps`` with each map replaced by its row index (0 at the top, growing downwards),
    so the largest value of a padded input lies in its bottom padding."""

    def rows(x):
        out = real(x)
        s = x.shape[-1]
        out.maps = torch.arange(s, dtype=torch.float32).view(1, 1, s, 1).expand(x.shape[0], 1, s, s).clone()
        return out

    return rows

def test_config_round_trip_and_old_configs_load_as_square():
    cfg = DetectorConfig(image_size=64, resize="tile", tile_stride=16).validate()
    back = DetectorConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert (back.resize, back.tile_stride) == ("tile", 16)
    old = DetectorConfig(image_size=64).to_dict()
    del old["resize"], old["tile_stride"]  # a config written before the setting existed
    loaded = DetectorConfig.from_dict(old)
    assert (loaded.resize, loaded.tile_stride) == ("square", None)


@pytest.mark.parametrize("field,value,words", [("resize", "stretch", "resize must be one of square, keep-aspect, tile"),
                                               ("tile_stride", 65, "tile_stride must be in 1..64"),
                                               ("tile_stride", 0, "tile_stride must be in 1..64")])
def test_a_bad_resize_setting_is_refused_naming_the_field(field, value, words, tmp_path):
    d = DetectorConfig(image_size=64).to_dict()
    d[field] = value
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=f"config.json: {words}"):
        DetectorConfig.load(tmp_path / "config.json")


def test_tiles_cover_every_pixel_and_the_letterbox_is_centred():
    for length, tile, stride in ((320, 64, 32), (65, 64, 32), (64, 64, 32), (500, 128, 100)):
        starts = tile_starts(length, tile, stride)
        assert starts[0] == 0 and starts[-1] == max(0, length - tile)
        assert all(0 < b - a <= stride for a, b in zip(starts, starts[1:]))
    lay = plan(48, 160, 160, "keep-aspect")
    assert lay.content == (48, 160) and lay.offset == (56, 0)


# ---- keep-aspect ---------------------------------------------------------------------------------

def test_keep_aspect_map_has_the_image_size_and_padding_never_raises_the_score(elongated):
    """The method's map is replaced by one that grows downwards (row index): over the whole square
    input its maximum lies in the bottom padding; the image's own rows stop at the content's end.
    The score (max rule) and the returned map must come from the image's rows only."""
    train, _ = elongated
    det = _fit(train, "keep-aspect", 64)
    det.config.scoring.score = "max"
    real = det.method.maps

    det.method.maps = _row_index_maps(real)
    img = np.random.default_rng(0).random((64, 320, 3)).astype(np.float32)
    p = det.predict(img)
    lay = det.layout(64, 320)
    top, nh = lay.offset[0], lay.content[0]
    assert p.anomaly_map.shape == (64, 320)
    assert p.score <= top + nh - 1 + 1e-4 < 63  # the padding below the image (rows up to 63) never counts
    assert p.anomaly_map.max() <= top + nh - 1 + 1e-4 and p.anomaly_map.min() >= top - 1e-4
    assert p.score == pytest.approx(float(p.anomaly_map.max()), abs=0.5)


def test_keep_aspect_finds_a_thin_line_where_it_is(tmp_path):
    """A 48 x 160 image, a 160 px model: keep-aspect scores it undistorted (content rows 56..103
    of the input). A 2 px line at a known row must peak in the map within 4 rows of it and score
    above the rows 12 or more away: a map that kept the padding (the content squeezed into rows
    17..31 of the returned map) or put the content at the wrong offset peaks elsewhere."""
    from ccad.data.synthetic import generate_texture

    train = []
    for i in range(6):
        p = tmp_path / f"g{i}.png"
        _save(p, generate_texture("granular", (48, 160), seed=i))
        train.append(str(p))
    det = _fit(train, "keep-aspect", 160)
    hits = []
    for k, row in enumerate((12, 30)):
        t = generate_texture("granular", (48, 160), seed=50 + k).copy()
        t[row:row + 2, 30:130] = np.clip(t[row:row + 2, 30:130] - 0.3, 0, 1)
        m = det.predict(np.repeat(t[..., None], 3, 2)).anomaly_map
        assert m.shape == (48, 160)
        profile = m[:, 30:130].mean(1)  # mean score per row along the line
        far = np.abs(np.arange(48) - row) >= 12
        hits.append((int(np.argmax(profile)), profile[row:row + 2].mean() > profile[far].max()))
    assert all(abs(peak - row) <= 4 and above for (peak, above), row in zip(hits, (12, 30))), hits


# ---- tile ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(64, 320), (40, 150), (100, 70)])
def test_tile_map_has_the_image_size(elongated, shape):
    train, _ = elongated
    det = _tile_det(train)
    p = det.predict(np.random.default_rng(1).random((*shape, 3)).astype(np.float32))
    assert p.anomaly_map.shape == shape and np.isfinite(p.score)
    lay = det.layout(*shape)
    assert lay.n_inputs == len(tile_starts(max(shape[0], 64), 64, 32)) * len(tile_starts(max(shape[1], 64), 64, 32))


def test_tile_padding_below_a_short_image_never_raises_the_score(elongated):
    """A 40 x 150 image under 64 px tiles is padded to 64 rows; a map growing downwards (row index)
    peaks in that padding. The score (max rule) and the map must stop at the image's last row."""
    train, _ = elongated
    det = _tile_det(train)
    old_rule, real = det.config.scoring.score, det.method.maps
    det.config.scoring.score = "max"

    det.method.maps = _row_index_maps(real)
    try:
        p = det.predict(np.random.default_rng(2).random((40, 150, 3)).astype(np.float32))
    finally:
        det.method.maps, det.config.scoring.score = real, old_rule
    assert p.anomaly_map.shape == (40, 150)
    assert p.score == pytest.approx(39.0) and p.anomaly_map.max() == pytest.approx(39.0)  # not 63: padding


_TILE = {}


def _tile_det(train):
    if "det" not in _TILE:
        _TILE["det"] = _fit(train, "tile", 64)
    return _TILE["det"]


def test_tile_model_is_built_from_tiles_and_saved_with_its_mode(elongated, tmp_path):
    from ccad.pipeline import AnomalyDetector

    train, test = elongated
    det = _tile_det(train)
    per_image = len(plan(64, 320, 64, "tile").boxes)
    assert det.info["n_train_inputs"] == det.info["n_train_images"] * per_image
    det.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["resize"] == "tile"
    back = AnomalyDetector.load_folder(tmp_path / "m", device="cpu")
    a, b = det.predict(test[-1].image_path), back.predict(test[-1].image_path)
    assert back.resize == "tile" and a.score == pytest.approx(b.score, rel=1e-5)
    np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, rtol=1e-4, atol=1e-4)


def _line_auroc(det, test):
    from ccad.data.dataset import load_sample_mask
    from ccad.metrics import auroc

    out = []
    for s in test:
        if s.label != 1:
            continue
        m = det.predict(s.image_path).anomaly_map
        mask = load_sample_mask(s, m.shape) > 0
        out.append(auroc(mask.ravel().astype(int), m.ravel()))
    return float(np.mean(out))


def test_a_thin_defect_survives_tiling_where_square_squashes_it(elongated):
    """Lines 1-2 px wide across the long axis of 64 x 320 images: a square 64 px model shrinks
    them 5x across, to a fraction of a pixel; tiles see them at native resolution. Judged on the
    map ``predict`` returns, at the image's size, against the exact line masks."""
    train, test = elongated
    tile = _line_auroc(_tile_det(train), test)
    square = _line_auroc(_fit(train, "square", 64), test)
    assert tile >= 0.9, tile
    assert tile >= square + 0.15, (tile, square)


# ---- evaluate, CLI, export -----------------------------------------------------------------------

def test_evaluate_compares_at_each_images_own_size(elongated):
    from ccad.evaluate import evaluate

    train, test = elongated
    det = _tile_det(train)
    rep = evaluate(det, test, batch_size=4)
    assert len(rep.records) == len(test) and np.isfinite(rep.mean["pixel_auroc"])
    scores = {r["path"]: r["score"] for r in rep.records}
    p = det.predict(test[-1].image_path)
    assert scores[test[-1].image_path] == pytest.approx(p.score, rel=1e-5)  # evaluate scores as predict does


@pytest.mark.parametrize("mode", ["tile", "keep-aspect"])
def test_export_runtime_reproduces_the_mode_with_parity(elongated, tmp_path, mode):
    """The numpy runtime frames, stitches and scores as the torch detector: ``ccad export``'s
    parity check passes (scores within 1e-4 relative, no verdict differs) on images of several
    shapes, and the exported folder's maps come back at the image's size."""
    from ccad.export import export_detector
    from ccad.runtime import load

    train, test = elongated
    det = _tile_det(train) if mode == "tile" else _fit(train, "keep-aspect", 64)
    export_detector(det, tmp_path / "exp")
    parity = json.loads((tmp_path / "exp" / "parity.json").read_text())
    assert parity["passed"] and parity["verdicts_differ"] == 0, parity
    rt = load(tmp_path / "exp")
    assert rt.framing == mode
    a, b = det.predict(test[-1].image_path), rt.predict(test[-1].image_path)
    assert b.anomaly_map.shape == (64, 320) and b.score == pytest.approx(a.score, rel=1e-4)
    np.testing.assert_allclose(b.anomaly_map, a.anomaly_map, rtol=1e-3, atol=1e-3 * float(np.ptp(a.anomaly_map)))


def test_the_runtime_refuses_an_unknown_framing(elongated, tmp_path):
    from ccad.export import export_detector
    from ccad.runtime import ExportFolderError, load

    train, _ = elongated
    export_detector(_tile_det(train), tmp_path / "exp")
    spec = json.loads((tmp_path / "exp" / "verdict.json").read_text())
    spec["input"]["framing"] = "stretch"
    (tmp_path / "exp" / "verdict.json").write_text(json.dumps(spec))
    with pytest.raises(ExportFolderError, match="input.framing must be square, keep-aspect or tile, got 'stretch'"):
        load(tmp_path / "exp")


def _ccad(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "ccad.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=_env())


def _env():
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_cli_resize_is_accepted_recorded_and_a_bad_value_refused(elongated, tmp_path):
    train, test = elongated
    data = Path(train[0].image_path).parent
    bad = _ccad("bank", data, "--out", tmp_path / "bad", "--resize", "stretch")
    assert bad.returncode == 2 and "--resize: invalid choice: 'stretch'" in bad.stderr
    assert "keep-aspect" in bad.stderr and not (tmp_path / "bad").exists()
    r = _ccad("bank", data, "--out", tmp_path / "m", "--image-size", 64, "--size", 16, "--resize", "keep-aspect",
              "--quiet")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "m" / "config.json").read_text())["resize"] == "keep-aspect"
    assert json.loads(r.stdout.strip().splitlines()[-1])["resize"] == "keep-aspect"
    out = _ccad("predict", tmp_path / "m", test[-1].image_path, "--out", tmp_path / "res")
    assert out.returncode == 0, out.stderr
    from PIL import Image

    heat = next((tmp_path / "res").glob("*heatmap*.png"))
    assert Image.open(heat).size == (320, 64)  # the map at the image's size, W x H
    exp = _ccad("export", tmp_path / "m", "--out", tmp_path / "exp")
    assert exp.returncode == 0, exp.stderr
    assert json.loads((tmp_path / "exp" / "verdict.json").read_text())["input"]["framing"] == "keep-aspect"
    run = _ccad("predict", tmp_path / "exp", test[-1].image_path, "--out", tmp_path / "res2")
    assert run.returncode == 0, run.stderr
    assert Image.open(next((tmp_path / "res2").glob("*heatmap*.png"))).size == (320, 64)


def test_feat_diff_trains_scores_and_exports_on_tiles(elongated, tmp_path):
    from ccad.methods.feat_diff import FeatDiffConfig
    from ccad.pipeline import AnomalyDetector, train_detector
    from ccad.training import TrainConfig

    train, test = elongated
    cfg = FeatDiffConfig(preset="tiny", memory_size=32, noise_level=100, steps=1, edit=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det = train_detector(train, tmp_path / "run", variant="feat-diff", method=cfg, image_size=64, bank_size=16,
                             train=TrainConfig(steps=2, batch_size=4, lr=1e-3, warmup_steps=1, show_progress=False),
                             calibration_fraction=0.25, resize="tile")
    assert det.info["n_train_inputs"] > det.info["n_train_images"]
    back = AnomalyDetector.load_folder(tmp_path / "run" / "model", device="cpu")
    p = back.predict(test[-1].image_path)
    assert p.anomaly_map.shape == (64, 320) and np.isfinite(p.score)
    from ccad.export import export_detector

    export_detector(back, tmp_path / "exp")  # the runtime tiles feat-diff's graph as the torch detector
    parity = json.loads((tmp_path / "exp" / "parity.json").read_text())
    assert parity["passed"] and parity["verdicts_differ"] == 0, parity


def test_the_square_warning_names_the_flag(monkeypatch):
    import ccad.data.convert as conv

    monkeypatch.setattr(conv, "_aspect_warned", set())
    with pytest.warns(conv.AspectRatioWarning, match="--resize keep-aspect .* --resize tile"):
        conv.warn_aspect((64, 320), 64, "x.png")


def _save(path, a):
    from PIL import Image

    Image.fromarray((np.clip(a, 0, 1) * 255).round().astype(np.uint8)).save(path)


def test_sharded_evaluate_keeps_each_images_own_size(elongated, tmp_path):
    """The per-process files of ``evaluate`` across processes hold maps of several sizes (flattened
    with their shapes); the merged report equals the single-process one."""
    from types import SimpleNamespace

    from ccad.evaluate import evaluate, evaluate_sharded

    train, test = elongated
    det = _tile_det(train)
    shard = SimpleNamespace(distributed=True, rank=0, world=1, is_main=True, wait=lambda: None,
                            split=lambda items, batch: list(items))
    from ccad.data.sample import Sample
    from ccad.data.synthetic import generate_texture

    _save(tmp_path / "small.png", generate_texture("granular", (50, 100), seed=9))
    mixed = list(test[:2]) + [Sample(str(tmp_path / "small.png"), None, 0)] + list(test[-2:])
    one = evaluate(det, mixed, batch_size=2)
    two = evaluate_sharded(det, mixed, shard, batch_size=2, folder=str(tmp_path / "shards"))
    for key, value in one.mean.items():
        assert two.mean[key] == pytest.approx(value, abs=1e-6, nan_ok=True), key
    assert [r["score"] for r in one.records] == pytest.approx([r["score"] for r in two.records], rel=1e-6)


def test_latent_cache_of_tiles_reads_back_each_tile_and_keys_on_it(elongated, tmp_path):
    """A latent method with ``tile`` caches one latent per tile; the images it reads back beside them
    are those tiles (not the whole image squashed), and the cache of tiles is not the cache of the images."""
    from ccad.data.dataset import load_item
    from ccad.data.framing import frame_samples
    from ccad.data.latent_cache import build_latent_cache, source_hash
    from ccad.models.autoencoder_load import load_autoencoder

    train, _ = elongated
    tiles = frame_samples(train[:2], "tile", 64)
    ae = load_autoencoder("kl:random")
    cache = build_latent_cache(tiles, ae, 64, tmp_path / "cache", batch_size=4, dtype="float32", with_images=True)
    assert len(cache) == len(tiles) == 2 * len(plan(64, 320, 64, "tile").boxes)
    for i in (0, len(tiles) - 1):
        torch.testing.assert_close(cache[i]["image"], load_item(tiles[i], 64)["image"])
    assert source_hash(tiles, 64, ae) != source_hash(train[:2], 64, ae)


def test_a_bank_built_from_tiles_is_refused_for_a_square_model(elongated, tmp_path):
    """``ccad train --bank`` / ``--resume`` reuse a saved bank: one built from tiles is said in its
    bank.json, and a model of another mode refuses it before anything is built."""
    from ccad.pipeline import train_detector

    train, _ = elongated
    bank = _tile_det(train).bank
    assert bank.meta["resize"] == "tile"
    with pytest.raises(ConfigError, match="built with resize='tile', this model is resize='square'"):
        train_detector(train, tmp_path / "run", variant="patchcore", bank=bank, image_size=64,
                       calibration_fraction=0.25, device="cpu")
