"""PatchCore (Roth et al. 2022): nearest-neighbour patch scoring against a coreset memory bank.

The baseline every seed paper compares with. Training (PatchCore sec. 3.1-3.2): the locally
aware patch features of all good images (eq. 1-2, :class:`~ccad.features.backbone.Backbone`)
are reduced to a memory bank ``M_C`` by greedy k-center coreset selection at a ratio of 1-10 %
of all patches (Algorithm 1; here :class:`~ccad.features.coreset.StreamingCoreset`, so memory is
bounded by the buffer, not by the number of images). Testing (sec. 3.3, eq. 6): the anomaly
score of a test patch ``m_test`` is its distance to the nearest memory feature,

    s(m_test) = min_{m in M_C} || m_test - m ||_2,

giving a ``B x 1 x h x w`` score map; the image score is the maximum patch score ``s*``,
optionally reweighted (eq. 7) by how isolated the matched memory feature ``m*`` is:

    s = (1 - exp||m_test* - m*|| / sum_{m in N_b(m*)} exp||m_test* - m||) * s*.

Distances are computed in chunks (``torch.cdist`` on at most ``chunk_elems`` entries at a time)
so memory stays bounded for large memory banks.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

from .stream import CancelFn, ImageStream, ProgressFn, _module_device, stream_features
from .coreset import DEFAULT_CORESET, StreamingCoreset, coreset_mode

__all__ = ["PatchCoreScorer", "nearest_distances"]

PATCHCORE_WEIGHTS = "patchcore.safetensors"
PATCHCORE_META = "patchcore.json"


def nearest_distances(
    queries: torch.Tensor, bank: torch.Tensor, k: int = 1, chunk_elems: int = 1 << 24,
    group: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances to and indices of the ``k`` nearest rows of ``bank`` for each query row.

    Chunked so that at most ``chunk_elems`` distances are held at once (no full ``N x M``
    matrix). Returns ``(dist N x k, idx N x k)``, ascending. ``group``: the queries come in
    groups of this many rows (one image's patches); chunks then never straddle a group and
    every group is cut the same way, so an image's distances are computed by the same matrix
    products whatever batch it is in, at whatever place (cdist's matrix-product path rounds
    differently for differently shaped chunks: about 1e-4 relative, seen as one image scoring
    differently alone and in a batch; issue 20 item 1).
    """
    if queries.dim() != 2 or bank.dim() != 2 or queries.shape[1] != bank.shape[1]:
        raise ValueError(
            f"nearest_distances: need N x D queries and M x D bank, got {tuple(queries.shape)} "
            f"and {tuple(bank.shape)}"
        )
    k = min(int(k), bank.shape[0])
    rows = max(1, int(chunk_elems) // max(1, bank.shape[0]))
    n = queries.shape[0]
    if group is not None and int(group) > 0:
        g, rows = int(group), min(rows, int(group))
        starts = [(s, min(s + rows, s0 + g, n)) for s0 in range(0, n, g) for s in range(s0, min(s0 + g, n), rows)]
    else:
        starts = [(s, min(s + rows, n)) for s in range(0, n, rows)]
    ds, ids = [], []
    b = bank.float()
    for i, j in starts:
        d = torch.cdist(queries[i:j].float(), b)
        if k == 1:
            v, j = d.min(dim=1, keepdim=True)
        else:
            v, j = d.topk(k, dim=1, largest=False)
        ds.append(v.clamp_min_(0.0))
        ids.append(j)
    return torch.cat(ds), torch.cat(ids)


class PatchCoreScorer:
    """PatchCore anomaly scoring (eq. 6-7) over a streamed coreset memory bank.

    Args:
        backbone: a :class:`~ccad.features.backbone.Backbone` (its ``forward`` gives the patch
            features).
        ratio: memory bank size as a fraction of all training patches (PatchCore: 0.01-0.1);
            the bank holds ``ceil(ratio * n_patches)`` rows (``n_patches = n_images * h * w``).
        k: nearest neighbours averaged per patch score (1 = PatchCore).
        image_size: images are resized to ``image_size x image_size``.
        batch_size: images per backbone forward while fitting.
        reweight: neighbourhood size ``b`` of the image-score reweighting of eq. 7 (0 = off,
            the image score is the max patch score; PatchCore uses ``b = 9``).
        buffer: streaming coreset buffer cap in rows (default ``max(2 * bank rows, 4096)``,
            capped by ``max_buffer_mb``).
        max_buffer_mb: memory cap of the coreset buffer.
        proj_dim, seed: random projection / start of the greedy selection (``"auto"``: the
            ``coreset`` mode's).
        coreset: selection settings by name, :data:`~ccad.features.coreset.CORESET_MODES`
            (``fast``, default: 32-dim projection and a 10 % greedy pre-reduction of each
            image's patches; ``legacy``: 128 dims, every patch).
    """

    def __init__(
        self,
        backbone: Any,
        ratio: float = 0.01,
        k: int = 1,
        image_size: int = 256,
        batch_size: int = 8,
        reweight: int = 0,
        buffer: Optional[int] = None,
        max_buffer_mb: float = 1024.0,
        proj_dim: Optional[int] | str = "auto",
        seed: int = 0,
        coreset: str = DEFAULT_CORESET,
    ) -> None:
        if not 0.0 < float(ratio) <= 1.0:
            raise ValueError(f"PatchCoreScorer: ratio must be in (0, 1] (PatchCore: 0.01-0.1), got {ratio}")
        if int(k) < 1:
            raise ValueError(f"PatchCoreScorer: k must be >= 1, got {k}")
        if int(reweight) < 0:
            raise ValueError(f"PatchCoreScorer: reweight must be >= 0, got {reweight}")
        self.backbone = backbone
        self.ratio = float(ratio)
        self.k = int(k)
        self.image_size = int(image_size)
        self.batch_size = int(batch_size)
        self.reweight = int(reweight)
        self.buffer = buffer
        self.max_buffer_mb = float(max_buffer_mb)
        self.coreset = str(coreset)
        self._coreset = coreset_mode(self.coreset)
        self.proj_dim = self._coreset["proj_dim"] if proj_dim == "auto" else proj_dim
        self.seed = int(seed)
        self.memory_bank: Optional[torch.Tensor] = None
        self.n_images = 0
        self.n_patches = 0
        self.grid: Optional[tuple[int, int]] = None
        self.skipped: list[dict[str, str]] = []

    # ---- fitting ----------------------------------------------------------------------------
    @property
    def fitted(self) -> bool:
        return self.memory_bank is not None

    def _buffer_rows(self, target: int, dim: int) -> int:
        cap = max(2, int(self.max_buffer_mb * 2**20 // (4 * max(1, dim))))
        # Merge-and-reduce costs ~ N * r * B * d / (B - r) for buffer B and reduction size r:
        # reducing straight to the target (r = k) with B = 8 k costs ~ 8/7 of a one-shot greedy.
        rows = int(self.buffer) if self.buffer is not None else max(8 * target, 4096)
        return max(2, min(rows, cap))

    def fit(
        self,
        samples: Any,
        progress: ProgressFn = None,
        cancel: CancelFn = None,
        n_images: Optional[int] = None,
    ) -> "PatchCoreScorer":
        """Build the memory bank from good images (PatchCore sec. 3.2, streamed).

        Args:
            samples: any source :class:`~ccad.features.stream.ImageStream` accepts.
            progress: ``progress(images_done, images_total)`` after each batch.
            cancel: returning True raises :class:`~ccad.features.bank.Cancelled`.
            n_images: number of images, for sources without a length (sizes the buffer).

        Returns:
            self.
        """
        stream = ImageStream(samples, self.image_size, self.batch_size)
        total = stream.total if stream.total is not None else n_images
        dev = _module_device(self.backbone)
        core = self._select(stream_features(stream, self.backbone, dev, progress, cancel), total)
        if core is None or stream.n_images == 0:
            reasons = "; ".join(f"{s['path']}: {s['reason']}" for s in stream.skipped[:3])
            raise ValueError(
                "PatchCoreScorer.fit: no readable image"
                + (f" ({len(stream.skipped)} skipped: {reasons})" if stream.skipped else "")
            )
        self._finish(core, int(stream.n_images), dev)
        self.skipped = list(stream.skipped)
        return self

    def fit_features(self, batches: Iterable[torch.Tensor], n_images: Optional[int] = None) -> "PatchCoreScorer":
        """Build the memory bank from backbone features already computed: ``B x D x h x w`` maps,
        one per batch, in the order :meth:`fit` would compute them (its ``batch_size`` images at a
        time). The same selection as :meth:`fit` (which calls this code on the backbone's output),
        without the backbone: ``python -m benchmarks bank_speed --part seeds`` selects many memories
        from one feature pass this way. ``n_images``: the number of images (sizes the buffer, as in
        :meth:`fit`; default: counted, which needs a list)."""
        batches = list(batches) if n_images is None else batches
        total = sum(int(b.shape[0]) for b in batches) if n_images is None else int(n_images)  # type: ignore[union-attr]
        core = self._select(batches, total)
        if core is None:
            raise ValueError("PatchCoreScorer.fit_features: no features given")
        self._finish(core, int(total), None)
        self.skipped = []
        return self

    def _select(self, batches: Iterable[torch.Tensor], total: Optional[int]) -> Optional[StreamingCoreset]:
        """Feed every feature map to the streaming coreset, sized from the first (``None``: no batch)."""
        core: Optional[StreamingCoreset] = None
        for feats in batches:
            if core is None:
                h, w = int(feats.shape[-2]), int(feats.shape[-1])
                self.grid = (h, w)
                est = math.ceil(self.ratio * (total or 1000) * h * w)
                rows = self._buffer_rows(est, int(feats.shape[1]))
                core = StreamingCoreset(
                    max(1, min(est, rows - 1)), buffer=rows,
                    reduce_to=max(1, min(est, rows - 1)),
                    proj_dim=self.proj_dim, seed=self.seed,
                    prereduce=self._coreset["prereduce"], exact_budget=self._coreset["exact_budget"],
                )
            core.update(feats)
        return core

    def _finish(self, core: StreamingCoreset, n_images: int, device: Any) -> None:
        m = max(1, math.ceil(self.ratio * core.seen))
        bank = core.result(m)
        self.memory_bank = bank.to(device) if device is not None else bank
        self.n_images = int(n_images)
        self.n_patches = int(core.seen)

    # ---- scoring ----------------------------------------------------------------------------
    def _require(self) -> torch.Tensor:
        if self.memory_bank is None:
            raise RuntimeError("PatchCoreScorer: call fit() (or from_tensors()) before scoring")
        return self.memory_bank

    def _patch_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        bank = self._require()
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"PatchCoreScorer: expected B x 3 x S x S images, got {tuple(x.shape)}")
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = torch.nn.functional.interpolate(
                x.float(), size=(self.image_size, self.image_size), mode="bilinear",
                align_corners=False, antialias=True,
            )
        with torch.no_grad():
            f = self.backbone(x)
        b, d, h, w = f.shape
        if d != bank.shape[1]:
            raise ValueError(
                f"PatchCoreScorer: backbone gives {d}-dim features, the memory bank {bank.shape[1]}"
            )
        q = f.permute(0, 2, 3, 1).reshape(-1, d)
        bank = bank.to(q.device)
        dist, idx = nearest_distances(q, bank, self.k, group=h * w)
        return q.view(b, h * w, d), dist.view(b, h, w, -1), idx.view(b, h * w, -1)

    def score_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Patch scores ``B x 1 x h x w``: (mean of the ``k``) nearest memory distance (eq. 6)."""
        _, dist, _ = self._patch_scores(x)
        return dist.mean(-1).unsqueeze(1)

    def image_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Image scores ``B``: the max patch score ``s*``, reweighted by eq. 7 if ``reweight``."""
        q, dist, idx = self._patch_scores(x)
        b = q.shape[0]
        patch = dist.mean(-1).view(b, -1)
        s_star, p_star = patch.max(dim=1)
        if self.reweight <= 0:
            return s_star
        bank = self._require().to(q.device)
        nb = min(self.reweight, bank.shape[0])
        out = torch.empty_like(s_star)
        for i in range(b):
            m_star = bank[idx[i, p_star[i], 0]]
            # N_b(m*): the b nearest memory features of m* (m* itself first, at distance 0)
            _, support = nearest_distances(m_star[None], bank, nb)
            d = torch.cdist(q[i, p_star[i]][None].float(), bank[support[0]].float())[0]
            w = 1.0 - torch.softmax(d, dim=0)[0]
            out[i] = w * s_star[i]
        return out

    # ---- persistence ------------------------------------------------------------------------
    def to(self, device: Any) -> "PatchCoreScorer":
        """Move the memory bank and the backbone to ``device``; returns self."""
        if self.memory_bank is not None:
            self.memory_bank = self.memory_bank.to(device)
        if hasattr(self.backbone, "to"):
            self.backbone.to(device)
        return self

    def config(self) -> dict[str, Any]:
        """Plain-value settings and provenance (for JSON)."""
        return {
            "backbone": getattr(self.backbone, "name", None),
            "layers": list(getattr(self.backbone, "layers", []) or []),
            "ratio": self.ratio,
            "k": self.k,
            "image_size": self.image_size,
            "reweight": self.reweight,
            "coreset": self.coreset,
            "memory_size": None if self.memory_bank is None else int(self.memory_bank.shape[0]),
            "feature_dim": None if self.memory_bank is None else int(self.memory_bank.shape[1]),
            "n_images": self.n_images,
            "n_patches": self.n_patches,
            "grid": list(self.grid) if self.grid else None,
            "skipped": list(self.skipped),
        }

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Everything needed to score again, as tensors (for ``safetensors.torch.save_file``)."""
        bank = self._require()
        return {
            "memory_bank": bank.detach().float().cpu().contiguous(),
            "ratio": torch.tensor(self.ratio, dtype=torch.float64),
            "k": torch.tensor(self.k, dtype=torch.int64),
            "image_size": torch.tensor(self.image_size, dtype=torch.int64),
            "reweight": torch.tensor(self.reweight, dtype=torch.int64),
            "n_images": torch.tensor(self.n_images, dtype=torch.int64),
            "n_patches": torch.tensor(self.n_patches, dtype=torch.int64),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], backbone: Any) -> "PatchCoreScorer":
        """Rebuild a fitted scorer from :meth:`to_tensors` output and its backbone.

        Raises:
            ValueError: ``memory_bank`` is missing or does not match the backbone's feature_dim.
        """
        if "memory_bank" not in tensors:
            raise ValueError(f"PatchCore tensors lack 'memory_bank' (found {sorted(tensors)})")
        bank = tensors["memory_bank"]
        if bank.dim() != 2:
            raise ValueError(f"PatchCore memory_bank must be M x D, got {tuple(bank.shape)}")
        dim = getattr(backbone, "feature_dim", None)
        if dim is not None and int(dim) != int(bank.shape[1]):
            raise ValueError(
                f"PatchCore memory_bank has {bank.shape[1]}-dim features but backbone "
                f"'{getattr(backbone, 'name', backbone)}' layers {getattr(backbone, 'layers', '?')} "
                f"gives {dim}"
            )

        def num(key: str, default: Any) -> Any:
            t = tensors.get(key)
            return default if t is None else t.item()

        sc = cls(
            backbone,
            ratio=float(num("ratio", 0.01)),
            k=int(num("k", 1)),
            image_size=int(num("image_size", 256)),
            reweight=int(num("reweight", 0)),
        )
        sc.memory_bank = bank.float().to(_module_device(backbone))
        sc.n_images = int(num("n_images", 0))
        sc.n_patches = int(num("n_patches", 0))
        return sc

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``patchcore.safetensors`` + ``patchcore.json`` into ``directory``."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file(self.to_tensors(), str(d / PATCHCORE_WEIGHTS))
        (d / PATCHCORE_META).write_text(json.dumps(self.config(), indent=2), encoding="utf-8")
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike[str], backbone: Any = None) -> "PatchCoreScorer":
        """Read :meth:`save` output; the backbone defaults to the one named in the JSON."""
        from safetensors.torch import load_file

        d = Path(directory)
        w = d / PATCHCORE_WEIGHTS
        if not w.is_file():
            raise FileNotFoundError(f"PatchCore file '{w}' not found")
        if backbone is None:
            mpath = d / PATCHCORE_META
            if not mpath.is_file():
                raise FileNotFoundError(f"'{mpath}' not found (needed to know the backbone)")
            meta = json.loads(mpath.read_text(encoding="utf-8"))
            from .backbone import get_backbone

            backbone = get_backbone(meta["backbone"], layers=tuple(meta["layers"]))
        return cls.from_tensors(load_file(str(w)), backbone)
