"""Greedy k-center coresets: exactness against brute force, streaming quality and memory bound."""

from __future__ import annotations

import pytest
import torch

from ccad.features.coreset import (
    StreamingCoreset,
    covering_radius,
    greedy_coreset,
    greedy_indices,
    random_projection,
    validate_bank_size,
)


def _brute_force_greedy(x: torch.Tensor, k: int, start: int) -> list[int]:
    """Textbook Gonzalez greedy with a full pairwise distance matrix."""
    d = torch.cdist(x.double(), x.double())
    picks = [start]
    for _ in range(k - 1):
        mind = d[:, picks].min(dim=1).values
        picks.append(int(mind.argmax()))
    return picks


def _clustered(n: int, dim: int = 24, clusters: int = 40, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(clusters, dim, generator=g) * 6
    sizes = torch.randint(clusters, (n,), generator=g)
    spread = torch.rand(clusters, 1, generator=g) * 1.5 + 0.2
    return centers[sizes] + torch.randn(n, dim, generator=g) * spread[sizes]


def test_identity_projection_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 8, generator=g)
    for start in (0, 17, 299):
        ours = greedy_coreset(x, 25, proj_dim=None, start=start).tolist()
        assert ours == _brute_force_greedy(x, 25, start)
    # proj_dim >= D is the identity as well
    assert greedy_coreset(x, 10, proj_dim=8, start=5).tolist() == _brute_force_greedy(x, 10, 5)


def test_greedy_properties_and_projection() -> None:
    x = _clustered(2000, dim=256)
    idx = greedy_coreset(x, 50, proj_dim=32, seed=3)
    assert idx.dtype == torch.long and idx.shape == (50,)
    assert len(set(idx.tolist())) == 50
    assert torch.equal(idx, greedy_coreset(x, 50, proj_dim=32, seed=3))  # deterministic
    assert torch.equal(random_projection(256, 32, seed=7), random_projection(256, 32, seed=7))
    # the projected greedy still covers the data far better than random picks
    rand = torch.randperm(2000, generator=torch.Generator().manual_seed(0))[:50]
    assert covering_radius(x, x[idx]) < 0.7 * covering_radius(x, x[rand])
    # k >= N returns everything
    assert greedy_coreset(x[:7], 10).tolist() == list(range(7))
    with pytest.raises(ValueError, match="N x D"):
        greedy_coreset(torch.zeros(3, 4, 5), 2)


def test_greedy_is_a_2_approximation_on_separated_clusters() -> None:
    """With k = number of well-separated clusters, greedy puts one centre in each cluster."""
    x = _clustered(3000, dim=16, clusters=12, seed=4)
    g = torch.Generator().manual_seed(4)
    centers = torch.randn(12, 16, generator=g) * 6
    idx = greedy_coreset(x, 12, proj_dim=None)
    nearest_cluster = torch.cdist(x[idx], centers).argmin(1)
    assert len(set(nearest_cluster.tolist())) == 12


def test_streaming_covers_nearly_as_well_as_one_shot() -> None:
    x = _clustered(12000, dim=32, clusters=60, seed=2)
    k = 100
    one_shot = covering_radius(x, x[greedy_coreset(x, k, proj_dim=16)])
    sc = StreamingCoreset(k, buffer=1200, proj_dim=16, seed=0)
    for batch in x.split(700):
        sc.update(batch)
    bank = sc.result()
    assert bank.shape == (k, 32)
    streamed = covering_radius(x, bank)
    randoms = [
        covering_radius(x, x[torch.randperm(len(x), generator=torch.Generator().manual_seed(s))[:k]])
        for s in range(3)
    ]
    assert sc.reductions > 3  # the stream really was reduced several times
    assert streamed <= 1.25 * one_shot
    assert streamed < 0.5 * min(randoms)


def test_streaming_buffer_never_exceeds_cap() -> None:
    sc = StreamingCoreset(20, buffer=300, reduce_to=150, proj_dim=None)
    g = torch.Generator().manual_seed(0)
    sizes = [50, 1000, 7, 299, 300, 301, 1, 2500]
    for n in sizes:
        sc.update(torch.randn(n, 6, generator=g))
        assert len(sc) <= 300
    assert sc.peak <= 300 and sc.seen == sum(sizes)
    assert sc.result().shape == (20, 6)
    # B x D x h x w maps are flattened into patches
    sc2 = StreamingCoreset(5, buffer=40)
    sc2.update(torch.randn(2, 6, 4, 4))
    assert sc2.seen == 32 and sc2.result().shape == (5, 6)


