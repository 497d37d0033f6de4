"""Greedy k-center coresets, one-shot and streaming.

PatchCore (Roth et al. 2022, sec. 3.2, Algorithm 1) selects its memory bank ``M_C`` by the
greedy k-center (minimax facility location) rule

    m_i = argmax_{m in M \\ M_C} min_{n in M_C} || psi(m) - psi(n) ||_2,

where ``psi`` is a random linear projection to ~128 dims (Johnson-Lindenstrauss) that makes the
distance computations cheap. The CCAD paper builds its coarse feature bank ``B_c`` of fixed size
``xi`` the same way (CCAD sec. 3.2, eq. 6: ``B_c = Coreset(D, xi)``).

:func:`greedy_coreset` is that algorithm: it keeps one vector of current min-distances (``N``
floats) and updates it with the distance to the newly chosen centre, so memory is ``O(N)`` and
no ``N x N`` matrix is ever formed.

:class:`StreamingCoreset` applies it to data that does not fit in memory (the patch features of
thousands of images) by *merge-and-reduce*; see its docstring for the argument why the result
still approximates the one-shot greedy coreset.

CPU speed (:data:`CORESET_MODES`). Each greedy pick costs one pass over the ``N x d`` candidate
matrix, so selection costs ``~ N * k * d``. PatchCore (Roth et al. 2022, sec. 3.2) notes that by
the Johnson-Lindenstrauss lemma a random linear projection ``psi`` to a low dimension keeps the
pairwise distances within a small factor, so the greedy can run in the projected space; the
``fast`` mode projects to 32 dims (the 152-dim lite0 features were projected to 128 before) and
first reduces each image's ``h * w`` patches to a greedy 10 % of them (:meth:`StreamingCoreset.
update`, ``prereduce``), which cuts ``N`` tenfold: by the composition argument below, a patch
dropped there lies within the image's small covering radius of a kept one. The final ``k`` picks
from the kept rows then run on the original features (exact distances; the projection only speeds
the pre-cut), within a multiply-add budget. The ``legacy`` mode keeps the earlier selection for
comparison (``python -m benchmarks bank_speed``).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

__all__ = [
    "greedy_coreset",
    "greedy_indices",
    "greedy_indices_grouped",
    "CORESET_MODES",
    "DEFAULT_CORESET",
    "coreset_mode",
    "random_projection",
    "covering_radius",
    "StreamingCoreset",
    "MAX_BANK_SIZE",
    "validate_bank_size",
]

#: Coreset selection settings by name (``PatchCoreScorer(coreset=...)``, PatchCore's
#: ``method.coreset``). ``legacy`` is the selection before the CPU-speed work (projection to 128
#: dims, every patch enters merge-and-reduce); ``fast`` (default) projects to ``proj_dim`` dims and
#: first keeps a greedy ``prereduce`` share of each image's patches (see :class:`StreamingCoreset`);
#: its final selection from the kept rows runs on the original features whenever that costs at most
#: ``exact_budget`` multiply-adds (1e12: about a minute on 2 cores; MTD quick's 7 025 picks from
#: 70 k rows x 152 dims are 7.5e10, +4 s), else in the projection. Chosen by measurement on MTD
#: lite0 features (benchmarks/bank_speed.py, ``--part seeds``: the exact final selection covered
#: the training patches better at the 99.9 % quantile on every seed than the projected one).
CORESET_MODES: dict[str, dict[str, Any]] = {
    "fast": {"proj_dim": 32, "prereduce": 0.1, "exact_budget": 1e12, "oneshot_exact_budget": 2e9},
    "legacy": {"proj_dim": 128, "prereduce": None, "exact_budget": 4e10, "oneshot_exact_budget": 0.0},
}
DEFAULT_CORESET = "fast"


def coreset_mode(name: str) -> dict[str, Any]:
    """The settings of coreset mode ``name`` (a copy); ValueError names the known modes."""
    if name not in CORESET_MODES:
        raise ValueError(f"unknown coreset mode {name!r}; known: {sorted(CORESET_MODES)}")
    return dict(CORESET_MODES[name])


#: Largest coarse-bank size ``xi`` allowed (CCAD: xi <= 1000; 100-200 suffices, Table 5).
MAX_BANK_SIZE = 1000


def validate_bank_size(xi: int, maximum: int = MAX_BANK_SIZE, name: str = "size") -> int:
    """Check a coreset size ``xi`` (an int in ``[1, maximum]``) and return it as ``int``."""
    if isinstance(xi, bool) or not hasattr(xi, "__index__"):
        raise ValueError(f"{name} (the bank size xi) must be an integer, got {xi!r}")
    xi = int(xi)
    if xi < 1 or xi > maximum:
        raise ValueError(
            f"{name} (the bank size xi) must be between 1 and {maximum} (CCAD uses xi <= 1000; "
            f"100-200 is enough), got {xi}"
        )
    return xi


def random_projection(
    dim: int, proj_dim: int, seed: int = 0, device: torch.device | str | None = None
) -> torch.Tensor:
    """Fixed-seed Gaussian matrix ``dim x proj_dim`` scaled by ``1/sqrt(proj_dim)`` (the JL map
    ``psi`` of PatchCore sec. 3.2); the same seed always gives the same matrix."""
    g = torch.Generator().manual_seed(int(seed))
    m = torch.randn(dim, proj_dim, generator=g) / math.sqrt(proj_dim)
    return m.to(device) if device is not None else m


def _project(x: torch.Tensor, proj_dim: Optional[int], seed: int) -> torch.Tensor:
    x = x.float()
    if proj_dim is None or proj_dim <= 0 or proj_dim >= x.shape[1]:
        return x
    return x @ random_projection(x.shape[1], proj_dim, seed, x.device)


def greedy_indices(
    z: torch.Tensor, k: int, start: int = 0, min_dist: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Greedy k-center on already projected points ``z`` (``N x d``), exact in ``z``-space.

    Starts from ``start``, then repeatedly takes the point farthest from the chosen set and
    lowers the running min-distances with its distances (PatchCore Algorithm 1). Memory: one
    ``N``-vector of squared distances. Returns ``k`` distinct indices (``k <= N``) in pick order.

    ``min_dist`` (squared distances to an already chosen set) lets a caller continue an earlier
    selection; when given, ``start`` is ignored and the first pick is the farthest point.
    """
    n = z.shape[0]
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=z.device)
    k = min(int(k), n)
    z = z.float()
    sq = (z * z).sum(1)
    picks = torch.empty(k, dtype=torch.long, device=z.device)
    if min_dist is None:
        cur = int(start)
        if not 0 <= cur < n:
            raise ValueError(f"greedy_indices: start={start} outside [0, {n})")
        picks[0] = cur
        d = (sq - 2.0 * (z @ z[cur]) + sq[cur]).clamp_min_(0.0)
        d[cur] = 0.0
        first = 1
    else:
        d = min_dist.clone().float()
        first = 0
    nd = torch.empty_like(sq)
    for i in range(first, k):
        cur_t = torch.argmax(d)
        picks[i] = cur_t
        # ||z - c||^2 = |z|^2 - 2 z.c + |c|^2 in one fused matrix-vector product and two in-place
        # passes (no temporaries); tiny negative rounding is harmless to the argmax
        torch.addmv(sq, z, z[cur_t], alpha=-2.0, out=nd)
        nd.add_(sq[cur_t])
        torch.minimum(d, nd, out=d)
        d[cur_t] = 0.0
    return picks


