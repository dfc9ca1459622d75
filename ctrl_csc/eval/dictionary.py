"""Did the dictionaries learn? How far each CSC stage's dictionary moved, and how well it codes.

For every CSC stage ``i`` of an encoder (the :class:`ctrl_csc.nn.CSCLayer` modules in
``encoder.stages``; ``i`` is the index in that list, as in ``density/enc{i}``):

* ``dictionary/enc{i}/moved`` — ``‖Â − Â₀‖_F / ‖Â₀‖_F`` with ``Â`` the learned dictionary and
  ``Â₀`` the initial one, every atom ``A[j]`` (over its ``(C_in, k, k)`` entries) scaled to unit
  norm first. 0 means unchanged; two unrelated random dictionaries give about ``√2``.
* ``dictionary/enc{i}/residual`` — how well the stage's own sparse code explains its input:
  ``sqrt(Σ_n ‖u_n − D z_n‖² / Σ_n ‖u_n‖²)`` over the evaluated images, with ``u_n`` what the
  encoder feeds the stage (the image for stage 0, ``act(norm(z_{i−1}))`` after it), ``z_n`` the
  stage's code of it (its λ, μ, T, step) and ``D`` its synthesis operator (the atoms as the layer
  uses them, e.g. normalised). The ratio of sums over the whole set, not a mean of per-image
  ratios.
* ``dictionary/enc{i}/residual_init`` — the same for the *initial* dictionary: the same inputs
  ``u_n`` (those the learned model feeds the stage) coded by the same stage solver (the learned
  λ, step multiplier, T) with the initial atoms in place of the learned ones.

The stage inputs and codes are captured with forward hooks on the layers, so any encoder that runs
its CSC layers as modules works, whatever it does between them.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable
from contextlib import AbstractContextManager

import torch
from torch import Tensor, nn

from ctrl_csc.nn import CSCLayer

__all__ = ["DictionaryProbe", "csc_stages", "dictionary_moved", "dictionary_report"]

log = logging.getLogger(__name__)


def csc_stages(encoder: nn.Module) -> list[tuple[int, CSCLayer]]:
    """``[(i, layer)]`` for the entries of ``encoder.stages`` that are CSC layers (empty for
    encoders without them, e.g. the DCGAN and conv-autoencoder baselines)."""
    stages = getattr(encoder, "stages", None)
    if not isinstance(stages, Iterable):
        return []
    return [(i, m) for i, m in enumerate(stages) if isinstance(m, CSCLayer)]


def _unit_atoms(weight: Tensor) -> Tensor:
    w = weight.detach().double().cpu()
    norms = torch.linalg.vector_norm(w.flatten(1), dim=1).clamp_min(1e-300)
    return w / norms.view(-1, *([1] * (w.dim() - 1)))


def dictionary_moved(weight: Tensor, initial_weight: Tensor) -> float:
    """``‖Â − Â₀‖_F / ‖Â₀‖_F`` with every atom of both scaled to unit norm (in float64).

    Args:
        weight: learned dictionary ``(C_out, C_in, k, k)`` (atom ``j`` is ``weight[j]``).
        initial_weight: the initial one, same shape.
    """
    if weight.shape != initial_weight.shape:
        raise ValueError(
            f"dictionary_moved: shapes differ, {tuple(weight.shape)} vs "
            f"{tuple(initial_weight.shape)}"
        )
    a, a0 = _unit_atoms(weight), _unit_atoms(initial_weight)
    return float(torch.linalg.vector_norm(a - a0) / torch.linalg.vector_norm(a0).clamp_min(1e-300))


def _check_initial(
    stages: list[tuple[int, CSCLayer]], initial_encoder: nn.Module
) -> dict[int, CSCLayer]:
    initial = dict(csc_stages(initial_encoder))
    out = {}
    for i, layer in stages:
        other = initial.get(i)
        if other is None or other.weight.shape != layer.weight.shape:
            got = None if other is None else tuple(other.weight.shape)
            raise ValueError(
                f"the initial encoder does not match the evaluated one: stage {i} has dictionary "
                f"{tuple(layer.weight.shape)}, the initial encoder {got}; build the initial "
                "models from the same model config (and seed) as the run"
            )
        out[i] = other
    return out


class DictionaryProbe(AbstractContextManager):
    """Accumulate the per-stage residuals while an encoder runs (see the module docstring).

    Inside ``with probe:`` every forward of a CSC stage of ``encoder`` adds its batch's
    ``Σ‖u − D z‖²`` and ``Σ‖u‖²`` (float64), and with an initial encoder those of the initial
    dictionary's code of the same ``u``; :meth:`metrics` turns the sums into the metrics. Run the
    encoder under ``torch.no_grad`` and in eval mode (as evaluation does).

    Args:
        encoder: the evaluated encoder (its CSC stages are hooked, not changed).
        initial_encoder: the same architecture at initialisation, or ``None`` (then only
            ``residual`` is measured). Its dictionaries are copied; it is not run.
    """

    def __init__(self, encoder: nn.Module, initial_encoder: nn.Module | None = None) -> None:
        self.stages = csc_stages(encoder)
        self.initial = (
            None if initial_encoder is None else _check_initial(self.stages, initial_encoder)
        )
        self._sums: dict[int, list[float]] = {i: [0.0, 0.0, 0.0] for i, _ in self.stages}
        self._init_layers: dict[int, CSCLayer] = {}
        self._handles: list = []

    def __bool__(self) -> bool:
        return bool(self.stages)

    def _init_layer(self, i: int, layer: CSCLayer) -> CSCLayer:
        """The learned stage's solver (λ, step multiplier, T, …) with the initial atoms, made
        once, before the hooks are in place.

        The parameters are the learned layer's but ``weight``, the initial one; the buffers (the
        Lipschitz estimate) are the initial layer's. ``load_state_dict`` marks the estimate stale,
        so the first forward brings it up to date for the initial atoms.
        """
        c = copy.deepcopy(layer).eval().requires_grad_(False)
        c._forward_hooks.clear()  # hooks others put on the learned layer are not the copy's
        c._forward_pre_hooks.clear()
        params = dict(c.named_parameters())
        initial = self.initial[i].state_dict()
        state = {k: v if k in params else initial.get(k, v) for k, v in c.state_dict().items()}
        state["weight"] = initial["weight"]
        c.load_state_dict(state)
        return c

    def _hook(self, i: int):
        def hook(layer: CSCLayer, args, z: Tensor) -> None:
            u = args[0].detach()
            with torch.no_grad():
                uu = float(u.double().pow(2).sum())
                sums = self._sums[i]
                sums[0] += uu
                sums[1] += _residual_sq(u, z.detach(), layer)
                init = self._init_layers.get(i)
                if init is not None:
                    sums[2] += _residual_sq(u, init(u), init)

        return hook

    def __enter__(self) -> DictionaryProbe:
        if self.initial is not None:
            for i, layer in self.stages:
                if i not in self._init_layers:
                    self._init_layers[i] = self._init_layer(i, layer)
        self._handles = [layer.register_forward_hook(self._hook(i)) for i, layer in self.stages]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def metrics(self) -> dict[str, float]:
        """``dictionary/enc{i}/moved``, ``…/residual``, ``…/residual_init`` per CSC stage
        (``moved`` and ``residual_init`` only with an initial encoder; the residuals only for
        stages that have run)."""
        out: dict[str, float] = {}
        for i, layer in self.stages:
            key = f"dictionary/enc{i}"
            if self.initial is not None:
                out[f"{key}/moved"] = dictionary_moved(layer.weight, self.initial[i].weight)
            uu, rr, rr0 = self._sums[i]
            if uu > 0:
                out[f"{key}/residual"] = math.sqrt(rr / uu)
                if self._init_layers:
                    out[f"{key}/residual_init"] = math.sqrt(rr0 / uu)
        return out


def _residual_sq(u: Tensor, z: Tensor, layer: CSCLayer) -> float:
    """``‖u − D z‖²`` summed over the batch (float64), ``D`` the layer's synthesis operator."""
    dz = layer.operator(u.shape[-2:]).apply(z)
    return float((u.double() - dz.double()).pow(2).sum())