def test_streaming_single_batch_equals_one_shot_without_reduction() -> None:
    g = torch.Generator().manual_seed(9)
    x = torch.randn(500, 10, generator=g)
    sc = StreamingCoreset(30, buffer=1000, proj_dim=None, seed=4)
    sc.update(x)
    assert sc.reductions == 0
    start = int(torch.randint(500, (1,), generator=torch.Generator().manual_seed(4 + 2)))
    assert torch.equal(sc.result(), x[greedy_indices(x, 30, start=start)])


def test_validation_messages() -> None:
    assert validate_bank_size(200) == 200
    with pytest.raises(ValueError, match="between 1 and 1000"):
        validate_bank_size(1001)
    with pytest.raises(ValueError, match="between 1 and 1000"):
        validate_bank_size(0)
    with pytest.raises(ValueError, match="integer"):
        validate_bank_size(2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reduce_to"):
        StreamingCoreset(10, buffer=100, reduce_to=100)
    sc = StreamingCoreset(3, buffer=10)
    sc.update(torch.zeros(4, 5))
    with pytest.raises(ValueError, match="feature dim 6 differs"):
        sc.update(torch.zeros(2, 6))
    with pytest.raises(ValueError, match="no features"):
        StreamingCoreset(3).result()


def _patch_maps(n_images: int, dim: int = 64, hw: int = 16, clusters: int = 24, rare: int = 6,
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of patch features ``n x dim x hw x hw`` like a backbone's, and each patch's cluster:
    every image mixes a few of ``clusters`` common clusters; ``rare`` further clusters appear as a
    3-patch blob in one image each (a rare good structure a coreset must not lose)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(clusters + rare, dim, generator=g) * 4
    maps, labels = [], []
    for i in range(n_images):
        lab = torch.randint(clusters, (hw * hw,), generator=g)
        if i < rare:
            lab[:3] = clusters + i
        x = centers[lab] + 0.3 * torch.randn(hw * hw, dim, generator=g)
        maps.append(x.T.reshape(dim, hw, hw))
        labels.append(lab)
    return torch.stack(maps), torch.cat(labels)


def _streamed(maps: torch.Tensor, k: int, proj_dim, prereduce, exact_budget, seed: int = 0) -> StreamingCoreset:
    """A StreamingCoreset (buffer 8k, reductions to k) fed ``maps`` four images at a time."""
    sc = StreamingCoreset(k, buffer=8 * k, reduce_to=k, proj_dim=proj_dim, seed=seed,
                          prereduce=prereduce, exact_budget=exact_budget)
    for b in maps.split(4):
        sc.update(b)
    assert sc.seen == maps.shape[0] * maps.shape[2] * maps.shape[3]
    return sc


def _stream(maps: torch.Tensor, k: int, mode: str, seed: int = 0) -> torch.Tensor:
    from ccad.features.coreset import coreset_mode

    cfg = coreset_mode(mode)
    return _streamed(maps, k, cfg["proj_dim"], cfg["prereduce"], cfg["exact_budget"], seed=seed).result()


def test_fast_coreset_keeps_every_cluster_even_rare_ones() -> None:
    """The fast mode (32-dim projection, 10 % per-image pre-reduction) still picks every cluster,
    including structures that occur in a single image, and covers the patches about as well as
    the legacy selection."""
    maps, labels = _patch_maps(40, dim=160)
    x = maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1])
    k = 60
    fast = _stream(maps, k, "fast")
    legacy = _stream(maps, k, "legacy")
    assert fast.shape == legacy.shape == (k, 160)
    centers = torch.stack([x[labels == c].mean(0) for c in range(int(labels.max()) + 1)])
    picked = set(torch.cdist(fast, centers).argmin(1).tolist())
    assert picked == set(range(len(centers)))  # all 30 clusters, the 6 one-image ones included
    assert covering_radius(x, fast) <= 1.2 * covering_radius(x, legacy)