def greedy_indices_grouped(z: torch.Tensor, m: int) -> torch.Tensor:
    """Greedy k-center run independently in each of ``G`` groups at once (``z``: ``G x n x d``).

    Each group starts from its row farthest from the group mean (deterministic, no random
    draw), then takes ``m - 1`` farthest-point picks exactly as :func:`greedy_indices`. One
    batched step serves all groups, so the Python overhead is per pick, not per group and pick.
    Returns ``G x min(m, n)`` indices into each group's rows, in pick order.
    """
    if z.dim() != 3:
        raise ValueError(f"greedy_indices_grouped expects G x n x d, got {tuple(z.shape)}")
    g, n, _ = z.shape
    m = min(int(m), n)
    z = z.float()
    sq = (z * z).sum(-1)  # G x n
    rows = torch.arange(g, device=z.device)
    picks = torch.empty(g, m, dtype=torch.long, device=z.device)
    mean = z.mean(1, keepdim=True)
    cur = ((z - mean) ** 2).sum(-1).argmax(1)
    d = torch.full_like(sq, float("inf"))
    nd = torch.empty_like(sq)
    for i in range(m):
        picks[:, i] = cur
        c = z[rows, cur]  # G x d
        torch.baddbmm(sq.unsqueeze(-1), z, c.unsqueeze(-1), alpha=-2.0, out=nd.unsqueeze(-1))
        nd.add_(sq[rows, cur].unsqueeze(1))
        torch.minimum(d, nd, out=d)
        d[rows, cur] = -1.0
        cur = d.argmax(1)
    return picks


