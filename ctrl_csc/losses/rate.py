r"""Coding rate and rate reduction of features, exact and batched.

The formulas: docs/design.md, §6 "Coding rate and rate reduction".

For features ``Z`` of shape ``(n, d)`` (rows are samples) and ``eps_sq`` = ε²:

.. math::

    R(Z)      &= \tfrac12 \log\det(I_d + \tfrac{d}{n ε²} Z^\top Z) \\
    R_c(Z|Π)  &= \sum_j \tfrac{n_j}{n} \, \tfrac12 \log\det(I_d + \tfrac{d}{n_j ε²} Z_j^\top Z_j) \\
    ΔR(Z|Π)   &= R(Z) - R_c(Z|Π) \\
    ΔR(Z, Ẑ)  &= R(Z ∪ Ẑ) - \tfrac12 R(Z) - \tfrac12 R(Ẑ)

How it is computed
------------------
* Every log-determinant is of a symmetric positive-definite matrix ``I + α G`` and is taken as
  ``2 Σ log diag(cholesky)``. ``logdet(I_d + α ZᵀZ) = logdet(I_m + α Z Zᵀ)`` is used to work in the
  smaller size: each *level* (the whole batch, or the classes) uses either the ``d×d`` second
  moments or the Gram matrices, whichever costs fewer flops.
* Classes are handled without a Python loop: the samples of each class present in the batch are
  scattered into a zero-padded tensor ``(K', F, m, d)`` (``K'`` classes present, F ∈ {1, 2}
  feature sets, ``m`` the largest class count); zero rows change neither ``ZᵀZ`` nor the
  log-determinant of ``I + α Z Zᵀ``. Classes absent from the batch are simply not there (no
  division by ``n_j = 0``).
* The rates of Z and Ẑ of the same group, needed for ``ΔR(Z, Ẑ)``, come from one Gram matrix of
  ``[Z; Ẑ]``: its diagonal blocks, packed block-diagonally into one matrix, give ``R(Z)`` and
  ``R(Ẑ)`` (the Cholesky factor of a block-diagonal matrix is block-diagonal); the whole gives
  ``R(Z ∪ Ẑ)``.
* All matrices of one call are factorised by one batched ``torch.linalg.cholesky_ex`` per distinct
  matrix size — one call when every level works in ``d×d``, two when the classes are small enough
  to use their (much smaller) Gram matrices while the whole batch uses ``d×d`` (K = 1000 classes
  in a batch of 600: 128×128 for the batch, tiny packed Gram matrices for the classes).
* Backward: ``∂(½ logdet A)/∂A = ½ A⁻¹`` from the Cholesky factor (``cholesky_inverse``) instead
  of differentiating through the factorisation, and ``XᵀX`` products use their symmetry (one
  batched product per backward instead of two). First-order gradients only.
* ``float64=True`` casts the features to float64 before the products, so the second moments and the
  log-determinants are accumulated in float64; results are returned in the features' dtype
  (float32 for float32 or lower-precision inputs). Autocast is disabled inside.
* A failed factorisation or a non-finite result is detected with one host synchronisation at the
  end of a call (no separate finiteness pass over the inputs); only then are the inputs inspected,
  so that the ``ValueError`` names a non-finite input rather than a failed factorisation.

Two tiers of public names
-------------------------
* The rate functions (``coding_rate`` … ``samplewise_rate_reduction``) validate their inputs and
  return one rate each.
* The building blocks, for an objective that needs several rates of the same features in one
  batched computation (:class:`~ctrl_csc.losses.CTRLObjective`): validate with ``check_*``, cast
  with ``compute_dtype`` under ``no_autocast``, compute every rate with ``batched_rates`` (a
  :class:`Partition` for the classes), then check with ``raise_if_failed`` (one host sync) and
  return in ``result_dtype``. ``samplewise_rate`` is the closed-form per-pair ΔR, unvalidated.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    # the rates of features, validated
    "NonFiniteError",
    "coding_rate",
    "compressed_coding_rate",
    "pairwise_rate_reduction",
    "rate_reduction",
    "samplewise_rate_reduction",
    # building blocks for objectives that combine several rates in one call (objective.py)
    "Level",
    "Partition",
    "Rates",
    "batched_rates",
    "check_eps_sq",
    "check_labels_shape",
    "check_num_classes",
    "check_pair_shapes",
    "compute_dtype",
    "no_autocast",
    "raise_if_failed",
    "result_dtype",
    "samplewise_rate",
]


# --------------------------------------------------------------------------- validation


class NonFiniteError(ValueError, FloatingPointError):
    """Non-finite features, or a rate that cannot be computed in the working precision.

    A ``ValueError`` (a user-facing error naming the problem) and a ``FloatingPointError``, so that
    a training loop that stops cleanly on non-finite values (saving its last good state) catches it.
    """


def check_eps_sq(eps_sq: float) -> float:
    """``eps_sq`` as a float; a ``ValueError`` unless it is a positive finite number."""
    if isinstance(eps_sq, bool) or not isinstance(eps_sq, (int, float)):
        raise ValueError(f"eps_sq must be a positive number, got {eps_sq!r}")
    if not (math.isfinite(eps_sq) and eps_sq > 0):
        raise ValueError(f"eps_sq must be a positive finite number, got {eps_sq!r}")
    return float(eps_sq)


def _check_features_shape(Z: Tensor, name: str) -> None:
    if not isinstance(Z, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (n, d), got {type(Z).__name__}")
    if Z.dim() != 2:
        raise ValueError(
            f"{name} must have shape (n, d) (rows are samples), got shape {tuple(Z.shape)}"
        )
    if Z.shape[0] == 0 or Z.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(Z.shape)}): need n >= 1 and d >= 1")
    if not Z.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {Z.dtype}")


def check_pair_shapes(Z: Tensor, Zh: Tensor) -> None:
    """``Z`` and ``Zh``: non-empty floating-point ``(n, d)`` tensors of one shape and device."""
    _check_features_shape(Z, "Z")
    _check_features_shape(Zh, "Zh")
    if Z.shape != Zh.shape:
        raise ValueError(
            "Z and Zh must have the same shape (n, d) (Zh[i] is the transcription of Z[i]), "
            f"got {tuple(Z.shape)} and {tuple(Zh.shape)}"
        )
    if Z.device != Zh.device:
        raise ValueError(f"Z and Zh are on different devices ({Z.device} and {Zh.device})")


def _check_finite(**tensors: Tensor) -> None:
    """One host synchronisation for all tensors; names the offending one."""
    items = list(tensors.items())
    ok = torch.stack([torch.isfinite(t).all() for _, t in items])
    if not bool(ok.all()):
        bad = [name for (name, _), good in zip(items, ok.tolist()) if not good]
        raise NonFiniteError(
            f"non-finite values (NaN or Inf) in the features {', '.join(bad)}: the network "
            "diverged or its input is corrupt (lower the learning rate, check the data)"
        )


def check_num_classes(num_classes: int | None) -> int | None:
    """``num_classes``: ``None`` or a positive int."""
    if num_classes is None:
        return None
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r}")
    return num_classes


def check_labels_shape(labels: Tensor | None, n: int) -> None:
    """``labels``: an integer tensor of shape ``(n,)`` (their range is checked by
    :meth:`Partition.of`)."""
    if labels is None:
        raise ValueError("labels are required (class-conditional rates need a partition Π)")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor of shape (n,), got {type(labels).__name__}")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(
            f"labels must have shape (n,) = ({n},) matching the features, got {tuple(labels.shape)}"
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor of class indices, got {labels.dtype}")


# --------------------------------------------------------------------------- numerics


def compute_dtype(dtype: torch.dtype, float64: bool) -> torch.dtype:
    """The dtype rates are computed in: float64 if asked, else float32/float64 as given, else
    float32 (half precision is cast up)."""
    if float64:
        return torch.float64
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def result_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype rates are returned in for features of ``dtype`` (float32 for half precision)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def no_autocast(device: torch.device):
    """A context that disables autocast on ``device`` (rates are computed at full precision)."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type autocast does not know: nothing to disable
        return contextlib.nullcontext()


