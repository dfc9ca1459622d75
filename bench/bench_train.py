"""Benchmark of one closed-loop training step (ctrl_csc.engine.CTRLStep) against a plain one.

Run:  /tmp/venv/bin/python bench/bench_train.py [--quick] [--repeats N] [--threads N] [--ablate]

One JSON line per case (model config × objective variant). A case builds the encoder ``f`` and
decoder ``g`` from ``conf/model/<model>.yaml`` (``dataset`` keys set here,
``hydra.utils.instantiate``) and times one full training step (``k = 1`` encoder update, then one
decoder update, Adam as in ``conf/optim/adam.yaml``) on a fixed batch of random images in
``[-1, 1]`` with random labels:

* ``ours``: the real code path,
  ``CTRLStep(CTRLObjective(...))(Game(f, g, optimizers, DistContext()), x, y)`` — decoder step
  with ``Z`` under ``no_grad`` and ``f`` frozen, batched Cholesky rates, CSC layers that compute
  ``Dᵀx`` once and warm-start one power-iteration step per forward.
* ``reference``: the same game written plainly, on deep copies of the same models (same weights):
  (a) the decoder step computes ``Z = f(X)`` *with* gradients and ``X̂ = g(Z)`` from it, ``f``
  not frozen (``f``'s weight gradients are computed and thrown away; the updates of ``g`` are the
  same); (b) the objective loops over classes with ``torch.logdet`` of ``d×d`` matrices (R, R_c,
  ΔR(Z, Ẑ), the sample-wise term; the formulas of DESIGN §2) — checked against ``CTRLObjective``
  to 1e-4 relative on the first step; (c) every encoder CSC stage and every ``inverse_csc`` decoder
  stage is replaced by a textbook FISTA that renormalises the atoms, runs a fresh 20-step power
  iteration and forms the residual ``u − A y`` and ``Aᵀ(·)`` in every iteration (``2T``
  convolutions, like ``bench/bench_csc.py``'s reference). ``synthesis`` decoder stages (one
  transposed convolution of normalised atoms, nothing to cache) are left as they are.

Timing defaults to one thread and the process's CPU time (``--clock cpu``), which on a shared
machine is much steadier than wall time; ``--clock wall --threads 2`` gives wall time.
Timings of a case are interleaved (ours, reference, …; the order alternates per repeat) in the same
process after warm-up; ``*_ms`` are medians of ``--repeats`` steps, ``*_ms_iqr`` the quartiles,
``speedup`` = median(reference) / median(ours) and ``speedup_pairs`` the median / min / max of
the per-repeat ratios (the CPU may be shared: look at the spread). Target: ``speedup >= 1.3``.

``--rollback`` measures instead what keeping a step undoable costs (``trainer.rollback_nonfinite``,
on by default), per case: the same step with no copies (``none``), with ours (the models' buffers,
scaler and RNG at the step's start, and the encoder's parameters and Adam state before its
update: ``Trainer._snapshot`` + ``Game.keep_for_rollback``) and with the former snapshot (both
models' state dicts and both optimisers' states cloned before every step, written out here):
``*_ms`` medians per step and ``*_bytes`` the bytes each keeps, which is what it adds to the peak
memory of a step.

``--ablate`` adds, per case, references that differ from ours in one aspect only
(``ref_zgrad``, ``ref_loop_objective``, ``ref_layers``) and ``plain``: our models and objective in
the plain loop (no ``Game``/``CTRLStep``), to attribute the difference.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import Tensor, nn

from ctrl_csc.cli.common import compose_model
from ctrl_csc.engine import CTRLStep, Game
from ctrl_csc.engine.checkpoint import rng_state
from ctrl_csc.engine.distributed import DistContext
from ctrl_csc.engine.game import clone_tree
from ctrl_csc.losses import CTRLObjective
from ctrl_csc.nn import CSCLayer, SparseDeconvLayer
from ctrl_csc.nn.stage import transposed_output_padding

REFERENCE_POWER_ITERS = 20
NUM_CLASSES = 10
EPS_SQ = 0.5
LR, BETAS = 1.5e-4, (0.5, 0.999)
OBJECTIVE_RTOL = 1e-4

# (model config, channels, image size, batch): the quickstart model at its batch, the CIFAR-10
# model with a smaller batch than its experiment's 512 (CPU).
CASES = [
    ("csc_ctrl_tiny", 1, 32, 128),
    ("csc_ctrl_mini", 3, 32, 128),
    ("csc_ctrl_32", 3, 32, 32),
]
VARIANTS = ("samplewise", "multiclass")


# --------------------------------------------------------------------------- reference layers


def reference_lasso(
    u: Tensor,
    atoms: Tensor,
    transposed: bool,
    stride: int,
    padding: int,
    output_padding: tuple[int, int],
    unknown_shape: tuple[int, ...],
    lmbda: float,
    n_iter: int,
    algorithm: str,
    nonnegative: bool,
    generator: torch.Generator,
) -> Tensor:
    """Textbook ISTA/FISTA for ½‖u − A x‖² + λ‖x‖₁ (x ≥ 0 if ``nonnegative``) from x₀ = 0.

    ``A`` is ``conv_transpose2d`` with ``atoms`` (``transposed``, a CSC dictionary) or ``conv2d``
    (an inverse-CSC operator), ``Aᵀ`` the other. A fresh power iteration from a random vector
    gives ``L`` on every call; every iteration forms ``u − A y`` and ``Aᵀ(u − A y)`` (2T convs).
    """

    def conv(t: Tensor, w: Tensor) -> Tensor:
        return F.conv2d(t, w, None, stride, padding)

    def conv_t(t: Tensor, w: Tensor) -> Tensor:
        return F.conv_transpose2d(t, w, None, stride, padding, output_padding)

    apply, adjoint = (conv_t, conv) if transposed else (conv, conv_t)
    with torch.no_grad():
        a = atoms.detach()
        v = torch.randn((1, *unknown_shape[1:]), generator=generator, dtype=u.dtype)
        lip = torch.ones((), dtype=u.dtype)
        for _ in range(REFERENCE_POWER_ITERS):
            v = adjoint(apply(v, a), a)
            lip = v.norm()
            v = v / lip
    eta = 1.0 / lip
    z = torch.zeros(unknown_shape, dtype=u.dtype)
    z_prev, tau = z, 1.0
    for t in range(n_iter):
        if algorithm == "fista" and t > 0:
            tau_next = (1 + math.sqrt(1 + 4 * tau * tau)) / 2
            y = z + ((tau - 1) / tau_next) * (z - z_prev)
            tau = tau_next
        else:
            y = z
        grad = -adjoint(u - apply(y, atoms), atoms)
        z_prev = z
        v = y - eta * grad
        if nonnegative:
            z = torch.relu(v - eta * lmbda)
        else:
            z = torch.sign(v) * torch.relu(v.abs() - eta * lmbda)
    return z


def _solver_options(layer: CSCLayer | SparseDeconvLayer) -> dict:
    s = layer.solver
    if s.mu or s.raw_lmbda is not None or s.log_step_scale is not None:
        raise ValueError("the reference layers support mu=0, fixed lmbda and fixed step only")
    return {
        "lmbda": s._fixed_lmbda,
        "n_iter": s.n_iter,
        "algorithm": s.algorithm,
        "nonnegative": s.nonnegative,
    }


class ReferenceCSC(nn.Module):
    """Drop-in for an encoder :class:`CSCLayer` (same weight), see :func:`reference_lasso`."""

    def __init__(self, layer: CSCLayer) -> None:
        super().__init__()
        self.weight = nn.Parameter(layer.weight.detach().clone())
        self.stride, self.padding, self.k = layer.stride, layer.padding, layer.kernel_size
        self.normalize_atoms = layer.normalize_atoms
        self.options = _solver_options(layer)
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        atoms = w / w.flatten(1).norm(dim=1).view(-1, 1, 1, 1) if self.normalize_atoms else w
        fine = (x.shape[-2], x.shape[-1])
        coarse = tuple((n + 2 * self.padding - self.k) // self.stride + 1 for n in fine)
        pad = transposed_output_padding(coarse, fine, self.k, self.stride, self.padding, "ref")
        shape = (x.shape[0], w.shape[0], *coarse)
        return reference_lasso(
            x, atoms, True, self.stride, self.padding, pad, shape, generator=self.generator,
            **self.options,
        )  # fmt: skip


class ReferenceInverseCSC(nn.Module):
    """Drop-in for an ``inverse_csc`` :class:`SparseDeconvLayer` (same weight)."""

    def __init__(self, layer: SparseDeconvLayer) -> None:
        super().__init__()
        assert layer.kind == "inverse_csc"
        self.weight = nn.Parameter(layer.weight.detach().clone())
        self.stride, self.padding, self.k = layer.stride, layer.padding, layer.kernel_size
        self.normalize_atoms = layer.normalize_atoms
        self.options = _solver_options(layer)
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, z: Tensor, output_size: tuple[int, int]) -> Tensor:
        w = self.weight  # (C_in coarse, C_out fine, k, k); B = conv2d maps fine -> coarse
        norms = w.transpose(0, 1).flatten(1).norm(dim=1).view(1, -1, 1, 1)
        atoms = w / norms if self.normalize_atoms else w
        coarse, fine = (z.shape[-2], z.shape[-1]), (int(output_size[0]), int(output_size[1]))
        pad = transposed_output_padding(coarse, fine, self.k, self.stride, self.padding, "ref")
        shape = (z.shape[0], w.shape[1], *fine)
        return reference_lasso(
            z, atoms, False, self.stride, self.padding, pad, shape, generator=self.generator,
            **self.options,
        )  # fmt: skip


def reference_models(encoder: nn.Module, decoder: nn.Module) -> tuple[nn.Module, nn.Module]:
    """Deep copies with every CSC / inverse-CSC stage swapped for its reference (same weights)."""
    f, g = copy.deepcopy(encoder), copy.deepcopy(decoder)
    for i, layer in enumerate(f.stages):
        f.stages[i] = ReferenceCSC(layer)
    for i, layer in enumerate(g.stages):
        if layer.kind == "inverse_csc":
            g.stages[i] = ReferenceInverseCSC(layer)
    return f, g


# --------------------------------------------------------------------------- reference objective


def coding_rate(Z: Tensor, eps_sq: float = EPS_SQ) -> Tensor:
    """R(Z) = ½ logdet(I_d + d/(n ε²) ZᵀZ), with ``torch.logdet`` of the d×d matrix."""
    n, d = Z.shape
    eye = torch.eye(d, dtype=Z.dtype, device=Z.device)
    return 0.5 * torch.logdet(eye + (d / (n * eps_sq)) * Z.T @ Z)


def pair_rate_reduction(Z: Tensor, Zh: Tensor, eps_sq: float = EPS_SQ) -> Tensor:
    """ΔR(Z, Ẑ) = R(Z ∪ Ẑ) − ½R(Z) − ½R(Ẑ)."""
    r_u = coding_rate(torch.cat([Z, Zh]), eps_sq)
    return r_u - 0.5 * coding_rate(Z, eps_sq) - 0.5 * coding_rate(Zh, eps_sq)


def samplewise_distance(Z: Tensor, Zh: Tensor, distance: str, eps_sq: float = EPS_SQ) -> Tensor:
    """Mean over samples of d(z_i, ẑ_i): ‖z − ẑ‖², or the rate reduction of the pair (2×2
    log-determinants of ``I + d/(2ε²) G_i`` with ``G_i`` the Gram matrix of the pair)."""
    if distance == "l2":
        return (Z - Zh).pow(2).sum(1).mean()
    d = Z.shape[1]
    P = torch.stack([Z, Zh], dim=1)  # (n, 2, d)
    eye = torch.eye(2, dtype=Z.dtype)
    r_pair = 0.5 * torch.logdet(eye + (d / (2 * eps_sq)) * P @ P.transpose(1, 2))
    r_z = 0.5 * torch.log(1 + (d / eps_sq) * Z.pow(2).sum(1))
    r_zh = 0.5 * torch.log(1 + (d / eps_sq) * Zh.pow(2).sum(1))
    return (r_pair - 0.5 * r_z - 0.5 * r_zh).mean()


def reference_objective(
    Z: Tensor, Zh: Tensor, labels: Tensor, variant: str, distance: str
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """``(total, decoder_total, terms)`` as :class:`CTRLObjective` (γ = 1, β = 1), class loop."""
    r_z, r_zh = coding_rate(Z), coding_rate(Zh)
    r_u = coding_rate(torch.cat([Z, Zh]))
    dr = r_u - 0.5 * r_z - 0.5 * r_zh
    terms = {"R_Z": r_z, "R_Zh": r_zh, "R_Z_union_Zh": r_u, "delta_R_Z_Zh": dr}
    if variant == "samplewise":
        dist = samplewise_distance(Z, Zh, distance)
        terms["samplewise_distance"] = dist
        return r_z + dr - dist, dr + dist, terms
    assert variant == "multiclass"
    n = Z.shape[0]
    rc_z = rc_zh = classwise = Z.new_zeros(())
    for j in range(NUM_CLASSES):
        mask = labels == j
        n_j = int(mask.sum())
        if n_j == 0:
            continue
        Zj, Zhj = Z[mask], Zh[mask]
        rj, rhj = coding_rate(Zj), coding_rate(Zhj)
        rc_z = rc_z + (n_j / n) * rj
        rc_zh = rc_zh + (n_j / n) * rhj
        classwise = classwise + coding_rate(torch.cat([Zj, Zhj])) - 0.5 * rj - 0.5 * rhj
    terms.update(
        Rc_Z=rc_z, Rc_Zh=rc_zh, delta_R_Z=r_z - rc_z, delta_R_Zh=r_zh - rc_zh,
        delta_R_classwise=classwise,
    )  # fmt: skip
    del terms["R_Z_union_Zh"], terms["delta_R_Z_Zh"]
    total = terms["delta_R_Z"] + terms["delta_R_Zh"] + classwise
    return total, total, terms


# --------------------------------------------------------------------------- steps

Objective = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, dict[str, Tensor]]]


def plain_step(
    f: nn.Module,
    g: nn.Module,
    opt_f: torch.optim.Optimizer,
    opt_g: torch.optim.Optimizer,
    objective: Objective,
    x: Tensor,
    y: Tensor,
    z_grad: bool,
    check: Callable[[Tensor, Tensor, Tensor, tuple], None] | None = None,
) -> dict[str, float]:
    """The closed-loop step written plainly: one encoder ascent, one decoder descent."""
    z = f(x)
    with torch.no_grad():
        x_hat = g(z.detach())
    z_hat = f(x_hat)
    out = objective(z, z_hat, y)
    if check is not None:
        check(z, z_hat, y, out)
    opt_f.zero_grad(set_to_none=True)
    (-out[0]).backward()
    opt_f.step()

    if z_grad:  # (a): Z with gradients, f not frozen: f's weight gradients are thrown away
        z = f(x)
    else:
        with torch.no_grad():
            z = f(x)
    if not z_grad:
        for p in f.parameters():
            p.requires_grad_(False)
    x_hat = g(z)
    z_hat = f(x_hat)
    out = objective(z, z_hat, y)
    if check is not None:
        check(z, z_hat, y, out)
    opt_g.zero_grad(set_to_none=True)
    out[1].backward()
    opt_g.step()
    if z_grad:
        opt_f.zero_grad(set_to_none=True)
    else:
        for p in f.parameters():
            p.requires_grad_(True)
    return {k: float(v.detach()) for k, v in out[2].items()}


def ours_objective_fn(obj: CTRLObjective) -> Objective:
    def fn(Z: Tensor, Zh: Tensor, y: Tensor):
        t = obj(Z, Zh, y if obj.needs_labels else None)
        return t.total, t.decoder_total, t.terms

    return fn


def loop_objective_fn(variant: str, distance: str) -> Objective:
    def fn(Z: Tensor, Zh: Tensor, y: Tensor):
        return reference_objective(Z, Zh, y, variant, distance)

    return fn


def build(model: str, channels: int, size: int, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    cfg = compose_model(model, channels, size, f"dataset.num_classes={NUM_CLASSES}")
    torch.manual_seed(seed)
    return instantiate(cfg.encoder), instantiate(cfg.decoder)


def adam(module: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(module.parameters(), lr=LR, betas=BETAS)


def rel_diff(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def run_case(
    model: str, channels: int, size: int, batch: int, variant: str, distance: str,
    repeats: int, warmup: int, ablate: bool, clock,
) -> dict:  # fmt: skip
    f, g = build(model, channels, size)
    f_ref, g_ref = reference_models(f, g)
    torch.manual_seed(1)
    x = torch.rand(batch, channels, size, size) * 2 - 1
    y = torch.randint(0, NUM_CLASSES, (batch,))

    # sanity: the reference models compute what ours compute (only L's estimate differs); in
    # train mode (batch statistics), as in the step
    with torch.no_grad():
        z, z_ref = f(x), f_ref(x)
        feat_diff = rel_diff(z_ref, z)
        img_diff = rel_diff(g_ref(z), g(z))

    objective = CTRLObjective(variant, eps_sq=EPS_SQ, num_classes=NUM_CLASSES, distance=distance)
    ours_fn, loop_fn = ours_objective_fn(objective), loop_objective_fn(variant, distance)
    ctrl_step = CTRLStep(objective)
    game = Game(f, g, {"encoder": adam(f), "decoder": adam(g)}, DistContext())
    opt_ref = (adam(f_ref), adam(g_ref))
    checked: list[float] = []

    def check(zz: Tensor, zh: Tensor, yy: Tensor, out: tuple) -> None:
        with torch.no_grad():
            mine = ours_fn(zz.detach(), zh.detach(), yy)
        pairs = [(out[0], mine[0]), (out[1], mine[1])]
        pairs += [(v, mine[2][k]) for k, v in out[2].items()]
        for ref_v, our_v in pairs:
            a, b = float(ref_v.detach()), float(our_v)
            err = abs(a - b) / max(abs(a), abs(b), 1e-3)
            assert err <= OBJECTIVE_RTOL, f"objectives differ: reference {a}, ours {b}"
            checked.append(err)

    steps: dict[str, Callable[[], object]] = {
        "ours": lambda: ctrl_step(game, x, y),
        "reference": lambda: plain_step(f_ref, g_ref, *opt_ref, loop_fn, x, y, True),
    }
    if ablate:
        for name, layers, loop, zg in (
            ("plain", False, False, False),
            ("ref_zgrad", False, False, True),
            ("ref_loop_objective", False, True, False),
            ("ref_layers", True, False, False),
        ):
            fa, ga = reference_models(f, g) if layers else (copy.deepcopy(f), copy.deepcopy(g))
            opts = (adam(fa), adam(ga))
            obj = loop_fn if loop else ours_fn
            steps[name] = lambda fa=fa, ga=ga, opts=opts, obj=obj, zg=zg: plain_step(
                fa, ga, *opts, obj, x, y, zg
            )

    plain_step(f_ref, g_ref, *opt_ref, loop_fn, x, y, True, check=check)  # checked warm-up
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    names = list(steps)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            start = clock()
            steps[name]()
            times[name].append((clock() - start) * 1e3)

    med = {k: statistics.median(v) for k, v in times.items()}

    def quartiles(v: list[float]) -> list[float]:
        if len(v) < 2:
            return [round(v[0], 1)] * 2
        q = statistics.quantiles(v, n=4, method="inclusive")
        return [round(q[0], 1), round(q[2], 1)]

    pair = [r / o for r, o in zip(times["reference"], times["ours"])]
    line = {
        "bench": "train_step",
        "model": model,
        "channels": channels,
        "image_size": size,
        "batch": batch,
        "variant": variant,
        "classes": NUM_CLASSES,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "ours_ms": round(med["ours"], 1),
        "ref_ms": round(med["reference"], 1),
        "ours_ms_iqr": quartiles(times["ours"]),
        "ref_ms_iqr": quartiles(times["reference"]),
        "speedup": round(med["reference"] / med["ours"], 3),
        "speedup_pairs": [
            round(statistics.median(pair), 3),
            round(min(pair), 3),
            round(max(pair), 3),
        ],  # fmt: skip
        "target": 1.3,
        "meets_target": med["reference"] / med["ours"] >= 1.3,
        "objective_max_rel_diff": float(f"{max(checked):.2g}"),
        "features_rel_diff": float(f"{feat_diff:.2g}"),
        "images_rel_diff": float(f"{img_diff:.2g}"),
    }
    if variant == "samplewise":
        line["distance"] = distance
    if ablate:
        line["ablation_ms"] = {k: round(med[k], 1) for k in names[2:]}
        line["ablation_speedup"] = {k: round(med[k] / med["ours"], 3) for k in names[2:]}
    return line


def tree_bytes(tree: object) -> int:
    if isinstance(tree, Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(tree_bytes(v) for v in tree.values())
    if isinstance(tree, list | tuple):
        return sum(tree_bytes(v) for v in tree)
    return 0


def rollback_case(
    model: str, channels: int, size: int, batch: int, repeats: int, warmup: int, clock
) -> dict:
    """One CTRL step (samplewise) with no rollback copies, ours, and the former full snapshot."""
    f, g = build(model, channels, size)
    torch.manual_seed(1)
    x = torch.rand(batch, channels, size, size) * 2 - 1
    y = torch.randint(0, NUM_CLASSES, (batch,))
    game = Game(f, g, {"encoder": adam(f), "decoder": adam(g)}, DistContext())
    step = CTRLStep(CTRLObjective("samplewise", eps_sq=EPS_SQ))
    kept: dict[str, int] = {}

    def full() -> object:  # the reference: everything that load_state_dict would restore
        return clone_tree({
            "models": {n: m.state_dict() for n, m in game.modules.items()},
            "optimizers": {n: o.state_dict() for n, o in game.optimizers.items()},
            "scaler": game.scaler.state_dict(),
        }) | {"rng": rng_state()}  # fmt: skip

    def ours() -> object:  # Trainer._snapshot's part; the game keeps the rest as it updates
        return {
            "buffers": {
                n: {k: b.detach().clone() for k, b in m.named_buffers()}
                for n, m in game.modules.items()
            },
            "scaler": clone_tree(game.scaler.state_dict()),
            "rng": rng_state(),
        }

    def run(policy: str) -> None:
        game.keep_for_rollback = policy == "ours"
        game.begin_step()
        before = {"none": lambda: None, "ours": ours, "full": full}[policy]()
        step(game, x, y)
        kept[policy] = tree_bytes(before) + tree_bytes(game._kept)

    names = ["none", "ours", "full"]
    for _ in range(warmup):
        for name in names:
            run(name)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            start = clock()
            run(name)
            times[name].append((clock() - start) * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    params = sum(p.numel() * p.element_size() for m in (f, g) for p in m.parameters())
    return {
        "bench": "rollback",
        "model": model,
        "batch": batch,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        **{f"{k}_ms": round(v, 1) for k, v in med.items()},
        "parameter_bytes": params,
        **{f"{k}_bytes": kept[k] for k in names[1:]},
        "ours_over_full_bytes": round(kept["ours"] / kept["full"], 3),
        "ours_cost_ms": round(med["ours"] - med["none"], 1),
        "full_cost_ms": round(med["full"] - med["none"], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9, help="timed steps per implementation")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per implementation")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--quick", action="store_true", help="5 repeats, 1 warm-up step")
    parser.add_argument("--ablate", action="store_true", help="also one-aspect references")
    parser.add_argument("--rollback", action="store_true", help="the cost of rollback copies")
    parser.add_argument("--distance", choices=("l2", "rate"), default="l2",
                        help="sample-wise distance of the samplewise variant")  # fmt: skip
    parser.add_argument("--models", nargs="*", default=[c[0] for c in CASES],
                        help="model configs to run (default: all cases)")  # fmt: skip
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="cpu",
        help="cpu (default): time.process_time, the process's CPU time (= wall time on an idle "
        "machine with --threads 1, far less sensitive to other processes on a shared one); "
        "wall: time.perf_counter (use it with --threads > 1, where idle threads spin)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats, warmup = (5, 1) if args.quick else (args.repeats, args.warmup)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    for model, channels, size, batch in CASES:
        if model not in args.models:
            continue
        if args.rollback:
            line = rollback_case(model, channels, size, batch, repeats, warmup, clock)
            print(json.dumps({**line, "clock": args.clock}), flush=True)
            continue
        for variant in args.variants:
            line = run_case(
                model, channels, size, batch, variant, args.distance, repeats, warmup,
                args.ablate, clock,
            )  # fmt: skip
            print(json.dumps({**line, "clock": args.clock}), flush=True)


if __name__ == "__main__":
    main()
