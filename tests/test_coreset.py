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
