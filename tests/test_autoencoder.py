"""The latent autoencoder interface (kl / tiny / taef2), TAEF2 and the on-disk latent cache.

Normal tests use small random-init autoencoders and generated images only (no network, no
GPU, no ../shared). One slow test checks the real TAEF2 weights when ../shared has them.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from ccad.data.convert import to_tensor
from ccad.data.io import load_image, save_image
from ccad.data.latent_cache import LATENTS_META, LatentCache, build_latent_cache
from ccad.data.sample import Sample
from ccad.data.synthetic import generate_texture
from ccad.models import TAEF2, AutoencoderNotFound, LatentAutoencoder, load_autoencoder

KINDS = ("kl", "tiny", "taef2")
CHANNELS = {"kl": 4, "tiny": 4, "taef2": 32}


def _textures(n: int, size: int = 64, kind: str = "cloud", seed: int = 0) -> torch.Tensor:
    ims = [torch.from_numpy(generate_texture(kind, size, seed=seed + i)) for i in range(n)]
    return torch.stack(ims)[:, None].repeat(1, 3, 1, 1)


@pytest.fixture(scope="module")
def aes() -> dict[str, LatentAutoencoder]:
    return {k: load_autoencoder(f"{k}:random") for k in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_shapes_downscale_channels_frozen(aes, kind: str) -> None:
    ae = aes[kind]
    assert ae.kind == kind and ae.downscale == 8 and ae.latent_channels == CHANNELS[kind]
    x = _textures(2, 64)
    z = ae.encode(x)
    assert z.shape == (2, CHANNELS[kind], 8, 8) and z.dtype == torch.float32
    y = ae.decode(z)
    assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1
    assert not z.requires_grad and all(not p.requires_grad for p in ae.parameters())
    ae.train()
    assert not ae.backend.training  # the backend stays in eval mode
    assert ae.to("cpu") is ae
    with pytest.raises(ValueError, match="multiple of 8"):
        ae.encode(torch.rand(1, 3, 60, 64))


def test_default_scaling_per_backend(aes) -> None:
    assert aes["kl"].scale == pytest.approx(0.18215) and aes["kl"].shift == 0.0  # config scaling_factor
    assert aes["tiny"].scale == 1.0 and aes["tiny"].shift == 0.0  # tiny latents are already scaled
    assert aes["taef2"].scale == 1.0 and not aes["taef2"].fitted


def test_kl_encode_is_deterministic_posterior_mean(aes) -> None:
    ae = aes["kl"]
    x = _textures(1, 64)
    torch.manual_seed(0)
    a = ae.encode(x)
    torch.manual_seed(1)
    b = ae.encode(x)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)  # the mean, not a sample: no RNG involved
    raw = ae.backend.encode(x * 2 - 1).latent_dist.mean
    assert torch.allclose(ae.encode_raw(x), raw)


@pytest.mark.parametrize("kind", KINDS)
def test_fit_scaling_gives_unit_variance(kind: str) -> None:
    ae = load_autoencoder(f"{kind}:random", seed=3)
    good = _textures(4, 64, kind="granular")
    scale, shift = ae.fit_scaling_from_images(good, batch_size=2)
    assert ae.fitted and scale == ae.scale and shift == ae.shift
    z = ae.encode(good)
    assert abs(float(z.mean())) < 1e-3 and float(z.std()) == pytest.approx(1.0, abs=1e-2)
    # decode inverts the scaling: same images as decoding the raw latents
    assert torch.allclose(ae.decode(z), ae.decode_raw(ae.encode_raw(good)), atol=1e-5)
    ae.fit_scaling(ae.encode_raw(good).numpy())  # arrays work too
    assert ae.scale == pytest.approx(scale, rel=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_save_pretrained_round_trip(tmp_path: Path, kind: str) -> None:
    ae = load_autoencoder(f"{kind}:random", seed=1)
    x = _textures(2, 64)
    ae.fit_scaling_from_images(x)
    ae.save_pretrained(tmp_path / "vae")
    files = sorted(os.listdir(tmp_path / "vae"))
    assert files == ["autoencoder.json", "config.json", "diffusion_pytorch_model.safetensors"]
    meta = json.loads((tmp_path / "vae" / "autoencoder.json").read_text())
    assert meta["kind"] == kind and meta["spec"] == f"{kind}:random@seed=1" and meta["fitted"]
    back = LatentAutoencoder.from_pretrained(tmp_path / "vae")
    assert (back.kind, back.scale, back.shift) == (kind, ae.scale, ae.shift)
    torch.testing.assert_close(back.encode(x), ae.encode(x), rtol=1e-4, atol=1e-5)
    # the same folder through the loader: bare path, kind:path and a pipeline-style parent
    torch.testing.assert_close(load_autoencoder(str(tmp_path / "vae")).encode(x), ae.encode(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(load_autoencoder(f"{kind}:{tmp_path / 'vae'}").encode(x), ae.encode(x),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(load_autoencoder(f"{kind}:{tmp_path}").encode(x), ae.encode(x), rtol=1e-4, atol=1e-5)


def test_plain_diffusers_folder_and_sd_pipeline_layout(tmp_path: Path, aes) -> None:
    kl = aes["kl"]
    kl.backend.save_pretrained(tmp_path / "sd" / "vae")  # what an SD pipeline folder holds
    ae = load_autoencoder(f"kl:{tmp_path / 'sd'}")
    x = _textures(1, 64)
    assert ae.scale == pytest.approx(0.18215)
    torch.testing.assert_close(ae.encode(x), kl.encode(x), rtol=1e-4, atol=1e-5)
    aes["tiny"].backend.save_pretrained(tmp_path / "taesd")
    assert load_autoencoder(f"tiny:{tmp_path / 'taesd'}").latent_channels == 4


def test_taef2_from_original_weights_strict(tmp_path: Path) -> None:
    ref = TAEF2(channels=16, blocks_per_stage=1)
    enc = {k: v.half() for k, v in ref.encoder.layers.state_dict().items()}
    dec = {k: v.half() for k, v in ref.decoder.layers.state_dict().items()}
    # the layout of the real files: Sequential indices, pool branch in blocks 11-13 / 3-5
    # 1 block per stage here: 0 conv, 1 block, 2 down, 3 block, 4 down, 5 block, 6 down, 7 block+pool, 8 conv
    assert "8.weight" in enc and "7.pool.1.weight" in enc and "5.pool.0.weight" not in enc
    assert "3.pool.3.weight" in dec and "0.weight" not in dec  # decoder: 0 is the tanh clamp
    torch.save(enc, tmp_path / "taef2_encoder.pth")
    torch.save(dec, tmp_path / "taef2_decoder.pth")
    m = TAEF2.from_original_weights(tmp_path / "taef2_encoder.pth", tmp_path / "taef2_decoder.pth",
                                    channels=16, blocks_per_stage=1)
    assert torch.allclose(m.encoder.layers[0].weight, ref.encoder.layers[0].weight.half().float())
    with pytest.raises(ValueError, match="taef2_encoder.pth"):  # the default config (64 ch) does not fit
        load_autoencoder(f"taef2:{tmp_path}")


def test_taef2_original_weights_mismatch_names_file_and_key(tmp_path: Path) -> None:
    ref = TAEF2(channels=16, blocks_per_stage=1)
    torch.save(ref.encoder.layers.state_dict(), tmp_path / "taef2_encoder.pth")
    dec = ref.decoder.layers.state_dict()
    torch.save(dec, tmp_path / "taef2_decoder.pth")
    with pytest.raises(ValueError, match=r"taef2_encoder\.pth.*'4\.conv\.0\.weight'"):
        TAEF2.from_original_weights(tmp_path / "taef2_encoder.pth", tmp_path / "taef2_decoder.pth",
                                    channels=16, blocks_per_stage=3)  # keys 4.*, ... are missing
    del dec["13.bias"]  # the output conv of the 1-block decoder
    torch.save(dec, tmp_path / "taef2_decoder.pth")
    with pytest.raises(ValueError, match=r"taef2_decoder\.pth.*'13\.bias'"):
        TAEF2.from_original_weights(tmp_path / "taef2_encoder.pth", tmp_path / "taef2_decoder.pth",
                                    channels=16, blocks_per_stage=1)


def test_missing_autoencoder_raises_with_howto(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    for spec in (f"taef2:{tmp_path / 'nowhere'}", f"kl:{tmp_path}",  # missing / empty folder
                 "kl:no-such-org/no-such-vae-xyz", "tiny:madebyollin/not-cached-taesd"):
        with pytest.raises(AutoencoderNotFound) as ei:
            load_autoencoder(spec, cache_dir=str(tmp_path / "hf" / "hub"))
        msg = str(ei.value)
        assert isinstance(ei.value, FileNotFoundError)
        assert "taef2:/path/to/folder-with-taef2_encoder.pth" in msg
        assert "huggingface-cli download stabilityai/sd-vae-ft-mse" in msg
        assert "local diffusers folder" in msg
    with pytest.raises(ValueError, match="unknown autoencoder kind"):
        load_autoencoder("gan:whatever")


# ---------------------------------------------------------------------- latent cache
def _write_images(root: Path, n: int, size: int = 64, category: str = "tex") -> list[Sample]:
    out = []
    for i in range(n):
        p = save_image(root / f"{category}_{i:02d}.png", generate_texture("woven", size, seed=i))
        out.append(Sample(str(p), label=0, category=category, split="train"))
    return out


class _CountingAE:
    """Wraps a LatentAutoencoder and counts encoder calls."""

    def __init__(self, ae: LatentAutoencoder) -> None:
        self.ae, self.calls = ae, 0

    def __getattr__(self, name):
        return getattr(self.ae, name)

    def encode_raw(self, x):
        self.calls += 1
        return self.ae.encode_raw(x)


def test_latent_cache_encodes_once_and_reuses(tmp_path: Path) -> None:
    samples = _write_images(tmp_path / "img", 5, category="a") + _write_images(tmp_path / "img", 1, category="b")
    ae = _CountingAE(load_autoencoder("taef2:random"))
    seen: list[tuple[int, int]] = []
    cache = build_latent_cache(samples, ae, 64, tmp_path / "run" / "latents", batch_size=4,
                               progress=lambda d, t: seen.append((d, t)), fit_scaling=True)
    assert ae.calls == 2 and seen[-1] == (6, 6)
    assert isinstance(cache.latents, np.memmap) and cache.latents.dtype == np.float16
    assert (tmp_path / "run" / "latents" / "latents.f16.npy").is_file()
    assert len(cache) == 6 and cache.latents.shape == (6, 32, 8, 8)
    # fitted scaling: stored latents are zero-mean, unit-variance; the autoencoder got the scale
    lat = np.asarray(cache.latents, dtype=np.float64)
    assert abs(lat.mean()) < 1e-2 and lat.std() == pytest.approx(1.0, abs=1e-2)
    assert ae.ae.fitted and cache.scale == ae.ae.scale and cache.shift == ae.ae.shift
    meta = json.loads((tmp_path / "run" / "latents" / LATENTS_META).read_text())
    assert meta["shape"] == [6, 32, 8, 8] and meta["categories"][-1] == "b" and meta["image_size"] == [64, 64]
    assert meta["autoencoder"]["kind"] == "taef2" and len(meta["hash"]) == 64
    # matches a fresh encode with the fitted scaling (fp16 storage)
    direct = ae.ae.encode(to_tensor(load_image(samples[0].image_path), 64)[None])
    assert torch.allclose(cache[0]["latent"], direct[0], atol=2e-2)

    # same sources + autoencoder: reused, no encoding, the scaling is put back
    ae2 = _CountingAE(load_autoencoder("taef2:random"))
    again = build_latent_cache(samples, ae2, 64, tmp_path / "run" / "latents", fit_scaling=True)
    assert ae2.calls == 0 and again.hash == cache.hash and ae2.ae.scale == cache.scale
    # a touched file changes the hash: re-encoded
    os.utime(samples[0].image_path, ns=(1, 1))
    ae3 = _CountingAE(load_autoencoder("taef2:random"))
    build_latent_cache(samples, ae3, 64, tmp_path / "run" / "latents", batch_size=8, fit_scaling=True)
    assert ae3.calls == 1
    # another autoencoder (different weights) is another cache
    ae4 = _CountingAE(load_autoencoder("taef2:random", seed=5))
    build_latent_cache(samples, ae4, 64, tmp_path / "run" / "latents", batch_size=8, fit_scaling=True)
    assert ae4.calls == 1


def test_latent_cache_items_images_hflip_and_corrupt_file(tmp_path: Path) -> None:
    samples = _write_images(tmp_path / "img", 3)
    bad = tmp_path / "img" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    samples.insert(1, Sample(str(bad), label=0, category="tex", split="train"))
    ae = load_autoencoder("kl:random")
    cache = build_latent_cache(samples, ae, 64, tmp_path / "cache", batch_size=2, hflip=True,
                               dtype="float32", with_images=True)
    assert [Path(p).name for p, _ in cache.errors] == ["broken.png"]
    assert cache.latents.dtype == np.float32 and (tmp_path / "cache" / "latents.npy").is_file()
    assert len(cache) == 6  # 3 readable images x (original, flipped)
    item = cache[0]
    assert {"latent", "image", "category", "index"} <= set(item)
    assert item["latent"].shape == (4, 8, 8) and item["latent"].dtype == torch.float32
    assert item["image"].shape == (3, 64, 64) and item["category"] == "tex" and item["index"] == 0
    assert item["sample_index"] == 0 and cache[1]["sample_index"] == 2  # the broken one is skipped
    flipped = cache[3]
    assert flipped["flipped"] and flipped["sample_index"] == 0
    assert torch.allclose(flipped["image"], item["image"].flip(-1))
    assert torch.allclose(flipped["latent"], ae.encode(item["image"].flip(-1)[None])[0], atol=1e-5)
    # without images: no pixel reads; a DataLoader batches the items
    plain = LatentCache(tmp_path / "cache")
    assert "image" not in plain[0]
    batch = next(iter(torch.utils.data.DataLoader(plain, batch_size=4)))
    assert batch["latent"].shape == (4, 4, 8, 8)
    # picklable for spawned DataLoader workers: the memmap is reopened, not copied
    again = pickle.loads(pickle.dumps(plain))
    assert again._latents is None and torch.equal(again[2]["latent"], plain[2]["latent"])


def test_latent_cache_cancel_leaves_no_cache(tmp_path: Path) -> None:
    from ccad.features.bank import Cancelled

    samples = _write_images(tmp_path / "img", 4)
    calls = iter([False, True])
    with pytest.raises(Cancelled):
        build_latent_cache(samples, load_autoencoder("tiny:random"), 64, tmp_path / "c", batch_size=2,
                           cancel=lambda: next(calls))
    assert not (tmp_path / "c" / LATENTS_META).exists()
    assert not any(p.suffix == ".npy" for p in (tmp_path / "c").iterdir())


# ---------------------------------------------------------------------- the real TAEF2 weights
SHARED_WEIGHTS = Path(__file__).resolve().parents[1] / ".." / "shared" / "weights"


@pytest.mark.slow
def test_real_taef2_reconstructs_texture() -> None:
    enc, dec = SHARED_WEIGHTS / "taef2_encoder.pth", SHARED_WEIGHTS / "taef2_decoder.pth"
    if not (enc.is_file() and dec.is_file()):
        pytest.skip("../shared/weights/taef2_*.pth not present")
    ae = load_autoencoder(f"taef2:{SHARED_WEIGHTS}")
    assert ae.latent_channels == 32 and ae.downscale == 8
    x = torch.cat([_textures(1, 256, "cloud"), _textures(1, 256, "granular")])

    def psnr(a: torch.Tensor, b: torch.Tensor) -> list[float]:
        return (10 * torch.log10(1 / ((a - b) ** 2).mean(dim=(1, 2, 3)))).tolist()

    raw = ae.encode_raw(x)
    p01 = psnr(ae.decode_raw(raw), x)
    # measured on this CPU, fp32: cloud 41.5 dB, granular 26.4 dB with [0, 1] inputs;
    # the same images fed as [-1, 1] reconstruct at ~7 dB (so the encoder expects [0, 1])
    assert p01[0] > 36 and p01[1] > 23, p01
    wrong = psnr(ae.decode_raw(ae.encode_raw(x * 2 - 1)), x)
    assert max(wrong) < 15, wrong
    assert -5 < float(raw.min()) and float(raw.max()) < 5  # raw latents roughly in [-3, 3]
