"""FeatureBank: build from files / tensors / batches with the real lite0 backbone, save/load,
progress, cancel, skipped bad images, summary and the 2-D projection."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ccad.data.sample import Sample
from ccad.features import Cancelled, FeatureBank, get_backbone, project_2d

SIZE = 64


def texture(seed: int, size: int = SIZE) -> np.ndarray:
    """Woven-stripe texture with noise, uint8 H x W x 3."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    base = 0.5 + 0.25 * np.sin(2 * np.pi * xx / 8 + phase) * np.cos(2 * np.pi * yy / 8)
    img = base + rng.normal(0, 0.04, (size, size))
    rgb = np.stack([img, img * 0.9 + 0.05, img * 0.8 + 0.1], -1)
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def backbone():
    return get_backbone("tf_efficientnet_lite0")


@pytest.fixture()
def image_dir(tmp_path: Path) -> Path:
    for i in range(6):
        Image.fromarray(texture(i)).save(tmp_path / f"good_{i}.png")
    return tmp_path


def test_build_save_load_round_trip(image_dir: Path, backbone, tmp_path: Path) -> None:
    samples = [Sample(str(p), None, 0) for p in sorted(image_dir.glob("*.png"))]
    calls: list[tuple[int, int]] = []
    bank = FeatureBank.build(samples, backbone, size=16, image_size=SIZE, batch_size=4,
                             progress=lambda d, t: calls.append((d, t)))
    assert bank.features.shape == (16, backbone.feature_dim)
    assert calls == [(4, 6), (6, 6)]  # images done / total, once per batch
    m = bank.meta
    assert m["backbone"] == "tf_efficientnet_lite0" and m["layers"] == [2, 3]
    assert m["n_images"] == 6 and m["n_patches"] == 6 * 8 * 8 and m["xi"] == 16
    assert m["image_size"] == SIZE and m["feature_dim"] == 152 and m["skipped"] == []
    assert len(m["source_hash"]) == 64 and m["created"].endswith("+00:00") and m["ccad_version"]

    out = bank.save(tmp_path / "saved")
    assert (out / "bank.safetensors").is_file() and (out / "bank.json").is_file()
    back = FeatureBank.load(out)
    assert torch.equal(back.features, bank.features)
    assert back.meta == json.loads(json.dumps(bank.meta))

    # each bank row is a real patch feature of the training images
    with torch.no_grad():
        from ccad.data.convert import to_tensor
        from ccad.data.io import load_image

        x = torch.stack([to_tensor(load_image(s.image_path), SIZE) for s in samples])
        allf = backbone(x).permute(0, 2, 3, 1).reshape(-1, 152)
    exact = torch.cdist(bank.features, allf, compute_mode="donot_use_mm_for_euclid_dist")
    assert exact.min(1).values.max() < 1e-3

    # the app's projection: patch features of a folder through the bank's own backbone
    proj = project_2d(bank, samples=str(image_dir), max_points=100)
    assert proj["bank"].shape == (16, 2) and proj["all"].shape == (100, 2)

    # same files -> same hash and same bank (deterministic)
    again = FeatureBank.build(samples, backbone, size=16, image_size=SIZE, batch_size=4)
    assert again.meta["source_hash"] == m["source_hash"]
    assert torch.equal(again.features, bank.features)


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="bank.safetensors"):
        FeatureBank.load(tmp_path)
    FeatureBank(torch.zeros(3, 5), {"backbone": "x"}).save(tmp_path)
    meta = json.loads((tmp_path / "bank.json").read_text())
    meta["feature_dim"] = 7
    (tmp_path / "bank.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="feature_dim=7"):
        FeatureBank.load(tmp_path)


def test_bad_images_are_skipped_and_reported(image_dir: Path, backbone) -> None:
    (image_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (image_dir / "empty.png").write_bytes(b"")
    paths = sorted(str(p) for p in image_dir.glob("*.png")) + [str(image_dir / "missing.png")]
    bank = FeatureBank.build(paths, backbone, size=8, image_size=SIZE, batch_size=3)
    skipped = {Path(s["path"]).name: s["reason"] for s in bank.meta["skipped"]}
    assert set(skipped) == {"broken.png", "empty.png", "missing.png"}
    assert "not found" in skipped["missing.png"] and "empty" in skipped["empty.png"]
    assert bank.meta["n_images"] == 6
    s = bank.summary()
    assert s["n_skipped"] == 3 and s["xi"] == 8 and s["n_images"] == 6
    with pytest.raises(ValueError, match="no readable image"):
        FeatureBank.build([str(image_dir / "broken.png")], backbone, size=8, image_size=SIZE)


def test_cancel_raises(image_dir: Path, backbone) -> None:
    paths = sorted(str(p) for p in image_dir.glob("*.png"))
    done: list[int] = []
    with pytest.raises(Cancelled):
        FeatureBank.build(paths, backbone, size=8, image_size=SIZE, batch_size=2,
                          progress=lambda d, t: done.append(d), cancel=lambda: len(done) >= 1)
    assert done == [2]  # stopped right after the first batch
    with pytest.raises(Cancelled):
        FeatureBank.build(paths, backbone, size=8, image_size=SIZE, cancel=lambda: True)


def test_tensor_and_batch_sources(backbone) -> None:
    imgs = torch.stack([torch.from_numpy(texture(i)).permute(2, 0, 1).float() / 255 for i in range(4)])
    a = FeatureBank.build(imgs, backbone, size=10, image_size=SIZE, batch_size=2)
    b = FeatureBank.build(iter([imgs[:2], imgs[2:]]), backbone, size=10, image_size=SIZE)
    c = FeatureBank.build([{"image": imgs[:3], "errors": [("x.png", "corrupt")]}, {"image": imgs[3:]}],
                          backbone, size=10, image_size=SIZE)
    # the same images give the same bank whatever the source form (batch sizes differ, so allow float noise)
    assert torch.allclose(a.features, b.features, atol=1e-4) and torch.allclose(a.features, c.features, atol=1e-4)
    assert a.meta["source_hash"] == b.meta["source_hash"] == c.meta["source_hash"]
    assert c.meta["skipped"] == [{"path": "x.png", "reason": "corrupt"}] and c.meta["n_images"] == 4
    # a different image changes the hash
    d = FeatureBank.build(imgs.flip(-1), backbone, size=10, image_size=SIZE)
    assert d.meta["source_hash"] != a.meta["source_hash"]
    with pytest.raises(ValueError, match="between 1 and 1000"):
        FeatureBank.build(imgs, backbone, size=1001, image_size=SIZE)


def test_summary_and_projection(backbone) -> None:
    imgs = torch.stack([torch.from_numpy(texture(i)).permute(2, 0, 1).float() / 255 for i in range(3)])
    bank = FeatureBank.build(imgs, backbone, size=12, image_size=SIZE)
    s = bank.summary()
    assert s["xi"] == 12 and s["feature_dim"] == 152 and s["nn_distance_mean"] > 0
    json.dumps(s)  # plain values only
    with torch.no_grad():
        feats = backbone(imgs[:1])
    proj = project_2d(bank, feats)
    assert proj["bank"].shape == (12, 2) and proj["all"].shape == (64, 2)
    ev = proj["explained_variance"]
    assert 0 < ev[1] <= ev[0] <= 1
    # PC1 of the bank has the largest spread of the projected bank points
    assert proj["bank"][:, 0].var() >= proj["bank"][:, 1].var()
    assert project_2d(bank)["all"] is None
