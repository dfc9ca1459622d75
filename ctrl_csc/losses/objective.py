r"""The CTRL objectives and the record they return (docs/design.md, §7 "The CTRL objectives").

The signs of the minimax game live here and only here: :attr:`ObjectiveTerms.total` is what the
**encoder maximises**, :attr:`ObjectiveTerms.decoder_total` what the **decoder minimises**.

* ``binary`` (no labels):   ``T = ΔR(Z, Ẑ)``; both players use ``T``.
* ``multiclass`` (labels):  ``T = γ₁ ΔR(Z|Π) + γ₂ ΔR(Ẑ|Π) + γ₃ Σ_j ΔR(Z_j, Ẑ_j)``; both use ``T``.
* ``samplewise`` (no labels, u-CTRL):
  encoder maximises ``R(Z) + ΔR(Z, Ẑ) − β D``, decoder minimises ``ΔR(Z, Ẑ) + β D``, with
  ``D = (1/n) Σ_i d(z_i, ẑ_i)`` the **mean** over the ``n`` samples of the (global) batch. u-CTRL
  writes ``β Σ_i``; we divide by ``n`` so that ``β`` keeps its meaning when the batch size (or the
  number of GPUs) changes — the rate terms do not grow with ``n``, a sum would. A summed penalty
  with weight ``β_Σ`` is ``β = n β_Σ``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .distributed import all_gather, all_gather_with_grad, distributed_world_size
from .rate import (
    Partition,
    batched_rates,
    check_eps_sq,
    check_labels_shape,
    check_num_classes,
    check_pair_shapes,
    compute_dtype,
    no_autocast,
    raise_if_failed,
    result_dtype,
    samplewise_rate,
)

__all__ = ["CTRLObjective", "ObjectiveTerms"]


@dataclass
class ObjectiveTerms:
    """What one evaluation of a :class:`CTRLObjective` returns.

    Attributes:
        total: 0-dim tensor, the quantity the **encoder maximises**.
        decoder_total: 0-dim tensor, the quantity the **decoder minimises** (``total`` itself for
            ``binary`` and ``multiclass``).
        terms: named parts (0-dim tensors, still attached to the graph), e.g. ``R_Z``,
            ``delta_R_Z_Zh``; the names depend on the variant.
    """

    total: Tensor
    decoder_total: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float]:
        """``total``, ``decoder_total`` and every term as python floats (one host sync)."""
        names = ["total", "decoder_total", *self.terms]
        tensors = [self.total, self.decoder_total, *self.terms.values()]
        values = torch.stack([t.detach().to(torch.float64).reshape(()) for t in tensors]).tolist()
        return dict(zip(names, values))


def _distance_rate(Z: Tensor, Zh: Tensor, eps_sq: float) -> Tensor:
    return samplewise_rate(Z, Zh, eps_sq)


def _distance_l2(Z: Tensor, Zh: Tensor, eps_sq: float) -> Tensor:
    return (Z - Zh).pow(2).sum(1)


def _distance_cosine(Z: Tensor, Zh: Tensor, eps_sq: float) -> Tensor:
    return 1.0 - F.cosine_similarity(Z, Zh, dim=1, eps=1e-8)


_DISTANCES: dict[str, Callable[[Tensor, Tensor, float], Tensor]] = {
    "rate": _distance_rate,
    "l2": _distance_l2,
    "cosine": _distance_cosine,
}
_VARIANTS = ("binary", "multiclass", "samplewise")


def check_weight(name: str, value: object) -> None:
    """A loss weight: a finite number >= 0 (not a bool), or one ``ValueError`` naming it."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (math.isfinite(value) and value >= 0)
    ):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