def _images(batch) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, tuple | list) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise ValueError(
        f"dictionary_report: the loader yields {type(batch).__name__}; expected images "
        "(N, C, H, W) or (images, labels) pairs"
    )


def dictionary_report(
    encoder: nn.Module,
    initial_encoder: nn.Module | None,
    loader: Iterable,
    num_images: int | None = None,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """The dictionary metrics of every CSC stage of ``encoder`` on the images of ``loader``.

    Runs ``encoder`` in eval mode under ``torch.no_grad`` (its mode is restored after) on at most
    ``num_images`` images and returns ``dictionary/enc{i}/moved``, ``…/residual`` and
    ``…/residual_init`` (see the module docstring). An encoder without CSC stages gives ``{}``.
    :func:`~ctrl_csc.eval.evaluate_reconstructions` computes the same in its own pass (metric
    ``dictionary``).

    Args:
        encoder: images ``(N, C, H, W)`` → features, with CSC layers in ``encoder.stages``.
        initial_encoder: the same model at initialisation (e.g. from
            :func:`ctrl_csc.cli.evaluate.initial_models`), or ``None`` for ``residual`` only.
        loader: yields images ``(N, C, H, W)`` or ``(images, labels)`` — held-out data.
        num_images: at most this many images (``None``: all).
        device: where to run; ``None`` keeps the encoder's device. Given, the encoder is moved
            there.
    """
    if device is not None:
        encoder.to(device)
    probe = DictionaryProbe(encoder, initial_encoder)
    if not probe:
        return {}
    device = probe.stages[0][1].weight.device
    mode = encoder.training
    encoder.eval()
    seen = 0
    try:
        with probe, torch.no_grad():
            for batch in loader:
                x = _images(batch)
                if num_images is not None:
                    x = x[: num_images - seen]
                if x.shape[0] == 0:
                    break
                encoder(x.to(device, torch.float32))
                seen += x.shape[0]
                if num_images is not None and seen >= num_images:
                    break
    finally:
        encoder.train(mode)
    if seen == 0:
        raise ValueError("dictionary_report: the loader yielded no images")
    return probe.metrics()
