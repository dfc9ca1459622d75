"""One stage of CSC-CTRL: its geometry and its options, in one place.

The mathematics: docs/design.md, §3 "The CSC stage" and §4 "Sparse deconvolution stages".

Geometry. Every stage, encoder or decoder, relates a fine *signal* ``(H, W)`` and a coarse
*code* ``(h, w)`` by the arithmetic of ``conv2d`` (fine → coarse, :func:`code_size`) and of
``conv_transpose2d`` with the ``output_padding`` that lands exactly on the fine size (coarse →
fine, :func:`transposed_output_padding`). ``padding=None`` means ``k // 2``
(:func:`default_padding`).

Options. :class:`EncoderStageOptions` and :class:`DecoderStageOptions` are the one table of what a
stage takes: each option's name, type, default and meaning. :class:`~ctrl_csc.nn.CSCLayer` and
:class:`~ctrl_csc.nn.SparseDeconvLayer` take their keyword defaults from them, and the stage specs
of the models (``ctrl_csc/models/specs.py``) are subclasses of them, so the layer and the spec of
one role cannot disagree. Each option has one check (:data:`CHECKS`), and the options that
constrain one another have one check per constraint (:data:`RELATIONS`). A check is told the name
of the setting (``"CSCLayer: lmbda"``, ``"model.encoder.stages[1].lmbda"``) and names it in its
``ValueError``.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = [
    "ALGORITHMS",
    "BACKWARDS",
    "CHECKS",
    "KINDS",
    "RELATIONS",
    "OptionError",
    "DecoderStageOptions",
    "EncoderStageOptions",
    "StageOptions",
    "check_channels",
    "check_options",
    "check_relations",
    "code_size",
    "conv_output_size",
    "default_padding",
    "transposed_output_padding",
    "upsampled_size",
]

#: The kinds of a decoder stage (:class:`~ctrl_csc.nn.SparseDeconvLayer`).
KINDS = ("synthesis", "inverse_csc")
#: The solver's algorithms and its ways of differentiating (:mod:`ctrl_csc.nn.solver`).
ALGORITHMS = ("ista", "fista")
BACKWARDS = ("unrolled", "checkpoint", "implicit")


# ---- geometry -----------------------------------------------------------------------------------
def default_padding(kernel_size: int, padding: int | None = None) -> int:
    """``padding``, or ``k // 2`` when it is ``None`` (``⌈H/s⌉`` codes for odd ``k``)."""
    return kernel_size // 2 if padding is None else padding


def conv_output_size(size: int, kernel_size: int, stride: int, padding: int) -> int:
    """``conv2d`` output length ``⌊(size + 2p − k)/s⌋ + 1`` (may be ``≤ 0`` for tiny inputs)."""
    return (size + 2 * padding - kernel_size) // stride + 1


def code_size(
    signal_size: Sequence[int],
    kernel_size: int,
    stride: int,
    padding: int | None,
    owner: str,
    source: str = "the input",
    advice: str = "",
) -> tuple[int, int]:
    """Spatial size ``(h, w)`` of the code of a stage whose signal is ``(H, W)`` (``conv2d``
    arithmetic, both roles: an encoder stage's input, a decoder stage's output).

    Args:
        owner: the stage, as the message should name it (``"CSCLayer"``).
        source: what the size comes from (``"dataset.image_size=32"``).
        advice: appended to the message after ``"; "``.

    Raises:
        ValueError: ``"{source} is too small for {owner}: ..."`` when the code would be smaller
            than 1x1.
    """
    p = default_padding(kernel_size, padding)
    fine = (int(signal_size[0]), int(signal_size[1]))
    h, w = (conv_output_size(n, kernel_size, stride, p) for n in fine)
    if h < 1 or w < 1:
        raise ValueError(
            f"{source} is too small for {owner}: kernel_size={kernel_size}, stride={stride}, "
            f"padding={p} would turn a {fine[0]}x{fine[1]} signal into a {h}x{w} code (it must "
            f"be at least 1x1)" + (f"; {advice}" if advice else "")
        )
    return (h, w)


def upsampled_size(code: Sequence[int], stride: int) -> tuple[int, int]:
    """``(h·s, w·s)``: the default output size of a decoder stage with code size ``(h, w)``."""
    return (int(code[0]) * stride, int(code[1]) * stride)