def greedy_coreset(
    x: torch.Tensor,
    k: int,
    proj_dim: Optional[int] | str = "auto",
    seed: int = 0,
    start: Optional[int] = None,
    mode: str = DEFAULT_CORESET,
) -> torch.Tensor:
    """Indices of an approximate greedy k-center coreset of ``x`` (PatchCore Alg. 1, CCAD eq. 6).

    Args:
        x: ``N x D`` features.
        k: coreset size; if ``k >= N`` all ``N`` indices are returned.
        proj_dim: dimension of the fixed-seed Gaussian projection ``psi`` (``None``/0, or
            ``>= D``: no projection, i.e. exact greedy in feature space). ``"auto"``: the
            ``mode``'s (:data:`CORESET_MODES`): exact when ``k * N * D`` is at most its
            ``oneshot_exact_budget`` multiply-adds, else its ``proj_dim``.
        mode: the :data:`CORESET_MODES` entry ``"auto"`` reads (``fast`` or ``legacy``).
        seed: seeds both the projection and the random start point.
        start: index of the first centre (default: drawn from ``seed``).

    Returns:
        ``LongTensor[min(k, N)]`` of distinct indices, in pick order.
    """
    if x.dim() != 2:
        raise ValueError(f"greedy_coreset expects an N x D tensor, got shape {tuple(x.shape)}")
    n = x.shape[0]
    if n == 0:
        raise ValueError("greedy_coreset: no points (N = 0)")
    if k < 1:
        raise ValueError(f"greedy_coreset: k must be >= 1, got {k}")
    if k >= n:
        return torch.arange(n, device=x.device)
    if start is None:
        g = torch.Generator().manual_seed(int(seed) + 1)
        start = int(torch.randint(n, (1,), generator=g))
    if proj_dim == "auto":
        cfg = coreset_mode(mode)
        exact = float(k) * n * x.shape[1] <= cfg["oneshot_exact_budget"]
        proj_dim = None if exact else cfg["proj_dim"]
    z = _project(x, proj_dim, seed)
    return greedy_indices(z, k, start=start)


def covering_radius(
    x: torch.Tensor, centers: torch.Tensor, chunk: int = 4096
) -> float:
    """``max_i min_j ||x_i - c_j||`` (the k-center objective), computed in row chunks."""
    worst = 0.0
    c = centers.float()
    for i in range(0, x.shape[0], chunk):
        d = torch.cdist(x[i : i + chunk].float(), c).min(dim=1).values
        worst = max(worst, float(d.max()))
    return worst