class _SymProduct(torch.autograd.Function):
    """``XᵀX`` (``gram=False``) or ``X Xᵀ`` (``gram=True``) for ``X`` of shape ``(B, m, d)``.

    The backward uses that the product is symmetric: ``∂/∂X = X (g + gᵀ)`` (resp. ``(g + gᵀ) X``),
    one batched product instead of the two autograd would take.
    """

    @staticmethod
    def forward(ctx, X: Tensor, gram: bool) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(X)
        ctx.gram = gram
        return X @ X.transpose(-1, -2) if gram else X.transpose(-1, -2) @ X

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):  # type: ignore[override]
        (X,) = ctx.saved_tensors
        g = g + g.transpose(-1, -2)
        return (g @ X if ctx.gram else X @ g), None


class _BlockHalfLogdet(torch.autograd.Function):
    """``½ logdet`` of the diagonal blocks of ``A = I + α G``, block-diagonal SPD, by Cholesky.

    Forward: ``G`` ``(B, s, s)`` symmetric PSD, ``alpha`` ``(B,)``; ``A[b] = I + alpha[b] G[b]``
    ``= L Lᵀ`` and ``out[b, k] = Σ_{i: seg[b,i]=k} log L_ii``, i.e. ``½ logdet`` of block ``k`` of
    ``A[b]`` (``seg``: ``(B, s)`` block index of each row; ``G[b]`` must be block-diagonal for
    that partition of its rows, so that ``L`` is too). Also returns ``ok``, a 0-dim bool: every
    factorisation succeeded (checked by the caller, with the result's finiteness, in one host
    synchronisation). Backward: ``∂(½ logdet A_k)/∂G_k = ½ α A_k⁻¹`` with ``A⁻¹`` from the factor
    (``cholesky_inverse``) — cheaper than differentiating the factorisation, and with ``I + α·``
    inside no intermediate gradient buffers.
    """

    @staticmethod
    def forward(ctx, G: Tensor, alpha: Tensor, seg: Tensor, blocks: int):  # type: ignore[override]
        A = G * alpha[:, None, None]
        A.diagonal(dim1=-2, dim2=-1).add_(1.0)
        L, info = torch.linalg.cholesky_ex(A)
        logdiag = torch.diagonal(L, dim1=-2, dim2=-1).log()
        out = logdiag.new_zeros((A.shape[0], blocks)).scatter_add_(1, seg, logdiag)
        ok = (info == 0).all()
        ctx.mark_non_differentiable(ok)
        ctx.save_for_backward(L, alpha, seg)
        return out, ok

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor, _grad_ok):  # type: ignore[override]
        L, alpha, seg = ctx.saved_tensors
        g = torch.cholesky_inverse(L)  # block-diagonal like A: row scaling keeps it symmetric
        g.mul_((0.5 * alpha[:, None] * grad.gather(1, seg))[:, :, None])
        return g, None, None, None