def transposed_output_padding(
    coarse: Sequence[int],
    fine: Sequence[int],
    kernel_size: int,
    stride: int,
    padding: int,
    owner: str,
) -> tuple[int, int]:
    """``output_padding`` making ``conv_transpose2d`` map ``coarse`` exactly onto ``fine``.

    ``conv_transpose2d`` returns ``(h − 1)s − 2p + k + o`` with ``0 ≤ o < s``; this is also the
    condition for ``conv2d`` to map ``fine`` back onto ``coarse``, so the two are adjoint.

    Raises:
        ValueError: naming the sizes and settings when no valid ``o`` exists.
    """
    pads = []
    for c, f in zip(coarse, fine):
        low = (c - 1) * stride - 2 * padding + kernel_size
        o = f - low
        if not 0 <= o < stride:
            raise ValueError(
                f"{owner}: a ({tuple(coarse)[0]}, {tuple(coarse)[1]}) code cannot be mapped to "
                f"output size ({tuple(fine)[0]}, {tuple(fine)[1]}) with kernel_size="
                f"{kernel_size}, stride={stride}, padding={padding}: a code of length {c} "
                f"reaches lengths {low}..{low + stride - 1} (output_padding would be {o}; it "
                f"must lie in [0, stride)). Change output_size, padding or the code size."
            )
        pads.append(o)
    return (pads[0], pads[1])


# ---- options ------------------------------------------------------------------------------------
class OptionError(ValueError):
    """An invalid stage option, raised when an options object is made. Its message names the
    option alone (``"lmbda must be >= 0, got -1"``) or states a constraint between options;
    :meth:`at` puts the setting of whoever made it in front."""

    def __init__(self, message: str, relation: bool) -> None:
        super().__init__(message)
        self.message, self.relation = message, relation

    def at(self, owner: str, separator: str = ".") -> str:
        """The message for the stage ``owner``: ``"{owner}{separator}lmbda must be ..."`` for one
        option (``"model.encoder.stages[1].lmbda"``, or ``"CSCLayer: lmbda"`` with separator
        ``": "``), ``"{owner}: with lmbda_relative=True ..."`` for a constraint."""
        return f"{owner}{': ' if self.relation else separator}{self.message}"


