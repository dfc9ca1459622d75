"""``torch.compile`` for the solver's iterations.

Whether it can run here, and one compiled segment per set of constants, kept for the process.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

from .iteration import Callback, segment
from .strided_conv import StridedConv

__all__ = ["compile_available", "segment_function"]


_COMPILED: dict[object, Callable[..., object] | None] = {}


def compile_available() -> bool:
    """Whether ``torch.compile`` can build a kernel here (it needs a C++ compiler on CPU);
    tried once per process on a tiny function."""
    if "ok" not in _COMPILED:
        try:
            fn = torch.compile(lambda x: torch.relu(x - 1.0), fullgraph=True)
            fn(torch.zeros(4))
            _COMPILED["ok"] = fn
        except Exception:  # noqa: BLE001 - any failure means: stay eager
            _COMPILED["ok"] = None  # type: ignore[assignment]
    return _COMPILED["ok"] is not None


def segment_function(
    operator: StridedConv,
    betas: list[float],
    first: int,
    last: int,
    nonnegative: bool,
    lmbda_relative: bool,
    density: float | None,
    fused: bool,
    callback: Callback | None,
) -> Callable[..., tuple[Tensor, Tensor]]:
    """:func:`~ctrl_csc.nn.iteration.segment` with its constants bound; with ``fused``,
    ``torch.compile``-d (once per process and set of constants), which fuses the elementwise
    work between the convolutions (prox, step, momentum) and lets inductor pick the
    convolutions' memory layout."""
    constants = dict(
        geometry=(operator.stride, operator.padding, operator.output_padding, operator.transposed),
        betas=tuple(betas), first=first, last=last, nonnegative=nonnegative,
        lmbda_relative=lmbda_relative, density=density,
    )  # fmt: skip
    if not fused or callback is not None:
        return partial(segment, callback=callback, **constants)
    key = tuple(sorted(constants.items()))
    fn = _COMPILED.get(key)
    if fn is None:
        fn = _COMPILED[key] = torch.compile(
            partial(segment, traced=True, **constants), fullgraph=True
        )
    return fn  # type: ignore[return-value]