class _CholeskyPlan:
    """Collects the matrices ``I + α G`` of one computation; one batched Cholesky per size.

    ``add(G, alpha, blocks)``: ``G`` ``(B, s, s)`` symmetric PSD whose rows split into ``blocks``
    equal contiguous diagonal blocks (``G`` block-diagonal accordingly), ``alpha`` ``(B,)``;
    returns a handle. After ``run()``, ``result(handle)`` has shape ``(B, blocks)``: ``½ logdet``
    of each diagonal block of ``I + α G``, and ``ok`` is a 0-dim bool (all factorisations ok).
    """

    def __init__(self) -> None:
        self._items: list[tuple[Tensor, Tensor, int]] = []
        self._out: list[Tensor] = []
        self.ok: Tensor | None = None

    def add(self, G: Tensor, alpha: Tensor, blocks: int = 1) -> int:
        assert G.shape[-1] % blocks == 0 and alpha.shape == G.shape[:1]
        self._items.append((G, alpha, blocks))
        return len(self._items) - 1

    def run(self) -> None:
        by_size: dict[int, list[int]] = {}
        for i, (G, _, _) in enumerate(self._items):
            by_size.setdefault(G.shape[-1], []).append(i)
        out: list[Tensor | None] = [None] * len(self._items)
        oks = []
        for s, idx in by_size.items():
            items = [self._items[i] for i in idx]
            G = torch.cat([g for g, _, _ in items]) if len(items) > 1 else items[0][0]
            alpha = torch.cat([a for _, a, _ in items])
            rows = torch.arange(s, device=G.device)
            seg = torch.cat([(rows // (s // b)).expand(g.shape[0], s) for g, _, b in items])
            res, ok = _BlockHalfLogdet.apply(G, alpha, seg, max(b for _, _, b in items))
            oks.append(ok)
            for i, (_, _, b), part in zip(idx, items, res.split([g.shape[0] for g, _, _ in items])):
                out[i] = part[:, :b]
        self._out = out  # type: ignore[assignment]
        self.ok = torch.stack(oks).all()

    def result(self, handle: int) -> Tensor:
        return self._out[handle]


@dataclass
class Level:
    """Rates of one level (the whole batch, or the classes) of F ∈ {1, 2} feature sets.

    ``sep``: ``(G, F)``, ``R`` of each feature set in each group; ``union``: ``(G,)``, the rate of
    the union of the two sets in each group (``None`` unless requested).
    """

    sep: Tensor
    union: Tensor | None


def _use_gram(groups: int, m: int, d: int, sets: int, union: bool) -> bool:
    """Whether Gram matrices (size m, or F·m packed) cost fewer flops than d×d second moments."""
    if union:
        s = sets * m
        gram = groups * (s * s * d + 2 * s**3 / 3)
    else:
        gram = sets * groups * (m * m * d + m**3 / 3)
    cov = sets * groups * m * d * d + (sets + int(union)) * groups * d**3 / 3
    return gram < cov


class _LevelBuilder:
    """Adds to a plan the matrices of one level; ``finish()`` reads the rates after ``plan.run()``.

    ``P``: padded features ``(G, F, m, d)`` — group ``g``, set ``f``; zero rows are padding, at the
    same positions in every set — or ``None`` with ``cov`` ``(G, F, d, d)`` the second moments
    (forces the d×d path). ``counts``: ``(G,)`` real rows per group (> 0). ``union`` needs F = 2.
    """

    def __init__(
        self,
        plan: _CholeskyPlan,
        P: Tensor | None,
        counts: Tensor,
        d: int,
        eps_sq: float,
        union: bool,
        cov: Tensor | None = None,
    ) -> None:
        ref = P if P is not None else cov
        G, F = ref.shape[:2]  # type: ignore[union-attr]
        assert F == 2 or not union
        self.G, self.F, self.union, self.cov = G, F, union, cov
        alpha = d / (counts.to(ref.dtype) * eps_sq)  # (G,)  # type: ignore[union-attr]
        self.gram = cov is None and _use_gram(G, P.shape[2], d, F, union)  # type: ignore[union-attr]
        if self.gram:
            m = P.shape[2]  # type: ignore[union-attr]
            if union:
                U = _SymProduct.apply(P.reshape(G, F * m, d), True)  # (G, F m, F m)
                mask = torch.block_diag(*[torch.ones(m, m, dtype=torch.bool, device=U.device)] * F)
                self.h_sep = plan.add(U * mask, alpha, blocks=F)  # the F diagonal blocks
                self.h_uni = plan.add(U, alpha / F)
            else:
                Gm = _SymProduct.apply(P.reshape(G * F, m, d), True)  # (G F, m, m)
                self.h_sep = plan.add(Gm, alpha.repeat_interleave(F))
        else:
            if cov is None:
                m = P.shape[2]  # type: ignore[union-attr]
                cov = _SymProduct.apply(P.reshape(G * F, m, d), False).view(G, F, d, d)
            self.cov = cov
            self.h_sep = plan.add(cov.reshape(G * F, d, d), alpha.repeat_interleave(F))
            if union:
                self.h_uni = plan.add(cov.sum(1), alpha / F)

    def finish(self, plan: _CholeskyPlan) -> Level:
        if self.gram and self.union:
            sep = plan.result(self.h_sep)  # (G, F): blocks of the packed matrix
        else:
            sep = plan.result(self.h_sep)[:, 0].view(self.G, self.F)
        uni = plan.result(self.h_uni)[:, 0] if self.union else None
        return Level(sep=sep, union=uni)


@dataclass
class Partition:
    """Classes present in a batch. ``inv``/``pos``: ``(n,)`` class slot and row within its class;
    ``counts``: ``(K',)`` samples per present class; ``m``: largest count."""

    inv: Tensor
    pos: Tensor
    counts: Tensor
    m: int

    @staticmethod
    def of(labels: Tensor, num_classes: int | None) -> Partition:
        """Partition of validated-shape int64 ``labels`` ``(n,)``; checks their range."""
        classes, inv, counts = torch.unique(
            labels, sorted=True, return_inverse=True, return_counts=True
        )
        lo, hi, m = torch.stack([classes[0], classes[-1], counts.max()]).tolist()
        if lo < 0:
            raise ValueError(f"labels must be >= 0, got a label {lo}")
        if num_classes is not None and hi >= num_classes:
            raise ValueError(
                f"label {hi} is out of range for num_classes={num_classes} (labels must lie in "
                f"[0, {num_classes - 1}]); set num_classes to the dataset's number of classes"
            )
        order = torch.argsort(inv, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        pos = torch.empty_like(inv)
        pos[order] = torch.arange(inv.shape[0], device=inv.device) - starts[inv[order]]
        return Partition(inv=inv, pos=pos, counts=counts, m=int(m))

    def pad(self, feats: Tensor) -> Tensor:
        """``(F, n, d)`` → ``(K', F, m, d)``, zero rows as padding (differentiable)."""
        F, _, d = feats.shape
        out = feats.new_zeros((self.counts.shape[0], F, self.m, d))
        f = torch.arange(F, device=feats.device)[:, None]
        return out.index_put((self.inv[None], f, self.pos[None]), feats)


@dataclass
class Rates:
    """What :func:`batched_rates` returns: the global level, the class level and ``ok``."""

    glob: Level | None
    cls: Level | None
    ok: Tensor  # 0-dim bool: every Cholesky factorisation succeeded


def batched_rates(
    feats: Tensor,
    eps_sq: float,
    part: Partition | None = None,
    want_global: bool = True,
    global_union: bool = False,
    class_union: bool = False,
) -> Rates:
    """Rates of F ∈ {1, 2} feature sets ``feats`` ``(F, n, d)``, globally and per class.

    ``glob.sep`` ``(1, F)``, ``glob.union`` ``(1,)``; with a partition, ``cls.sep`` ``(K', F)`` and
    ``cls.union`` ``(K',)``. ``feats`` must be validated and in the compute dtype.
    """
    _, n, d = feats.shape
    plan = _CholeskyPlan()
    cls_b = glob_b = None
    if part is not None:
        cls_b = _LevelBuilder(plan, part.pad(feats), part.counts, d, eps_sq, class_union)
    if want_global:
        n_t = torch.full((1,), n, device=feats.device)
        if cls_b is not None and cls_b.cov is not None:
            # the global second moments are the sums of the class ones: no extra product
            cov = cls_b.cov.sum(0, keepdim=True)
            glob_b = _LevelBuilder(plan, None, n_t, d, eps_sq, global_union, cov=cov)
        else:
            glob_b = _LevelBuilder(plan, feats[None], n_t, d, eps_sq, global_union)
    plan.run()
    return Rates(
        glob=glob_b.finish(plan) if glob_b is not None else None,
        cls=cls_b.finish(plan) if cls_b is not None else None,
        ok=plan.ok,  # type: ignore[arg-type]
    )


def raise_if_failed(ok: Tensor, values: list[Tensor], **inputs: Tensor) -> None:
    """One host sync: raise a clear error if a factorisation failed or a value is not finite."""
    vals = torch.stack([v.detach().reshape(-1).sum().to(torch.float64) for v in values])
    if not bool(ok & torch.isfinite(vals).all()):
        _check_finite(**inputs)  # names the non-finite input, if that is the cause
        raise NonFiniteError(
            "the coding rate could not be computed (Cholesky factorisation of I + αZᵀZ failed or "
            "overflowed): the features are too large for the working precision — check the "
            "feature normalisation, or use float64=True"
        )


def _prepare(Z: Tensor, float64: bool) -> Tensor:
    return Z.to(compute_dtype(Z.dtype, float64))


# --------------------------------------------------------------------------- public functions


def coding_rate(Z: Tensor, eps_sq: float = 0.5, float64: bool = False) -> Tensor:
    r"""Coding rate ``R(Z) = ½ logdet(I_d + d/(n ε²) ZᵀZ)``.

    Args:
        Z: features ``(n, d)``, rows are samples.
        eps_sq: ε² (the squared distortion), > 0.
        float64: accumulate the second moment and the log-determinant in float64.

    Returns:
        0-dim tensor in ``Z``'s dtype (float32 for half-precision inputs), differentiable.
    """
    eps_sq = check_eps_sq(eps_sq)
    _check_features_shape(Z, "Z")
    with no_autocast(Z.device):
        r = batched_rates(_prepare(Z, float64)[None], eps_sq)
        out = r.glob.sep[0, 0]  # type: ignore[union-attr]
        raise_if_failed(r.ok, [out], Z=Z)
        return out.to(result_dtype(Z.dtype))


def _labelled(
    Z: Tensor,
    labels: Tensor,
    num_classes: int | None,
    eps_sq: float,
    float64: bool,
    value: Callable[[Rates, Tensor], Tensor],
) -> Tensor:
    """Validates a labelled call, computes the global and class rates of ``Z`` and returns
    ``value(rates, class weights n_j/n of shape (K',))`` in ``Z``'s result dtype (raising if a
    factorisation failed)."""
    with no_autocast(Z.device):
        eps_sq = check_eps_sq(eps_sq)
        num_classes = check_num_classes(num_classes)
        _check_features_shape(Z, "Z")
        check_labels_shape(labels, Z.shape[0])
        part = Partition.of(labels.to(device=Z.device, dtype=torch.long), num_classes)
        Zc = _prepare(Z, float64)
        r = batched_rates(Zc[None], eps_sq, part)
        out = value(r, part.counts.to(Zc.dtype) / Z.shape[0])
        raise_if_failed(r.ok, [out], Z=Z)
        return out.to(result_dtype(Z.dtype))


def compressed_coding_rate(
    Z: Tensor,
    labels: Tensor,
    num_classes: int | None = None,
    eps_sq: float = 0.5,
    float64: bool = False,
) -> Tensor:
    r"""Rate of the class-wise coding ``R_c(Z|Π) = Σ_j (n_j/n) ½ logdet(I_d + d/(n_j ε²) Z_jᵀZ_j)``.

    Classes absent from the batch contribute nothing (their weight ``n_j/n`` is 0).

    Args:
        Z: features ``(n, d)``.
        labels: integer class indices ``(n,)`` in ``[0, num_classes)``.
        num_classes: number of classes K, used to validate ``labels``; ``None``: any label >= 0.
        eps_sq: ε², > 0.
        float64: accumulate in float64.

    Returns:
        0-dim tensor, differentiable with respect to ``Z``.
    """
    return _labelled(
        Z, labels, num_classes, eps_sq, float64,
        lambda r, w: (w * r.cls.sep[:, 0]).sum(),  # type: ignore[union-attr]
    )  # fmt: skip


def rate_reduction(
    Z: Tensor,
    labels: Tensor,
    num_classes: int | None = None,
    eps_sq: float = 0.5,
    float64: bool = False,
) -> Tensor:
    r"""Rate reduction ``ΔR(Z|Π) = R(Z) − R_c(Z|Π)`` (MCR²), all log-determinants batched.

    Args:
        Z: features ``(n, d)``.
        labels: integer class indices ``(n,)`` in ``[0, num_classes)``.
        num_classes: number of classes K (validation only); ``None``: any label >= 0.
        eps_sq: ε², > 0.
        float64: accumulate in float64.

    Returns:
        0-dim tensor, differentiable with respect to ``Z``.
    """
    return _labelled(
        Z, labels, num_classes, eps_sq, float64,
        lambda r, w: r.glob.sep[0, 0] - (w * r.cls.sep[:, 0]).sum(),  # type: ignore[union-attr]
    )  # fmt: skip


def pairwise_rate_reduction(
    Z: Tensor, Zh: Tensor, eps_sq: float = 0.5, float64: bool = False
) -> Tensor:
    r"""``ΔR(Z, Ẑ) = R(Z ∪ Ẑ) − ½ R(Z) − ½ R(Ẑ)`` for two sets of ``n`` samples each.

    ``R(Z ∪ Ẑ)`` is the rate of the ``2n`` rows ``[Z; Ẑ]``. Non-negative (concavity of logdet),
    zero iff ``ZᵀZ = ẐᵀẐ``.

    Args:
        Z: features ``(n, d)``.
        Zh: features ``(n, d)`` (same shape).
        eps_sq: ε², > 0.
        float64: accumulate in float64.

    Returns:
        0-dim tensor, differentiable with respect to both inputs.
    """
    eps_sq = check_eps_sq(eps_sq)
    check_pair_shapes(Z, Zh)
    with no_autocast(Z.device):
        dtype = compute_dtype(torch.promote_types(Z.dtype, Zh.dtype), float64)
        r = batched_rates(torch.stack([Z.to(dtype), Zh.to(dtype)]), eps_sq, global_union=True)
        g = r.glob
        out = g.union[0] - 0.5 * g.sep[0, 0] - 0.5 * g.sep[0, 1]  # type: ignore[union-attr]
        raise_if_failed(r.ok, [out], Z=Z, Zh=Zh)
        return out.to(result_dtype(torch.promote_types(Z.dtype, Zh.dtype)))


def samplewise_rate_reduction(
    Z: Tensor, Zh: Tensor, eps_sq: float = 0.5, float64: bool = False
) -> Tensor:
    r"""``ΔR({z_i}, {ẑ_i})`` for every pair of rows, in closed form, batched over ``i``.

    With ``d`` the feature dimension, ``s = ‖z‖²``, ``ŝ = ‖ẑ‖²``, ``c = z·ẑ`` and ``a = d/(2ε²)``
    (the union has two samples) the 2×2 Gram determinant gives

        R({z, ẑ}) = ½ log(1 + a(s + ŝ) + a²(s ŝ − c²)),   R({z}) = ½ log(1 + 2a s),
        ΔR(z, ẑ) = R({z, ẑ}) − ½ R({z}) − ½ R({ẑ})   ≥ 0, = 0 iff z = ±ẑ.

    Args:
        Z: features ``(n, d)``.
        Zh: features ``(n, d)``.
        eps_sq: ε², > 0.
        float64: compute in float64.

    Returns:
        ``(n,)`` tensor, differentiable.
    """
    eps_sq = check_eps_sq(eps_sq)
    check_pair_shapes(Z, Zh)
    with no_autocast(Z.device):
        dtype = compute_dtype(torch.promote_types(Z.dtype, Zh.dtype), float64)
        out = samplewise_rate(Z.to(dtype), Zh.to(dtype), eps_sq)
        raise_if_failed(torch.ones((), dtype=torch.bool, device=out.device), [out], Z=Z, Zh=Zh)
        return out.to(result_dtype(torch.promote_types(Z.dtype, Zh.dtype)))


def samplewise_rate(Z: Tensor, Zh: Tensor, eps_sq: float) -> Tensor:
    """``(n,)`` per-pair ``ΔR({z_i}, {ẑ_i})`` of :func:`samplewise_rate_reduction`, without
    validation, casting or the finiteness check (``Z``, ``Zh`` in the compute dtype)."""
    a = Z.shape[1] / (2.0 * eps_sq)
    s, sh, c = (Z * Z).sum(1), (Zh * Zh).sum(1), (Z * Zh).sum(1)
    cross = (s * sh - c * c).clamp_min(0.0)  # ‖z‖²‖ẑ‖² − (z·ẑ)² ≥ 0 (Cauchy–Schwarz)
    r_union = 0.5 * torch.log1p(a * (s + sh) + a * a * cross)
    return r_union - 0.25 * torch.log1p(2 * a * s) - 0.25 * torch.log1p(2 * a * sh)
