"""PatchCoreScorer with the real lite0 backbone on generated textures."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ccad.features import PatchCoreScorer, get_backbone, nearest_distances

SIZE = 96


def texture(seed: int, size: int = SIZE) -> np.ndarray:
    """Fine grid texture with random phase and noise, float32 H x W x 3 in [0, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    px, py = rng.uniform(0, 2 * np.pi, 2)
    g = 0.5 + 0.2 * np.sin(2 * np.pi * xx / 6 + px) + 0.2 * np.sin(2 * np.pi * yy / 6 + py)
    g = g + rng.normal(0, 0.03, (size, size))
    return np.clip(np.stack([g, g, g], -1), 0, 1).astype(np.float32)


def with_defect(img: np.ndarray, seed: int) -> tuple[np.ndarray, tuple[slice, slice]]:
    """Paste a dark smooth blob (a stain) of 16 x 16 pixels."""
    rng = np.random.default_rng(seed)
    out = img.copy()
    y, x = (int(v) for v in rng.integers(24, SIZE - 40, 2))
    out[y : y + 16, x : x + 16] = 0.08
    return out, (slice(y, y + 16), slice(x, x + 16))


def to_batch(imgs: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module")
def scorer() -> PatchCoreScorer:
    bb = get_backbone("tf_efficientnet_lite0")
    train = to_batch([texture(i) for i in range(10)])
    return PatchCoreScorer(bb, ratio=0.1, image_size=SIZE, batch_size=4).fit(train)


def test_memory_bank_size_follows_ratio(scorer: PatchCoreScorer) -> None:
    h = w = SIZE // 8
    assert scorer.n_images == 10 and scorer.n_patches == 10 * h * w
    assert scorer.memory_bank.shape == (int(np.ceil(0.1 * 10 * h * w)), 152)


def test_fit_features_is_fit_without_the_backbone(scorer: PatchCoreScorer) -> None:
    """Precomputed features in fit's batches give fit's memory, for a given seed and mode."""
    train = to_batch([texture(i) for i in range(10)])
    with torch.no_grad():
        batches = [scorer.backbone(b) for b in train.split(4)]
    again = PatchCoreScorer(scorer.backbone, ratio=0.1, image_size=SIZE, batch_size=4).fit_features(batches)
    assert torch.equal(again.memory_bank, scorer.memory_bank)
    assert (again.n_images, again.n_patches, again.grid) == (scorer.n_images, scorer.n_patches, scorer.grid)
    kw = dict(ratio=0.1, image_size=SIZE, batch_size=4, seed=3, coreset="legacy")
    fitted = PatchCoreScorer(scorer.backbone, **kw).fit(train)
    assert torch.equal(PatchCoreScorer(scorer.backbone, **kw).fit_features(iter(batches), n_images=10).memory_bank,
                       fitted.memory_bank)
    with pytest.raises(ValueError, match="no features"):
        PatchCoreScorer(scorer.backbone).fit_features([])


def test_defect_scores_higher_than_clean(scorer: PatchCoreScorer) -> None:
    clean = [texture(100 + i) for i in range(4)]
    bad, boxes = zip(*(with_defect(texture(200 + i), i) for i in range(4)))
    x = to_batch(clean + list(bad))
    maps = scorer.score_maps(x)
    assert maps.shape == (8, 1, SIZE // 8, SIZE // 8)
    scores = maps.flatten(1).max(1).values
    assert scores[4:].min() > scores[:4].max()
    assert torch.allclose(scorer.image_scores(x), scores)
    # the hottest cell lies on the pasted defect
    for i, (ys, xs) in enumerate(boxes):
        m = maps[4 + i, 0]
        cy, cx = divmod(int(m.argmax()), m.shape[1])
        assert ys.start - 8 <= cy * 8 + 4 <= ys.stop + 8 and xs.start - 8 <= cx * 8 + 4 <= xs.stop + 8
    # a training image scores (near) zero: its patches are in or next to the memory bank
    train_like = scorer.score_maps(to_batch([texture(0)]))
    assert float(train_like.mean()) < float(maps[:4].mean())


def test_reweighting_keeps_ranking(scorer: PatchCoreScorer) -> None:
    clean = [texture(300 + i) for i in range(3)]
    bad = [with_defect(texture(400 + i), i)[0] for i in range(3)]
    rw = PatchCoreScorer(scorer.backbone, ratio=0.1, image_size=SIZE, reweight=9)
    rw.memory_bank = scorer.memory_bank
    s = rw.image_scores(to_batch(clean + bad))
    plain = scorer.image_scores(to_batch(clean + bad))
    assert s[3:].min() > s[:3].max()
    assert torch.all(s <= plain + 1e-6) and torch.all(s > 0)  # weights lie in (0, 1)


def test_tensors_round_trip_through_safetensors(scorer: PatchCoreScorer, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    save_file(scorer.to_tensors(), str(tmp_path / "pc.safetensors"))
    back = PatchCoreScorer.from_tensors(load_file(str(tmp_path / "pc.safetensors")), scorer.backbone)
    assert torch.equal(back.memory_bank, scorer.memory_bank)
    assert (back.ratio, back.k, back.image_size, back.n_images) == (0.1, 1, SIZE, 10)
    x = to_batch([texture(7), with_defect(texture(8), 1)[0]])
    assert torch.equal(back.score_maps(x), scorer.score_maps(x))
    # a memory bank from another backbone/layer choice is refused with a clear message
    other = get_backbone("tf_efficientnet_lite0", layers=(3,))
    with pytest.raises(ValueError, match="152-dim features but backbone"):
        PatchCoreScorer.from_tensors(scorer.to_tensors(), other)
    saved = scorer.save(tmp_path / "dir")
    assert torch.equal(PatchCoreScorer.load(saved).memory_bank, scorer.memory_bank)


def test_chunked_nearest_distances_match_full() -> None:
    g = torch.Generator().manual_seed(0)
    q, b = torch.randn(300, 16, generator=g), torch.randn(70, 16, generator=g)
    full = torch.cdist(q, b)
    d, i = nearest_distances(q, b, k=3, chunk_elems=500)  # 7 rows per chunk
    ref = full.topk(3, dim=1, largest=False)
    assert torch.allclose(d, ref.values, atol=1e-4) and torch.equal(i, ref.indices)


def test_unfitted_and_bad_arguments() -> None:
    bb = get_backbone("tf_efficientnet_lite0")
    with pytest.raises(RuntimeError, match="fit"):
        PatchCoreScorer(bb, image_size=64).score_maps(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="ratio"):
        PatchCoreScorer(bb, ratio=0.0)