class CTRLObjective(nn.Module):
    r"""Rate-reduction objective of the closed-loop transcription game.

    Call it as ``obj(Z, Zh)`` or ``obj(Z, Zh, labels)`` with ``Z = f(X)``, ``Zh = f(g(Z))`` of
    shape ``(n, d)`` (rows are samples, ``Zh[i]`` the transcription of ``Z[i]``) and integer
    ``labels`` of shape ``(n,)``; returns an :class:`ObjectiveTerms`.

    Args:
        variant: ``"binary"`` (``T = ΔR(Z, Ẑ)``), ``"multiclass"`` (needs labels; ``T = γ₁ΔR(Z|Π)
            + γ₂ΔR(Ẑ|Π) + γ₃ Σ_j ΔR(Z_j, Ẑ_j)``) or ``"samplewise"`` (u-CTRL, see the module
            docstring; the sample-wise penalty is the mean over samples).
        eps_sq: ε² of the coding rates, > 0 (0.5 as in the CTRL reference code).
        num_classes: number of classes K, used to validate labels (``multiclass``); ``None``
            accepts any label ≥ 0. Absent classes contribute nothing either way.
        gammas: (γ₁, γ₂, γ₃), weights of the ``multiclass`` terms.
        beta: β ≥ 0, weight of the sample-wise penalty in what the *decoder* minimises
            (``samplewise``); 10 as the shipped configs (at 1000 the encoder collapsed onto
            features that ignore its input, experiments/notes/method.md §5).
        encoder_beta: weight of the sample-wise penalty in what the *encoder* maximises; 0 by
            default (the encoder as a critic, maximising R(Z) + ΔR(Z, Ẑ)), as the shipped
            configs: with the penalty on the encoder too it lowers it by becoming blind to how
            ``X̂`` differs from ``X`` (mapping both to the same features) instead of waiting for
            the decoder to improve, and the game stalled at 7–8 dB (method.md §7). ``None``
            uses ``beta`` for both players, as u-CTRL writes it.
        distance: sample-wise distance ``d(z, ẑ)`` (``samplewise``): ``"l2"`` (default, as
            u-CTRL uses in practice) — ``‖z − ẑ‖²``; ``"cosine"`` — ``1 − cos(z, ẑ)``;
            ``"rate"`` — the rate reduction ``ΔR({z}, {ẑ})`` of the pair, in closed form (its
            gradient is zero at ``ẑ ⟂ z``, where an untrained model starts).
        gather: when ``torch.distributed`` is initialised with more than one rank, all-gather
            ``Z``, ``Zh`` (with gradients, :func:`~ctrl_csc.losses.all_gather_with_grad`) and the
            labels, so every rank computes the objective of the global batch. The gathered
            gradient is summed over ranks: with DDP's averaging of parameter gradients, these
            equal the single-process ones (see :mod:`ctrl_csc.losses.distributed`).
        float64: accumulate second moments and log-determinants in float64 (results are
            returned in the features' dtype).

    Labels passed to a label-free variant are accepted and not used (check :attr:`needs_labels`
    to avoid gathering them).
    """

    def __init__(
        self,
        variant: str = "binary",
        eps_sq: float = 0.5,
        num_classes: int | None = None,
        gammas: Sequence[float] = (1.0, 1.0, 1.0),
        beta: float = 10.0,
        distance: str = "l2",
        encoder_beta: float | None = 0.0,
        gather: bool = True,
        float64: bool = False,
    ) -> None:
        super().__init__()
        if variant not in _VARIANTS:
            raise ValueError(f"variant must be one of {_VARIANTS}, got {variant!r}")
        if distance not in _DISTANCES:
            raise ValueError(f"distance must be one of {tuple(_DISTANCES)}, got {distance!r}")
        gammas = tuple(float(g) for g in gammas)
        if len(gammas) != 3 or not all(math.isfinite(g) for g in gammas):
            raise ValueError(f"gammas must be three finite numbers (γ₁, γ₂, γ₃), got {gammas!r}")
        check_weight("beta", beta)
        if encoder_beta is not None:
            check_weight("encoder_beta", encoder_beta)
        self.variant = variant
        self.eps_sq = check_eps_sq(eps_sq)
        self.num_classes = check_num_classes(num_classes)
        self.gammas = gammas
        self.beta = float(beta)
        self.encoder_beta = self.beta if encoder_beta is None else float(encoder_beta)
        self.distance = distance
        self.gather = bool(gather)
        self.float64 = bool(float64)

    @property
    def needs_labels(self) -> bool:
        """Whether calls need ``labels`` (only ``multiclass``)."""
        return self.variant == "multiclass"

    def extra_repr(self) -> str:
        parts = [f"variant={self.variant!r}", f"eps_sq={self.eps_sq}"]
        if self.variant == "multiclass":
            parts += [f"num_classes={self.num_classes}", f"gammas={self.gammas}"]
        if self.variant == "samplewise":
            parts += [f"beta={self.beta}", f"distance={self.distance!r}"]
            if self.encoder_beta != self.beta:
                parts.append(f"encoder_beta={self.encoder_beta}")
        return ", ".join(parts + [f"gather={self.gather}", f"float64={self.float64}"])

    def forward(self, Z: Tensor, Zh: Tensor, labels: Tensor | None = None) -> ObjectiveTerms:
        """Evaluate the objective.

        Args:
            Z: ``(n, d)`` features of the data (this rank's share when distributed).
            Zh: ``(n, d)`` features of the transcriptions.
            labels: ``(n,)`` integer class indices (``multiclass`` only).

        Returns:
            :class:`ObjectiveTerms`, computed on the global batch when gathering.
        """
        check_pair_shapes(Z, Zh)
        if self.needs_labels:
            if labels is None:
                raise ValueError(
                    "variant='multiclass' needs labels: call objective(Z, Zh, labels), or use "
                    "variant='binary' / 'samplewise' for unlabelled data"
                )
            check_labels_shape(labels, Z.shape[0])
            labels = labels.to(device=Z.device, dtype=torch.long)
        else:
            labels = None
        out_dtype = result_dtype(torch.promote_types(Z.dtype, Zh.dtype))
        with no_autocast(Z.device):
            dtype = compute_dtype(torch.promote_types(Z.dtype, Zh.dtype), self.float64)
            pairs = torch.stack([Z.to(dtype), Zh.to(dtype)], dim=1)  # (n, 2, d): one collective
            if self.gather and distributed_world_size() > 1:
                pairs = all_gather_with_grad(pairs)
                if labels is not None:
                    labels = all_gather(labels)
            # from here on every rank holds the same global batch: an error below is raised on
            # all ranks together (none is left waiting in a collective)
            part = Partition.of(labels, self.num_classes) if labels is not None else None
            feats = pairs.transpose(0, 1)  # (2, n, d) = [Z; Zh]
            result, ok = self._variants[self.variant](self, feats, part)
            raise_if_failed(ok, [result.total, result.decoder_total], Z=feats[0], Zh=feats[1])
        return ObjectiveTerms(
            total=result.total.to(out_dtype),
            decoder_total=result.decoder_total.to(out_dtype),
            terms={k: v.to(out_dtype) for k, v in result.terms.items()},
        )

    # -- variants: features (2, n, d) = [Z; Zh] gathered, validated and cast; return (terms, ok)

    def _pair(self, feats: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        r = batched_rates(feats, self.eps_sq, global_union=True)
        g = r.glob
        r_z, r_zh, r_u = g.sep[0, 0], g.sep[0, 1], g.union[0]  # type: ignore[union-attr]
        terms = {
            "R_Z": r_z,
            "R_Zh": r_zh,
            "R_Z_union_Zh": r_u,
            "delta_R_Z_Zh": r_u - 0.5 * r_z - 0.5 * r_zh,
        }
        return terms, r.ok

    def _binary(self, feats: Tensor, part: Partition | None) -> tuple[ObjectiveTerms, Tensor]:
        terms, ok = self._pair(feats)
        t = terms["delta_R_Z_Zh"]
        return ObjectiveTerms(total=t, decoder_total=t, terms=terms), ok

    def _multiclass(self, feats: Tensor, part: Partition | None) -> tuple[ObjectiveTerms, Tensor]:
        assert part is not None
        r = batched_rates(feats, self.eps_sq, part, class_union=True)
        g, c = r.glob, r.cls
        w = part.counts.to(feats.dtype) / feats.shape[1]  # n_j / n over the classes present
        r_z, r_zh = g.sep[0, 0], g.sep[0, 1]  # type: ignore[union-attr]
        rc_z, rc_zh = (w * c.sep[:, 0]).sum(), (w * c.sep[:, 1]).sum()  # type: ignore[union-attr]
        classwise = (c.union - 0.5 * c.sep[:, 0] - 0.5 * c.sep[:, 1]).sum()  # type: ignore
        terms = {
            "R_Z": r_z,
            "R_Zh": r_zh,
            "Rc_Z": rc_z,
            "Rc_Zh": rc_zh,
            "delta_R_Z": r_z - rc_z,
            "delta_R_Zh": r_zh - rc_zh,
            "delta_R_classwise": classwise,
        }
        g1, g2, g3 = self.gammas
        t = g1 * terms["delta_R_Z"] + g2 * terms["delta_R_Zh"] + g3 * classwise
        return ObjectiveTerms(total=t, decoder_total=t, terms=terms), r.ok

    def _samplewise(self, feats: Tensor, part: Partition | None) -> tuple[ObjectiveTerms, Tensor]:
        terms, ok = self._pair(feats)
        dist = _DISTANCES[self.distance](feats[0], feats[1], self.eps_sq).mean()
        terms["samplewise_distance"] = dist
        dr = terms["delta_R_Z_Zh"]
        return (
            ObjectiveTerms(
                total=terms["R_Z"] + dr - self.encoder_beta * dist,
                decoder_total=dr + self.beta * dist,
                terms=terms,
            ),
            ok,
        )

    _variants: dict[str, Callable[..., tuple[ObjectiveTerms, Tensor]]] = {
        "binary": _binary,
        "multiclass": _multiclass,
        "samplewise": _samplewise,
    }