@dataclass(frozen=True, kw_only=True)
class StageOptions:
    """The options of one stage with their defaults (both roles; the role classes add theirs).

    Attributes:
        kernel_size: atom size ``k``.
        stride: ``s`` (1 keeps the resolution, 2 halves it; a decoder stage doubles it).
        padding: ``p``; ``None`` means ``k // 2``.
        lmbda: ℓ1 weight ``λ ≥ 0``.
        mu: ℓ2 (elastic-net) weight ``μ ≥ 0``.
        n_iter: unrolled ISTA/FISTA iterations ``T ≥ 1``.
        algorithm: ``"ista"`` or ``"fista"``.
        normalize_atoms: use unit-norm atoms (on the fly, differentiably).
        learn_lmbda: learn ``λ`` (as ``softplus(ρ)``, needs ``lmbda > 0``).
        learn_step: learn a multiplier on the step, bounded so the iterations still converge.
        power_iters: power-iteration steps per training forward (``≥ 1``: the dictionary moves
            every step, and a step size from an old estimate can exceed ``1/L``).
        init_power_iters: power-iteration steps at a new input size / before evaluation.
        lmbda_relative: ``lmbda`` is a fraction ``ρ < 1`` of each sample's ``λ_max = ‖Dᵀx‖_∞``
            (``max(Dᵀx)`` for non-negative codes), the smallest λ giving the zero code:
            ``λ = ρ·λ_max`` means the same at every stage and input scale.
        density: ``None``, or a fraction ``ρ ∈ (0, 1)`` that sets each sample's ``λ`` instead of
            ``lmbda``: the value at which the first ISTA step from zero keeps the ``⌈ρ·M⌉``
            largest of the code's ``M`` entries. Later steps move the support a little (at
            ``T = 2`` the code stays within a few hundredths of ``ρ``); the learned dictionary
            cannot make the code denser, as it can with a relative ``λ``.
        init_std: ``None``: the stored atoms start at unit norm; a number: their entries start
            i.i.d. ``N(0, init_std²)``. With ``normalize_atoms`` the operators use unit-norm
            atoms either way, and the stored scale only sets how fast an optimiser that steps
            each entry by about its learning rate (Adam) turns the atoms: unit-norm storage turns
            an atom of ``n`` entries ``∝ √n`` times faster, so small first-stage atoms (``n =
            C·k²``, e.g. 16) barely move while large later ones do; one ``init_std`` for every
            stage gives each the same speed.
        backward: how gradients go through the solver: ``"unrolled"`` (through every
            iteration; saved memory grows with ``T``), ``"checkpoint"`` (the same gradients,
            iterations replayed in backward, ``O(√T)`` saved codes) or ``"implicit"`` (the
            gradient of the converged Lasso solution through its support, constant memory;
            refuses ``learn_step``). See :mod:`ctrl_csc.nn.solver`.
        compile: fuse each iteration's elementwise work with ``torch.compile`` (eager, with a
            warning, where compile cannot run).
        nonnegative: constrain the solution to be ``≥ 0``; its default depends on the role (see
            the role classes).
    """

    ROLE: ClassVar[str] = ""

    kernel_size: int = 3
    stride: int = 1
    padding: int | None = None
    lmbda: float = 0.1
    mu: float = 0.0
    n_iter: int = 2
    algorithm: str = "fista"
    normalize_atoms: bool = True
    learn_lmbda: bool = False
    learn_step: bool = False
    power_iters: int = 1
    init_power_iters: int = 50
    lmbda_relative: bool = False
    density: float | None = None
    init_std: float | None = None
    backward: str = "unrolled"
    compile: bool = False

    def __post_init__(self) -> None:
        """Validated once, when made: each option's check (:data:`CHECKS`), then the constraints
        between them (:data:`RELATIONS`); an :class:`OptionError` names what is wrong."""
        options = self.layer_kwargs()
        try:
            check_options(options, "")
        except ValueError as err:
            raise OptionError(str(err), relation=False) from None
        try:
            check_relations(options, "")
        except ValueError as err:
            raise OptionError(str(err), relation=True) from None

    def replaced(self, owner: str, **changes: Any) -> StageOptions:
        """A copy with ``changes`` (validated); a ``ValueError`` naming ``owner`` (``"CSCLayer"``)
        for an unknown option or an invalid value."""
        unknown = sorted(set(changes) - set(self.option_names()))
        if unknown:
            raise ValueError(
                f"{owner}: unknown options {unknown}; the options of a stage: "
                f"{sorted(self.option_names())}"
            )
        try:
            return dataclasses.replace(self, **changes)
        except OptionError as err:
            raise ValueError(err.at(owner, ": ")) from None

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The options of this role, i.e. the keyword arguments of its layer besides channels."""
        role = next((c for c in cls.__mro__ if "ROLE" in vars(c) and c.ROLE), cls)
        return tuple(f.name for f in dataclasses.fields(role))

    def layer_kwargs(self) -> dict[str, Any]:
        """The options of this role as a mapping (other fields of a subclass left out)."""
        return {name: getattr(self, name) for name in self.option_names()}


@dataclass(frozen=True, kw_only=True)
class EncoderStageOptions(StageOptions):
    """Options of an encoder stage (:class:`~ctrl_csc.nn.CSCLayer`): those of
    :class:`StageOptions`, and

    Attributes:
        nonnegative: ``True``: the code is ``z ≥ 0`` (one-sided shrinkage), the representation
            the next stage and the features read.
    """

    ROLE: ClassVar[str] = "encoder"

    nonnegative: bool = True


@dataclass(frozen=True, kw_only=True)
class DecoderStageOptions(StageOptions):
    """Options of a decoder stage (:class:`~ctrl_csc.nn.SparseDeconvLayer`): those of
    :class:`StageOptions`, and

    Attributes:
        kind: ``"inverse_csc"`` (unrolled sparse coding that upsamples, the sparse
            deconvolution of the method) or ``"synthesis"`` (a transposed convolution; the solver
            options are unused and ``learn_lmbda``/``learn_step`` refused).
        nonnegative: ``False``: a decoder stage's output is signed, because the last stage's
            output is the image (in ``[-1, 1]``); inner stages may set ``true``.
    """

    ROLE: ClassVar[str] = "decoder"

    kind: str = "inverse_csc"
    nonnegative: bool = False


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer(value: Any, setting: str, low: int) -> None:
    if not _is_int(value) or value < low:
        raise ValueError(f"{setting} must be an integer >= {low}, got {value!r}")


def _choice(value: Any, setting: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{setting} must be one of {choices}, got {value!r}")


def _at_least_zero(value: Any, setting: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
        raise ValueError(f"{setting} must be >= 0, got {value}")


def check_channels(value: Any, setting: str) -> None:
    """``in_channels`` / ``out_channels``: an integer ``≥ 1``."""
    _integer(value, setting, 1)


def check_kernel_size(value: Any, setting: str) -> None:
    _integer(value, setting, 1)


def check_stride(value: Any, setting: str) -> None:
    _integer(value, setting, 1)


def check_padding(value: Any, setting: str) -> None:
    if value is not None and (not _is_int(value) or value < 0):
        raise ValueError(f"{setting} must be an integer >= 0 or null, got {value!r}")


def check_lmbda(value: Any, setting: str) -> None:
    _at_least_zero(value, setting)


def check_density(value: Any, setting: str) -> None:
    """``density``: ``None`` or a number in ``(0, 1)``."""
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < 1
    ):
        raise ValueError(f"{setting} must be a fraction in (0, 1) or null, got {value!r}")


def check_mu(value: Any, setting: str) -> None:
    _at_least_zero(value, setting)


def check_n_iter(value: Any, setting: str) -> None:
    _integer(value, setting, 1)


def check_algorithm(value: Any, setting: str) -> None:
    _choice(value, setting, ALGORITHMS)


def check_power_iters(value: Any, setting: str) -> None:
    _integer(value, setting, 1)


def check_init_power_iters(value: Any, setting: str) -> None:
    _integer(value, setting, 1)


def check_init_std(value: Any, setting: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{setting} must be a number > 0 or null, got {value!r}")


def check_backward(value: Any, setting: str) -> None:
    _choice(value, setting, BACKWARDS)


def check_compile(value: Any, setting: str) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{setting} must be true or false, got {value!r}")


def check_kind(value: Any, setting: str) -> None:
    _choice(value, setting, KINDS)


#: One check per option, ``check(value, setting)``. The flags ``normalize_atoms``,
#: ``nonnegative``, ``learn_lmbda``, ``learn_step`` and ``lmbda_relative`` are read as truth values
#: and have none of their own (the last three take part in :data:`RELATIONS`).
CHECKS: dict[str, Callable[[Any, str], None]] = {
    "kernel_size": check_kernel_size,
    "stride": check_stride,
    "padding": check_padding,
    "lmbda": check_lmbda,
    "density": check_density,
    "mu": check_mu,
    "n_iter": check_n_iter,
    "algorithm": check_algorithm,
    "power_iters": check_power_iters,
    "init_power_iters": check_init_power_iters,
    "init_std": check_init_std,
    "backward": check_backward,
    "compile": check_compile,
    "kind": check_kind,
}


def check_relative_lmbda(options: Mapping[str, Any], prefix: str) -> None:
    """``lmbda_relative`` needs ``lmbda < 1``."""
    lmbda = options.get("lmbda", StageOptions.lmbda)
    if options.get("lmbda_relative") and not lmbda < 1:
        raise ValueError(
            f"{prefix}with lmbda_relative=True, lmbda is a fraction of λ_max = ‖Dᵀu‖_∞ and "
            f"must be < 1 (λ >= λ_max makes every code zero), got {lmbda}"
        )


def check_learned_lmbda(options: Mapping[str, Any], prefix: str) -> None:
    """``learn_lmbda`` needs ``lmbda > 0``."""
    if options.get("learn_lmbda") and options.get("lmbda", StageOptions.lmbda) == 0:
        raise ValueError(
            f"{prefix}learn_lmbda=True needs lmbda > 0 (λ = softplus(ρ) is kept positive)"
        )


def check_density_not_learned(options: Mapping[str, Any], prefix: str) -> None:
    """``density`` sets ``λ`` itself: it refuses ``learn_lmbda``."""
    if options.get("density") is not None and options.get("learn_lmbda"):
        raise ValueError(
            f"{prefix}density sets each sample's λ from the code's density, so there is no λ to "
            f"learn; use learn_lmbda=False with density, or density=null"
        )


def check_implicit_step(options: Mapping[str, Any], prefix: str) -> None:
    """``backward="implicit"`` refuses ``learn_step``."""
    if options.get("backward") == "implicit" and options.get("learn_step"):
        raise ValueError(
            f"{prefix}backward='implicit' differentiates the converged Lasso solution, which "
            f"does not depend on the step size, so a learned step (learn_step=True) would get no "
            f"gradient; use backward='unrolled' or 'checkpoint' with learn_step, or "
            f"learn_step=False"
        )


def check_synthesis_learns_nothing(options: Mapping[str, Any], prefix: str) -> None:
    """``kind="synthesis"`` has no solver: it refuses ``learn_lmbda`` and ``learn_step``."""
    if options.get("kind") == "synthesis" and (
        options.get("learn_lmbda") or options.get("learn_step")
    ):
        raise ValueError(
            f"{prefix}learn_lmbda/learn_step only apply to kind='inverse_csc' "
            f"(got kind='synthesis')"
        )


#: One check per constraint between options, ``check(options, prefix)``.
RELATIONS: tuple[Callable[[Mapping[str, Any], str], None], ...] = (
    check_relative_lmbda,
    check_learned_lmbda,
    check_density_not_learned,
    check_implicit_step,
    check_synthesis_learns_nothing,
)


def check_options(options: Mapping[str, Any], prefix: str) -> None:
    """Each option's own check (:data:`CHECKS`) for the options in ``options``.

    ``prefix`` joined with an option's name names the setting: ``"CSCLayer: "`` gives
    ``"CSCLayer: lmbda must be >= 0"``, ``"model.encoder.stages[1]."`` gives
    ``"model.encoder.stages[1].lmbda must be >= 0"``.
    """
    for name, check in CHECKS.items():
        if name in options:
            check(options[name], f"{prefix}{name}")


def check_relations(options: Mapping[str, Any], prefix: str) -> None:
    """The constraints between options (:data:`RELATIONS`); messages begin with ``prefix``."""
    for check in RELATIONS:
        check(options, prefix)