class StreamingCoreset:
    """Greedy k-center coreset of a stream of feature batches in bounded memory.

    Merge-and-reduce: incoming features are appended to a buffer of at most ``buffer`` rows;
    when the next chunk would overflow it, the buffer is first *reduced* by greedy k-center
    (:func:`greedy_indices` in the projected space) to ``reduce_to`` rows (default ``buffer //
    2``, so each reduction frees room for many batches and its cost is amortised). ``result()``
    runs the final greedy selection of ``k`` rows from the buffer. Incoming batches larger than
    the free space are split into chunks, so the buffer never holds more than ``buffer`` rows
    (``.peak`` records the largest size it reached); memory is ``O(buffer * D)``, independent
    of the number of images.

    Why this still approximates the one-shot greedy coreset: k-center coresets compose. If
    ``S`` is a greedy ``m``-center selection of a set ``U``, every point of ``U`` lies within
    ``r_m(U) <= 2 * OPT_m(U)`` of ``S`` (Gonzalez's 2-approximation). A point dropped in a
    reduction is therefore within ``r`` of a kept one, and by the triangle inequality a
    ``k``-center solution of the kept set covers the whole stream within its own radius plus
    the sum of the reduction radii. Because ``reduce_to`` is much larger than ``k`` (default
    buffer = 20 k), ``OPT_{reduce_to}`` is far smaller than ``OPT_k``, so the extra radius is a
    small fraction of the final covering radius: the streamed bank covers the data nearly as
    well as the one-shot greedy bank (``tests/test_coreset.py`` measures this).

    Args:
        k: final coreset size (``xi`` for the CCAD bank, ``ratio * n_patches`` for PatchCore).
        buffer: buffer cap in rows (default ``max(20 * k, 1000)``); must exceed ``k``.
        proj_dim: random projection dimension ``psi`` used by the reductions (``None``: none).
        seed: seeds the projection and the start points.
        reduce_to: rows kept by a reduction (default ``buffer // 2``; ``1 <= reduce_to <
            buffer``).
        exact_final: run the final ``k``-selection on the original features instead of the
            projection (default: when ``k * rows * D <= 4e10``, i.e. always for CCAD banks). The
            projection is a speed device; on the small final buffer exact distances are cheap
            and avoid the occasional lost cluster a 128-d projection can cause.
    """

    def __init__(
        self,
        k: int,
        buffer: Optional[int] = None,
        proj_dim: Optional[int] = 128,
        seed: int = 0,
        reduce_to: Optional[int] = None,
        exact_final: Optional[bool] = None,
        prereduce: Optional[float] = None,
        group: int = 1024,
        exact_budget: float = 4e10,
    ) -> None:
        if int(k) < 1:
            raise ValueError(f"StreamingCoreset: k must be >= 1, got {k}")
        self.k = int(k)
        self.buffer = int(buffer) if buffer is not None else max(20 * self.k, 1000)
        if self.buffer < 2:
            raise ValueError(f"StreamingCoreset: buffer must be >= 2 rows, got {self.buffer}")
        self.reduce_to = int(reduce_to) if reduce_to is not None else max(self.buffer // 2, 1)
        if not 1 <= self.reduce_to < self.buffer:
            raise ValueError(
                f"StreamingCoreset: need 1 <= reduce_to ({self.reduce_to}) < buffer "
                f"({self.buffer})"
            )
        if prereduce is not None and not 0.0 < float(prereduce) <= 1.0:
            raise ValueError(f"StreamingCoreset: prereduce must be in (0, 1], got {prereduce}")
        if int(group) < 1:
            raise ValueError(f"StreamingCoreset: group must be >= 1 rows, got {group}")
        self.proj_dim = proj_dim
        self.seed = int(seed)
        self.exact_final = exact_final
        self.prereduce = None if prereduce is None or float(prereduce) >= 1.0 else float(prereduce)
        self.group = int(group)
        self.exact_budget = float(exact_budget)
        self._feats: Optional[torch.Tensor] = None  # rows kept, original space
        self._proj: Optional[torch.Tensor] = None  # same rows, projected
        self._matrix: Optional[torch.Tensor] = None
        self._gen = torch.Generator().manual_seed(self.seed + 1)
        self.seen = 0
        self.peak = 0
        self.reductions = 0

    def __len__(self) -> int:
        return 0 if self._feats is None else int(self._feats.shape[0])

    @property
    def dim(self) -> Optional[int]:
        return None if self._feats is None else int(self._feats.shape[1])

    def _psi(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.proj_dim is None or self.proj_dim <= 0 or self.proj_dim >= x.shape[1]:
            return x
        if self._matrix is None or self._matrix.device != x.device:
            self._matrix = random_projection(x.shape[1], self.proj_dim, self.seed, x.device)
        return x @ self._matrix

    def _reduce(self, m: int) -> None:
        assert self._feats is not None and self._proj is not None
        n = self._feats.shape[0]
        if n <= m:
            return
        start = int(torch.randint(n, (1,), generator=self._gen))
        idx = greedy_indices(self._proj, m, start=start)
        shared = self._proj is self._feats
        self._feats = self._feats[idx]
        self._proj = self._feats if shared else self._proj[idx]
        self.reductions += 1

    def _prereduce(self, features: torch.Tensor, per: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep ``ceil(prereduce * per)`` rows of every group of ``per`` consecutive rows (one
        image's patches) by a greedy k-center inside the group; returns (rows, their projection)."""
        assert self.prereduce is not None
        z = self._psi(features)
        full = (features.shape[0] // per) * per
        kept_x, kept_z = [], []
        if full:
            m = max(1, math.ceil(self.prereduce * per))
            zg = z[:full].view(-1, per, z.shape[1])
            idx = greedy_indices_grouped(zg, m)
            idx = (idx + torch.arange(0, full, per, device=idx.device).unsqueeze(1)).reshape(-1)
            kept_x.append(features[idx])
            kept_z.append(z[idx])
        if full < features.shape[0]:  # a last, smaller group
            rest = features.shape[0] - full
            m = max(1, math.ceil(self.prereduce * rest))
            idx = greedy_indices_grouped(z[full:].unsqueeze(0), m)[0] + full
            kept_x.append(features[idx])
            kept_z.append(z[idx])
        return torch.cat(kept_x), torch.cat(kept_z)

    def update(self, features: torch.Tensor) -> None:
        """Add ``N x D`` features (or ``B x D x h x w`` maps, flattened to patches).

        With ``prereduce = f``, every image's ``h * w`` patches (for ``N x D`` input: every
        ``group`` consecutive rows) are first reduced to ``ceil(f * h * w)`` rows by a greedy
        k-center inside the image; ``seen`` still counts every patch."""
        per = self.group
        if features.dim() == 4:
            per = int(features.shape[2] * features.shape[3])
            features = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
        if features.dim() != 2:
            raise ValueError(
                f"StreamingCoreset.update expects N x D or B x D x h x w, got "
                f"{tuple(features.shape)}"
            )
        if features.shape[0] == 0:
            return
        if self._feats is not None and features.shape[1] != self._feats.shape[1]:
            raise ValueError(
                f"StreamingCoreset.update: feature dim {features.shape[1]} differs from the "
                f"earlier {self._feats.shape[1]}"
            )
        features = features.detach().float()
        n_in = int(features.shape[0])
        projections: Optional[torch.Tensor] = None
        if self.prereduce is not None:
            features, projections = self._prereduce(features, per)
        step = self.buffer - self.reduce_to
        for i in range(0, features.shape[0], step):
            chunk = features[i : i + step]
            if len(self) + chunk.shape[0] > self.buffer:
                self._reduce(self.reduce_to)
            projected = self.proj_dim is not None and 0 < self.proj_dim < chunk.shape[1]
            if not projected:
                z = chunk  # no projection (proj_dim >= D): one shared tensor
            else:
                z = self._psi(chunk) if projections is None else projections[i : i + step]
            if self._feats is None:
                self._feats = chunk.clone()
                self._proj = z if projected else self._feats
            else:
                self._feats = torch.cat([self._feats, chunk])
                self._proj = torch.cat([self._proj, z]) if projected else self._feats
            self.peak = max(self.peak, len(self))
        self.seen += n_in

    def result_indices(self, k: Optional[int] = None) -> torch.Tensor:
        """Indices into :meth:`buffer_features` of the final greedy selection."""
        if self._feats is None:
            raise ValueError("StreamingCoreset.result: no features were added")
        assert self._proj is not None
        k = self.k if k is None else int(k)
        n = self._feats.shape[0]
        if k >= n:
            return torch.arange(n, device=self._feats.device)
        start = int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(self.seed + 2)))
        exact = self.exact_final
        if exact is None:  # auto: exact when it costs at most exact_budget multiply-adds
            exact = k * n * self._feats.shape[1] <= self.exact_budget
        return greedy_indices(self._feats if exact else self._proj, k, start=start)

    def buffer_features(self) -> torch.Tensor:
        """The rows currently held (``<= buffer`` of them)."""
        if self._feats is None:
            raise ValueError("StreamingCoreset: no features were added")
        return self._feats

    def result(self, k: Optional[int] = None) -> torch.Tensor:
        """The coreset: ``min(k, rows held) x D`` features (original space, float32)."""
        return self.buffer_features()[self.result_indices(k)].clone()
