"""PatchCore's coreset: anomalib's greedy k-center selection, the same indices, fast.

anomalib's ``KCenterGreedy`` projects the embedding with a ``SparseRandomProjection`` (drawn
from torch's and numpy's global RNGs), draws a start index with ``torch.randint``, then
repeats: distances of every point to the newest center (``torch.linalg.norm`` of the
difference), running minimum, ``torch.max`` picks the farthest point. Every step reads and
writes the whole projected embedding, so it is bound by memory bandwidth.

``greedy_coreset`` makes the same draws in the same order and the same choices, but at each
step only measures the points that can get closer to the new center. A point ``x`` whose
nearest center ``c_x`` lies at ``d(c_x, c) >= 2 d(x, c_x)`` from the new center ``c`` has
``d(x, c) >= d(x, c_x)``: its minimum cannot change (the triangle inequality; a small margin
covers rounding). Late in the selection few points pass that test. The distances it does
compute are anomalib's own expression, row by row, so the minima, and with them the indices,
are bit for bit anomalib's (tested against ``KCenterGreedy``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Relative slack on the pruning bound: distances carry float32 rounding (~1e-7 relative).
_MARGIN = 1e-4


@dataclass(frozen=True)
class Draws:
    """What anomalib's sampler draws from the RNGs: the projection and the start index."""

    projection: torch.Tensor  # (n_components, n_features), dense, on the embedding's device
    start: int
    size: int  # coreset size: int(n * sampling_ratio)


def anomalib_draws(embedding: torch.Tensor, sampling_ratio: float) -> Draws:
    """Draw from the global RNGs exactly what ``KCenterGreedy(embedding, ratio)`` would."""
    import torch
    from anomalib.models.components.dimensionality_reduction import SparseRandomProjection

    n = embedding.shape[0]
    size = int(n * sampling_ratio)
    if size <= 0:
        raise ValueError(f"coreset_size must be a positive integer, got {size} ({sampling_ratio} of {n} embeddings)")
    projection = SparseRandomProjection(eps=0.9).fit(embedding).sparse_random_matrix
    start = torch.randint(high=n, size=(1,), device=embedding.device).squeeze()
    return Draws(projection, int(start), size)


def greedy_coreset(embedding: torch.Tensor, draws: Draws) -> list[int]:
    """The indices anomalib's ``KCenterGreedy.select_coreset_idxs`` returns for these draws.

    The large buffers are allocated once, before the loop (the projected features, one buffer
    of their size, per-point and per-center vectors); a step's temporaries are the size of
    its candidates. Memory stays flat, whatever glibc's malloc settings.
    """
    import torch

    features = embedding @ draws.projection.T.type(embedding.dtype)
    n, k = features.shape
    dev, dtype = features.device, features.dtype
    work = torch.empty((n, k), dtype=dtype, device=dev)  # points (or centers) minus the new center
    dist = torch.empty(n, dtype=dtype, device=dev)
    center_dist = torch.empty(draws.size, dtype=dtype, device=dev)  # new center to each center
    bound = torch.empty(n, dtype=dtype, device=dev)
    reach = torch.empty(n, dtype=dtype, device=dev)  # 2 min_d(x), with the margin
    near = torch.empty(n, dtype=torch.bool, device=dev)
    centers = torch.empty((draws.size, k), dtype=dtype, device=dev)
    owner = torch.zeros(n, dtype=torch.long, device=dev)  # each point's nearest center so far
    idx = draws.start
    chosen = [idx]
    centers[0] = features[idx]
    torch.sub(features, centers[0], out=work)
    min_d = torch.linalg.vector_norm(work, ord=2, dim=1)
    for t in range(1, draws.size):
        idx = int(torch.max(min_d, dim=0).indices)
        min_d[idx] = 0.0
        chosen.append(idx)
        if t == draws.size - 1:
            break
        c = centers[t]
        c.copy_(features[idx])
        owner[idx] = t
        # x can only come closer to c if d(c, its center) < 2 min_d(x): else, by the triangle
        # inequality, d(x, c) >= d(c, c_x) - d(x, c_x) >= min_d(x).
        torch.sub(centers[:t], c, out=work[:t])
        torch.linalg.vector_norm(work[:t], ord=2, dim=1, out=center_dist[:t])
        center_dist[t] = 0.0
        torch.index_select(center_dist, 0, owner, out=bound)
        torch.mul(min_d, 2 * (1 + _MARGIN), out=reach).add_(1e-6)
        torch.lt(bound, reach, out=near)
        candidates = torch.nonzero(near).squeeze(1)
        m = len(candidates)
        torch.index_select(features, 0, candidates, out=work[:m])
        work[:m].sub_(c)
        torch.linalg.vector_norm(work[:m], ord=2, dim=1, out=dist[:m])
        closer = dist[:m] < min_d[candidates]
        moved = candidates[closer]
        min_d[moved] = dist[:m][closer]
        owner[moved] = t
    return chosen
