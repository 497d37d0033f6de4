"""Issue 13, items 8, 9 and 14 (data side): output names that never point at another image,
rows that show the path the user gave (links too), content checked against the extension,
huge images read reduced, a clear error for an empty calibration folder, and batched prediction
equal to one-at-a-time prediction."""
import csv
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ccad.cli import main
from ccad.data import io as dio
from ccad.data.layouts import load_folder
from ccad.data.io import ImageReadError, load_image, load_mask
from ccad.data.synthetic import write_dataset


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny PatchCore model built through the CLI on generated textures."""
    tmp = tmp_path_factory.mktemp("trust")
    root = write_dataset(tmp / "data", kinds=("fibrous",), n_train=6, n_test_good=1, n_test_defect=1,
                         size=64, seed=3, defects=("spot",))
    out = tmp / "model"
    assert main(["bank", str(root / "fibrous" / "train" / "good"), "--out", str(out), "--image-size", "64",
                 "--size", "8", "--quiet"]) == 0
    return out


def _png(path: Path, w: int, h: int, value: int = 120) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(w * 1000 + h)
    a = np.clip(rng.normal(value, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(a).save(path)
    return path


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---- item 8: output names ---------------------------------------------------------------------

def test_each_row_names_its_own_output_files(model, tmp_path, capsys):
    """a/000.png, b/000.png and a top-level b_000.png: each row's heatmap/overlay/mask file
    exists, has that image's own size (each image has a different one), and no two rows share a
    file; the top-level b_000.png owns b_000_*.png (it used to be b/000.png's)."""
    src = tmp_path / "in"
    sizes = {"a/000.png": (40, 36), "b/000.png": (48, 44), "b_000.png": (56, 52)}
    for rel, (w, h) in sizes.items():
        _png(src / rel, w, h)
    out = tmp_path / "out"
    assert main(["predict", str(model), str(src), "--out", str(out), "--quiet"]) == 0
    rows = _rows(out / "scores.csv")
    assert len(rows) == 3
    written = []
    for r in rows:
        rel = Path(r["file"]).relative_to(src).as_posix()
        for kind in ("heatmap", "overlay", "mask"):
            f = out / r[kind]
            assert f.is_file(), (rel, kind, r[kind])
            assert Image.open(f).size == sizes[rel], (rel, kind, r[kind])
            written.append(r[kind])
        assert r["reconstruction"] == ""  # PatchCore has none
    assert len(set(written)) == len(written)
    by_file = {Path(r["file"]).relative_to(src).as_posix(): r for r in rows}
    assert by_file["b_000.png"]["overlay"] == "b_000_overlay.png"
    assert by_file["b/000.png"]["overlay"] != "b_000_overlay.png"


def test_output_stems_are_injective_and_deterministic():
    from ccad.data.naming import output_files, output_stems

    paths = ["d/a/000.png", "d/b/000.png", "d/b_000.png", "d/b+000.png", "d/x.png", "d/x.jpg", "d/X.png",
             "d/x~2.png", "d/c%2F.png", None, None]
    stems = output_stems(paths)
    assert stems == output_stems(list(paths))  # deterministic
    assert stems[:3] == ["a+000", "b+000", "b_000"]
    assert len({s.casefold() for s in stems}) == len(stems)  # distinct even on case-insensitive disks
    assert stems[3] != stems[1]  # a literal '+' is escaped, never read as a folder separator
    assert stems[5] == "x~2" and stems[7] != "x~2"  # the collision suffix never meets a real name
    assert output_stems(["only/folder/img.png", "only/folder/img2.png"]) == ["img", "img2"]
    assert output_files("a+000") == {"heatmap": "a+000_heatmap.png", "overlay": "a+000_overlay.png",
                                     "mask": "a+000_mask.png"}


# ---- item 9: paths as given, content vs extension, huge images, empty folder -------------------

def test_a_symlink_is_shown_by_its_own_name_never_its_target(model, tmp_path):
    outside = tmp_path / "outside"
    secret = outside / "secret"
    secret.parent.mkdir()
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    real = _png(outside / "real.png", 40, 40)
    src = tmp_path / "in"
    src.mkdir()
    (src / "passwd").symlink_to(secret)          # no image extension: a skipped row
    (src / "part.png").symlink_to(real)          # an image through a link: a scored row
    out = tmp_path / "out"
    assert main(["predict", str(model), str(src), "--out", str(out), "--quiet"]) == 0
    files = [r["file"] for r in _rows(out / "scores.csv")]
    assert sorted(files) == sorted([str(src / "part.png"), str(src / "passwd")])
    assert not any("outside" in f for f in files)
    samples = load_folder(src)
    assert [s.image_path for s in samples] == [str(src / "part.png")]
    assert [p.name for p in samples.skipped] == ["passwd"]


def test_a_skipped_gif_row_shows_the_path_as_given(model, tmp_path, monkeypatch):
    src = tmp_path / "in"
    _png(src / "ok.png", 40, 40)
    frames = [Image.new("RGB", (16, 16), (40 * i, 0, 0)) for i in range(3)]
    frames[0].save(src / "anim.gif", save_all=True, append_images=frames[1:])
    monkeypatch.chdir(tmp_path)
    assert main(["predict", str(model), "in", "--out", "out", "--quiet"]) == 0
    files = {r["file"]: r["verdict"] for r in _rows(tmp_path / "out" / "scores.csv")}
    assert files == {"in/ok.png": files["in/ok.png"], "in/anim.gif": "skipped: unsupported file type .gif"}


def test_a_gif_renamed_png_is_refused_naming_the_file(model, tmp_path, capsys):
    src = tmp_path / "in"
    _png(src / "ok.png", 40, 40)
    Image.new("RGB", (40, 40), (200, 10, 10)).save(src / "fake.png", format="GIF")
    with pytest.raises(ImageReadError, match=r"fake\.png.*content is GIF"):
        load_image(src / "fake.png")
    out = tmp_path / "out"
    assert main(["predict", str(model), str(src), "--out", str(out), "--quiet"]) == 0
    rows = {Path(r["file"]).name: r for r in _rows(out / "scores.csv")}
    assert rows["fake.png"]["verdict"] == "error" and "GIF" in rows["fake.png"]["error"]
    assert rows["fake.png"]["score"] == "" and rows["ok.png"]["score"] != ""
    assert "fake.png" in capsys.readouterr().err


def test_a_jpeg_named_png_is_read_with_a_warning_and_thresholded_as_lossy(tmp_path):
    p = tmp_path / "photo.png"
    a = np.zeros((32, 32), np.uint8)
    a[8:24, 8:24] = 255
    Image.fromarray(a).save(p, format="JPEG", quality=60)
    with pytest.warns(dio.ImageFormatWarning, match=r"photo\.png.*JPEG"):
        img = load_image(p)
    assert img.shape == (32, 32, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = load_mask(p)
    # JPEG ringing around the square is not defect: the mask is (about) the square alone
    assert abs(int(m.sum()) - 16 * 16) <= 16 and m[0, 0] == 0


def test_a_huge_png_is_read_reduced_not_materialised_as_float(tmp_path, monkeypatch):
    p = _png(tmp_path / "big.png", 400, 200)
    seen = []
    real = dio.to_float_rgb
    monkeypatch.setattr(dio, "to_float_rgb", lambda arr, source="array": seen.append(arr.shape) or real(arr, source))
    monkeypatch.setattr(dio, "MAX_SIDE", 64)
    img = load_image(p)
    assert img.shape == (32, 64, 3) and seen == [(32, 64, 3)]  # reduced before the float copy
    full = dio.read_raw(p, max_side=None).astype(np.float32) / 255
    # area-averaged: each output pixel is the mean of its 6.25 x 6.25 block
    np.testing.assert_allclose(img.mean(axis=(0, 1)), full.mean(axis=(0, 1)), atol=2e-3)
    assert load_image(p, max_side=None).shape == (200, 400, 3)


def test_a_huge_jpeg_is_decoded_reduced_by_the_codec(tmp_path, monkeypatch):
    p = tmp_path / "big.jpg"
    Image.fromarray(np.full((256, 512, 3), 90, np.uint8)).save(p, quality=90)
    decoded = []
    real = dio._pil_to_array
    monkeypatch.setattr(dio, "_pil_to_array", lambda im: decoded.append(im.size) or real(im))
    img = load_image(p, max_side=64)
    assert img.shape == (32, 64, 3)
    assert decoded and max(decoded[0]) <= 128  # DCT-scaled decode: never the 512 px pixels
    np.testing.assert_allclose(img, 90 / 255, atol=3 / 255)


def test_default_read_limit_and_masks_stay_binary(tmp_path):
    wide = tmp_path / "wide.png"
    Image.fromarray(np.zeros((8, dio.MAX_SIDE + 400), np.uint8)).save(wide)
    assert max(load_image(wide).shape[:2]) == dio.MAX_SIDE
    m = np.zeros((100, 300), np.uint8)
    m[20:60, 30:120] = 255
    mp = tmp_path / "m_mask.png"
    Image.fromarray(m).save(mp)
    small = load_mask(mp, max_side=30)
    assert small.shape == (10, 30) and set(np.unique(small)) <= {0.0, 1.0} and small.sum() > 0


def test_a_decompression_bomb_is_still_refused_naming_the_file(tmp_path, monkeypatch):
    p = _png(tmp_path / "bomb.png", 200, 100)
    monkeypatch.setattr(dio, "MAX_PIXELS", 10_000)
    with pytest.raises(ImageReadError, match=r"bomb\.png.*decompression bomb"):
        load_image(p)


def test_calibrate_on_an_empty_folder_names_the_folder(model, tmp_path, capsys):
    empty = tmp_path / "held_out_good"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    capsys.readouterr()
    assert main(["calibrate", str(model), "--good", str(empty)]) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "no images" in err and "notes.txt" in err
    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    (unreadable / "x.png").write_bytes(b"\x89PNG broken")
    assert main(["calibrate", str(model), "--good", str(unreadable)]) == 2
    assert str(unreadable) in capsys.readouterr().err
    assert json.loads((model / "calibration.json").read_text())["threshold"] > 0  # model untouched


def test_paths_are_absolute_but_not_resolved(tmp_path):
    real = tmp_path / "real"
    _png(real / "a.png", 16, 16)
    link = tmp_path / "link"
    os.symlink(real, link)
    s = load_folder(link)
    assert [x.image_path for x in s] == [str(link / "a.png")]


# ---- item 14: batching keeps every prediction -------------------------------------------------

DEMO = Path(__file__).resolve().parents[1] / "checkpoints" / "demo"


def _tiles(n: int, size: int = 48) -> list[np.ndarray]:
    from ccad.data.coerce import coerce_image
    from ccad.data.synthetic import generate_texture

    kinds = ("fibrous", "granular", "cloud", "woven")
    return [coerce_image(np.asarray(generate_texture(kinds[i % 4], size=size, seed=i))) for i in range(n)]


@pytest.mark.skipif(not (DEMO / "config.json").is_file(), reason="the bundled demo model is not in this checkout")
def test_the_demo_gives_each_image_the_same_prediction_alone_and_in_any_batch():
    """CCAD(V)'s DDAD sampler is stochastic (eta = 1): each image draws its noise from its own
    generator, so its score and map do not depend on its batch (size, neighbours, position)."""
    from ccad.pipeline import AnomalyDetector

    det = AnomalyDetector.load_folder(DEMO, device="cpu")
    assert det.variant == "ccad-v" and det.config.method.diffusion.eta > 0
    images = _tiles(2)
    alone = [det.predict(im) for im in images]
    batched, errors = det.predict_many(images[::-1], batch_size=2)  # together, each in the other's place
    assert not errors
    for got in (batched[::-1],):
        for a, b in zip(alone, got):
            np.testing.assert_allclose(b.score, a.score, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(b.anomaly_map, a.anomaly_map, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(b.reconstruction, a.reconstruction, rtol=1e-4, atol=1e-5)


def test_the_batcher_serves_concurrent_callers_their_own_results(model, tmp_path):
    import threading

    from ccad.batching import PredictionBatcher
    from ccad.pipeline import AnomalyDetector

    det = AnomalyDetector.load_folder(model, device="cpu")
    files = [_png(tmp_path / f"img{i}.png", 40 + 4 * i, 40, value=60 + 20 * i) for i in range(5)]
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    requests = [[files[0], files[1]], [files[2]], [tmp_path / "broken.png", files[3]], [files[4]]]
    alone = {str(f): det.predict(str(f)) for f in files}
    out: dict[int, tuple] = {}
    gate = threading.Barrier(len(requests))
    with PredictionBatcher(det, max_batch=8, max_wait_s=0.5) as batcher:
        def call(k: int) -> None:
            gate.wait()
            out[k] = batcher.predict_many([str(p) for p in requests[k]])

        threads = [threading.Thread(target=call, args=(k,)) for k in range(len(requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        calls = batcher.calls
        with pytest.raises(ImageReadError, match="broken.png"):
            batcher.predict(str(tmp_path / "broken.png"))
    assert calls < len(requests)  # requests shared detector calls
    for k, req in enumerate(requests):
        preds, errors = out[k]
        readable = [str(p) for p in req if p.name != "broken.png"]
        assert [p.path for p in preds] == readable
        assert [e[0] for e in errors] == [str(p) for p in req if p.name == "broken.png"]
        for p in preds:
            ref = alone[p.path]
            assert p.image.shape == ref.image.shape
            np.testing.assert_allclose(p.score, ref.score, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(p.anomaly_map, ref.anomaly_map, rtol=1e-5, atol=1e-5)


def test_importing_ccad_makes_openmp_threads_wait_passively_unless_told_otherwise():
    """Busy-waiting OpenMP threads made a batch-1 inspection ~15x slower on a shared 2-core box
    (python -m benchmarks speed --model checkpoints/demo); ccad sets PASSIVE before torch loads."""
    import subprocess
    import sys

    code = "import os, ccad, torch; print(os.environ.get('OMP_WAIT_POLICY'))"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ACTIVE"
