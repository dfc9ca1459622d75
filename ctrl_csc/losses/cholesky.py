"""A batched Cholesky for the rate computations, blocked on CPU.

Why it exists: measured with MKL on one thread, ``potrf`` at ``s = 128`` was ~2× slower than two
factorisations at ``s = 64`` plus the triangular solve. Measured again on 2 threads (shared,
loaded machine; ``bench/bench_rate.py``'s interleaved medians), the gain does not hold: the library
call alone took 0.23–1.36× the time of the blocked one, and the objectives' forward 0.25–0.96×.
It is kept, in this module only, until a measurement on a quiet machine settles it.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["BLOCK", "cholesky"]

BLOCK = 64


def cholesky(A: Tensor) -> tuple[Tensor, Tensor]:
    """Batched Cholesky ``A = L Lᵀ`` of ``(B, s, s)`` SPD matrices; returns ``(L, info)``.

    On CPU, matrices of size ``s >= 2·64`` are factorised by 2×2 blocks (recursively): ``L11`` of
    the leading half, ``L21ᵀ = L11⁻¹ A12``, then the Schur complement ``A22 − L21 L21ᵀ`` — the
    same factor, to rounding — and ``A`` is overwritten by ``L`` (pass a tensor you own).
    Elsewhere (GPU), and below ``2·BLOCK``, the library call is used as is.
    """
    s = A.shape[-1]
    if A.device.type != "cpu" or s < 2 * BLOCK:
        return torch.linalg.cholesky_ex(A)
    h = s // 2
    L11, info1 = cholesky(A[:, :h, :h])
    X = torch.linalg.solve_triangular(L11, A[:, :h, h:], upper=False)  # = L21ᵀ
    L22, info2 = cholesky(A[:, h:, h:] - X.transpose(-1, -2) @ X)
    A[:, :h, :h] = L11
    A[:, :h, h:] = 0.0
    A[:, h:, :h] = X.transpose(-1, -2)
    A[:, h:, h:] = L22
    info = torch.where(info1 != 0, info1, torch.where(info2 != 0, info2 + h, info2))
    return A, info