def test_fast_coreset_is_deterministic_and_seeded() -> None:
    maps, _ = _patch_maps(12, dim=160, seed=3)
    a, b = _stream(maps, 30, "fast", seed=5), _stream(maps, 30, "fast", seed=5)
    assert torch.equal(a, b)
    assert torch.equal(random_projection(160, 32, seed=5), random_projection(160, 32, seed=5))
    assert not torch.equal(random_projection(160, 32, seed=5), random_projection(160, 32, seed=6))


def test_fast_final_selection_runs_on_the_original_features() -> None:
    """In ``fast`` mode only the per-image pre-cut uses the 32-dim projection: the final picks
    are the exact greedy k-center of the kept rows in feature space (within the budget), so the
    bank covers the patches the pre-cut kept as the true greedy would, not as the projection
    sees them."""
    from ccad.features.coreset import coreset_mode

    maps, _ = _patch_maps(16, dim=160, seed=4)
    cfg = coreset_mode("fast")
    sc = _streamed(maps, 40, cfg["proj_dim"], cfg["prereduce"], cfg["exact_budget"])
    kept = sc.buffer_features()
    start = int(torch.randint(kept.shape[0], (1,), generator=torch.Generator().manual_seed(2)))
    exact = greedy_indices(kept, 40, start=start)
    assert sc.result_indices().tolist() == exact.tolist()
    projected = greedy_indices(kept @ random_projection(160, 32, seed=0), 40, start=start)
    assert projected.tolist() != exact.tolist()  # the projection would have chosen otherwise
    # a budget too small for the exact pass falls back to the projection
    small = _streamed(maps, 40, 32, cfg["prereduce"], exact_budget=1.0)
    assert small.result_indices().tolist() == projected.tolist()
    # and the budget covers a bank of MTD quick's size (686 images x 1024 patches of 152 dims,
    # pre-cut to 10 %, memory 1 %: 7 025 picks), where the projected final pass lost tail coverage
    k, rows, dim = 7025, 686 * 103, 152
    assert k * rows * dim <= cfg["exact_budget"]


def test_grouped_greedy_is_the_greedy_of_each_group() -> None:
    from ccad.features.coreset import greedy_indices_grouped

    z = torch.randn(3, 200, 8, generator=torch.Generator().manual_seed(2))
    picks = greedy_indices_grouped(z, 20)
    assert picks.shape == (3, 20)
    for i in range(3):  # starts at the row farthest from the group mean, then plain greedy
        assert int(picks[i, 0]) == int(((z[i] - z[i].mean(0)) ** 2).sum(1).argmax())
        assert picks[i].tolist() == greedy_indices(z[i], 20, start=int(picks[i, 0])).tolist()


def test_legacy_selection_stays_selectable() -> None:
    """``legacy`` reproduces the earlier selection (128-dim projection, every patch, one-shot
    greedy always projected); unknown modes are refused with the known ones named."""
    from ccad.config import ConfigError
    from ccad.features.coreset import CORESET_MODES, coreset_mode
    from ccad.features.patchcore import PatchCoreScorer
    from ccad.methods import get_method

    assert set(CORESET_MODES) == {"fast", "legacy"}
    pc = PatchCoreScorer(None, coreset="legacy")
    assert pc.proj_dim == 128 and pc._coreset["prereduce"] is None
    assert PatchCoreScorer(None).coreset == "fast" and PatchCoreScorer(None).proj_dim == 32
    x = _clustered(3000, dim=160, seed=1)
    start = int(torch.randint(3000, (1,), generator=torch.Generator().manual_seed(1)))
    want = greedy_indices(x @ random_projection(160, 128, seed=0), 40, start=start)
    assert torch.equal(greedy_coreset(x, 40, mode="legacy"), want)
    assert torch.equal(greedy_coreset(x, 40, mode="fast"), greedy_coreset(x, 40, proj_dim=None))  # small: exact
    with pytest.raises(ValueError, match="known: \\['fast', 'legacy'\\]"):
        coreset_mode("quick")
    cfg = get_method("patchcore").default_config()
    assert cfg.coreset == "fast"
    cfg.coreset = "nope"
    with pytest.raises(ConfigError, match="method.coreset"):
        cfg.validate()
