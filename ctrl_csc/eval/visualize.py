"""Pictures of a model: image grids, dictionary atoms, code densities, curves, feature subspaces.

Every function writes one PNG (parent folders created) and returns its path. Figures are drawn on
``matplotlib.figure.Figure`` objects with the Agg canvas — no pyplot state, no GUI backend — so they
work headless and do not touch the backend of an interactive session. Images are NCHW in
``[-1, 1]``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor, nn

from ctrl_csc.nn.stage import conv_output_size

__all__ = [
    "dictionary_atoms",
    "plot_curves",
    "plot_densities",
    "plot_dictionary",
    "plot_feature_subspaces",
    "labelled_rows",
    "reconstruction_grid",
    "save_image_grid",
]

log = logging.getLogger(__name__)

PathLike = str | os.PathLike


def _prepare(path: PathLike) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def _save(fig: Figure, path: PathLike, dpi: int = 100) -> Path:
    p = _prepare(path)
    FigureCanvasAgg(fig)
    fig.savefig(p, dpi=dpi, format="png")
    return p


def _to_hwc(grid: Tensor) -> np.ndarray:
    """``(C, H, W)`` in ``[0, 1]`` → ``(H, W)`` or ``(H, W, 3)`` float array for ``imshow``."""
    arr = grid.detach().float().clamp(0, 1).cpu().numpy()
    return arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)


def _grid(images: Tensor, nrow: int, padding: int, pad_value: float) -> Tensor:
    """Tile ``(N, C, H, W)`` images (any value range) into ``(C, H', W')``, ``nrow`` per row."""
    n, c, h, w = images.shape
    ncol = min(nrow, n)
    nrows = math.ceil(n / ncol)
    out = images.new_full(
        (c, nrows * (h + padding) + padding, ncol * (w + padding) + padding), pad_value
    )
    for i in range(n):
        r, q = divmod(i, ncol)
        y, x = padding + r * (h + padding), padding + q * (w + padding)
        out[:, y : y + h, x : x + w] = images[i]
    return out


def save_image_grid(
    images: Tensor,
    path: PathLike,
    nrow: int = 8,
    padding: int = 2,
    value_range: tuple[float, float] = (-1.0, 1.0),
    scale: int = 1,
) -> Path:
    """Save ``(N, C, H, W)`` images (``C`` = 1 or 3, values in ``value_range``) as one PNG grid with
    ``nrow`` images per row, white ``padding`` px apart, each pixel drawn as ``scale × scale``."""
    from PIL import Image

    if images.dim() != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
        raise ValueError(f"save_image_grid: expected (N>0, 1|3, H, W), got {tuple(images.shape)}")
    lo, hi = value_range
    x = ((images.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)
    if scale < 1:
        raise ValueError(f"save_image_grid: scale must be >= 1, got {scale}")
    grid = _grid(x, nrow, padding, pad_value=1.0)
    if scale > 1:
        grid = grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    arr = (grid.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()).copy()
    p = _prepare(path)
    Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).save(p, format="PNG")
    return p


def labelled_rows(
    rows: Tensor, labels: Sequence[str], path: PathLike, title: str | None = None
) -> Path:
    """Save ``(R, K, C, H, W)`` images as ``R`` rows of ``K``, each row named by ``labels[r]``
    on its left (e.g. a class, a class and direction, or a pair)."""
    if rows.dim() != 5 or rows.shape[2] not in (1, 3) or len(labels) != rows.shape[0]:
        raise ValueError(
            f"labelled_rows: expected (R, K, 1|3, H, W) and R labels, got "
            f"{tuple(rows.shape)} and {len(labels)} labels"
        )
    r, k, c, h, w = rows.shape
    grid = _grid(((rows.flatten(0, 1).float().cpu() + 1) / 2).clamp(0, 1), k, 2, 1.0)
    scale = max(1.0, 64 / h)  # at least 64 px per image on the page
    fig = Figure(figsize=(1.2 + k * w * scale / 100, 0.3 + r * h * scale / 100))
    ax = fig.add_axes((1.2 / fig.get_figwidth(), 0, 1 - 1.2 / fig.get_figwidth(), 1))
    ax.imshow(_to_hwc(grid), cmap="gray" if c == 1 else None, vmin=0, vmax=1,
              interpolation="nearest")  # fmt: skip
    ax.set_yticks([2 + (h + 2) * i + h / 2 for i in range(r)], list(labels), fontsize=8)
    ax.set_xticks([])
    if title:
        ax.set_title(title, fontsize=9)
        fig.set_figheight(fig.get_figheight() + 0.3)
    return _save(fig, path)


def reconstruction_grid(
    x: Tensor, xh: Tensor, path: PathLike, n: int = 32, nrow: int = 8, scale: int = 1
) -> Path:
    """Inputs and their reconstructions in alternating rows: a row of ``nrow`` inputs ``x``, then
    the same ``nrow`` reconstructions ``xh``, and so on, for the first ``n`` images.

    Args:
        x, xh: ``(N, C, H, W)`` in ``[-1, 1]``, same shape.
        scale: pixel magnification (see :func:`save_image_grid`).
    """
    if x.shape != xh.shape:
        raise ValueError(
            f"reconstruction_grid: shapes differ, {tuple(x.shape)} vs {tuple(xh.shape)}"
        )
    n = min(n, x.shape[0])
    x, xh = x[:n].detach().cpu(), xh[:n].detach().cpu().clamp(-1, 1)
    nrow = min(nrow, n)
    rows = []
    for start in range(0, n, nrow):
        a, b = x[start : start + nrow], xh[start : start + nrow]
        if a.shape[0] < nrow:  # pad the last pair of rows with blank (white) tiles
            pad = a.new_ones((nrow - a.shape[0], *a.shape[1:]))
            a, b = torch.cat([a, pad]), torch.cat([b, pad])
        rows += [a, b]
    return save_image_grid(torch.cat(rows), path, nrow=nrow, scale=scale)


# --------------------------------------------------------------------------------------------------
# Dictionaries
# --------------------------------------------------------------------------------------------------
def _atoms_of(stage: nn.Module) -> Tensor:
    fn = getattr(stage, "dictionary", None)
    return fn() if callable(fn) else stage.weight


@torch.no_grad()
def dictionary_atoms(stages: Sequence[nn.Module], level: int, max_atoms: int = 64) -> Tensor:
    """Atoms of CSC stage ``level`` in pixel space, ``(n_atoms, C_img, h, w)``.

    Stage 0's atoms are its dictionary ``A[j]`` (``stage.dictionary()`` — the atoms as the layer
    uses them, e.g. normalised — when it has one, else ``stage.weight``); for a deeper stage ``l``
    a one-hot code (a delta at the centre of channel ``j``) is synthesised by stage ``l`` and then
    by stages ``l−1, …, 0`` (``stage.synthesize(z, output_size)``), giving ``D_0 D_1 … D_l e_j``.
    The result is cropped to the union of the atoms' supports.

    Args:
        stages: CSC stages with ``.weight (C_out, C_in, k, k)``, ``.stride``, optional ``.padding``
            (default ``k // 2``) and ``.synthesize``.
        level: index of the stage.
        max_atoms: the first ``max_atoms`` atoms are returned.
    """
    if not 0 <= level < len(stages):
        raise ValueError(f"dictionary_atoms: level {level} out of range for {len(stages)} stages")
    top = stages[level]
    n_atoms = min(max_atoms, top.weight.shape[0])
    if level == 0:
        return _atoms_of(top)[:n_atoms].detach().float().cpu()
    geom = []
    for st in stages[: level + 1]:
        k = st.weight.shape[-1]
        s = int(st.stride[0] if isinstance(st.stride, tuple | list) else st.stride)
        p = getattr(st, "padding", None)
        p = k // 2 if p is None else int(p[0] if isinstance(p, tuple | list) else p)
        geom.append((k, s, p))
    rf, jump = 1, 1  # receptive field of one code entry of stage `level`, in pixels
    for k, s, _ in geom:
        rf += (k - 1) * jump
        jump *= s
    # pixel size with margin so that the centre delta's footprint lies inside; sizes per level
    sizes = [2 * rf + 2 * jump + 1]
    for k, s, p in geom:
        sizes.append(conv_output_size(sizes[-1], k, s, p))
    h = sizes[level + 1]
    w = top.weight
    z = w.new_zeros((n_atoms, w.shape[0], h, h))
    idx = torch.arange(n_atoms, device=w.device)
    z[idx, idx, h // 2, h // 2] = 1.0
    for lvl in range(level, -1, -1):
        z = stages[lvl].synthesize(z, (sizes[lvl], sizes[lvl]))
    atoms = z.detach().float().cpu()
    support = atoms.abs().amax(dim=(0, 1)) > 1e-6 * atoms.abs().max().clamp_min(1e-30)
    rows = torch.nonzero(support.any(dim=1)).flatten()
    cols = torch.nonzero(support.any(dim=0)).flatten()
    if rows.numel() == 0:
        return atoms
    return atoms[:, :, int(rows[0]) : int(rows[-1]) + 1, int(cols[0]) : int(cols[-1]) + 1]


def _atoms_for_display(atoms: Tensor) -> Tensor:
    """Scale each atom to ``[0, 1]`` with 0 at mid-grey (``0.5 + 0.5 a / max|a|``); channels other
    than 1 or 3 are averaged to one."""
    if atoms.shape[1] not in (1, 3):
        atoms = atoms.mean(dim=1, keepdim=True)
    scale = atoms.abs().flatten(1).amax(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return 0.5 + 0.5 * atoms / scale


def _stages_of(encoder: nn.Module, what: str) -> Sequence[nn.Module]:
    stages = getattr(encoder, "stages", None)
    if stages is None or len(stages) == 0:
        raise ValueError(
            f"plot_dictionary: {what} {type(encoder).__name__} has no CSC `.stages` to draw "
            "(only CSC encoders have dictionaries)"
        )
    return stages


def plot_dictionary(
    encoder: nn.Module,
    path: PathLike,
    max_atoms: int = 64,
    initial_encoder: nn.Module | None = None,
    classical: Mapping[int, Tensor] | None = None,
) -> Path:
    """Each CSC stage's dictionary atoms in pixel space, one panel per stage (see
    :func:`dictionary_atoms`; deeper stages synthesised back through the earlier ones).

    Each atom is scaled on its own (0 at mid-grey, its largest ``|value|`` at black or white).

    Args:
        encoder: has ``.stages``, a sequence of CSC stages (``ctrl_csc.nn.CSCLayer``).
        initial_encoder: the same model at initialisation; given, a row of panels shows its
            atoms (the same atom in the same place), to see what training changed.
        classical: ``{stage index: atoms}`` of classical dictionaries of the stages
            (:func:`ctrl_csc.eval.classical.classical_comparison`); given, a row shows them, a
            deeper stage's drawn through the *learned* earlier stages (whose outputs it was
            learned on).
    """
    learned = list(_stages_of(encoder, "encoder"))
    n = len(learned)
    rows = [("", lambda level: learned)]
    if initial_encoder is not None:
        initial = list(_stages_of(initial_encoder, "initial_encoder"))
        if len(initial) != n:
            raise ValueError(
                f"plot_dictionary: the initial encoder has {len(initial)} stages, the encoder {n}"
            )
        rows.append((", initial", lambda level: initial))
    if classical:
        swapped = {}
        for i, atoms in classical.items():
            stage = copy.deepcopy(learned[i])
            with torch.no_grad():
                stage.weight.copy_(atoms.to(stage.weight))
            swapped[i] = stage
        rows.append((", classical", lambda level: [*learned[:level], swapped.get(level)]))
    fig = Figure(figsize=(4.0 * n, 4.4 * len(rows)))
    for r, (tag, stages_at) in enumerate(rows):
        for level in range(n):
            ax = fig.add_subplot(len(rows), n, r * n + level + 1)
            ax.axis("off")
            stages = stages_at(level)
            if stages[level] is None:
                continue
            atoms = _atoms_for_display(dictionary_atoms(stages, level, max_atoms))
            nrow = max(1, math.ceil(math.sqrt(atoms.shape[0])))
            grid = _grid(atoms, nrow, padding=1, pad_value=1.0)
            img = _to_hwc(grid)
            ax.imshow(
                img,
                cmap="gray" if img.ndim == 2 else None,
                vmin=0,
                vmax=1,
                interpolation="nearest",
            )
            shape = atoms.shape
            ax.set_title(
                f"stage {level}{tag}: {shape[0]} atoms, {shape[-2]}x{shape[-1]} px", fontsize=9
            )
    fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------------------------------------
# Densities, curves, features
# --------------------------------------------------------------------------------------------------
def plot_densities(
    densities: Mapping[str, float | None] | Sequence[float | None], path: PathLike
) -> Path:
    """Bar chart of per-stage code density (fraction of non-zero entries).

    Args:
        densities: ``{"density/enc0": 0.12, ...}`` or a per-stage list; ``None`` entries (stages
            without a sparse code) are left out.
    """
    if not isinstance(densities, Mapping):
        densities = {f"stage {i}": v for i, v in enumerate(densities)}
    items = [
        (str(k).removeprefix("density/"), float(v)) for k, v in densities.items() if v is not None
    ]
    fig = Figure(figsize=(max(4.0, 0.6 * len(items) + 2), 3.5))
    ax = fig.add_subplot(1, 1, 1)
    if items:
        names, vals = zip(*items)
        bars = ax.bar(range(len(vals)), vals, color="tab:blue")
        ax.set_xticks(range(len(vals)), names, rotation=45, ha="right", fontsize=8)
        for b, v in zip(bars, vals):
            ax.annotate(
                f"{v:.3f}",
                (b.get_x() + b.get_width() / 2, b.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
            )
        ax.set_ylim(0, max(1.0, max(vals) * 1.1))
    else:
        ax.text(0.5, 0.5, "no densities", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("fraction of non-zeros")
    ax.set_title("code density per stage")
    fig.tight_layout()
    return _save(fig, path)


def _read_records(source: PathLike | Iterable[Mapping]) -> list[Mapping]:
    if isinstance(source, str | os.PathLike):
        records = []
        with open(source, encoding="utf-8") as fh:
            for i, line in enumerate(fh, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    log.warning("plot_curves: %s line %d is not JSON; skipped", source, i)
                    continue
                if isinstance(rec, dict):
                    records.append(rec)
        return records
    return list(source)


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def plot_curves(
    source: PathLike | Iterable[Mapping], path: PathLike, keys: Sequence[str] | None = None
) -> Path:
    """Curves of logged quantities over training steps, one panel per key.

    Args:
        source: a run's ``metrics.jsonl`` (one JSON object per line with ``step`` and numeric
            keys; unparsable lines are skipped) or a list of such dicts.
        keys: the keys to draw; default every numeric key except ``step``. Records lacking a key or
            holding a non-finite value are skipped for that key; records without ``step`` use
            their index.
    """
    records = _read_records(source)
    if keys is None:
        seen: dict[str, None] = {}
        for r in records:
            for k, v in r.items():
                if k != "step" and _is_number(v):
                    seen.setdefault(k)
        keys = list(seen)
    keys = list(keys)
    n = max(1, len(keys))
    ncol = min(3, n)
    nrows = math.ceil(n / ncol)
    fig = Figure(figsize=(4.2 * ncol, 2.8 * nrows))
    if not keys:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "nothing to plot", ha="center", va="center", transform=ax.transAxes)
        ax.axis("off")
    for i, key in enumerate(keys):
        ax = fig.add_subplot(nrows, ncol, i + 1)
        pts = [
            (r.get("step", j), r[key])
            for j, r in enumerate(records)
            if _is_number(r.get(key)) and _is_number(r.get("step", j))
        ]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, lw=1.0, marker="." if len(pts) < 30 else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_feature_subspaces(
    Z: Tensor,
    labels: Tensor | None,
    path: PathLike,
    dim: int = 2,
    max_points: int = 5000,
) -> Path:
    """Features projected on the top ``dim`` (2 or 3) principal directions of the whole set,
    coloured by class, with each class's own top principal direction drawn through the origin.

    The directions are right singular vectors of the *uncentred* features (the classes' subspaces
    pass through the origin, as in nearest-subspace classification).

    Args:
        Z: ``(N, d)`` features, ``d >= dim``; labels: ``(N,)`` ints or ``None``.
        max_points: at most this many points are drawn (evenly spaced subsample).
    """
    if dim not in (2, 3):
        raise ValueError(f"plot_feature_subspaces: dim must be 2 or 3, got {dim}")
    z = Z.detach().double().cpu().flatten(1)
    if z.shape[0] < 1 or z.shape[1] < dim:
        raise ValueError(
            f"plot_feature_subspaces: need (N>=1, d>={dim}) features, got {tuple(z.shape)}"
        )
    y = None if labels is None else torch.as_tensor(labels).detach().cpu().reshape(-1).long()
    if y is not None and y.shape[0] != z.shape[0]:
        raise ValueError(f"plot_feature_subspaces: {y.shape[0]} labels for {z.shape[0]} features")
    _, _, vh = torch.linalg.svd(z, full_matrices=False)
    basis = vh[:dim].T  # (d, dim)
    proj = (z @ basis).numpy()
    keep = np.linspace(0, len(proj) - 1, min(max_points, len(proj))).round().astype(int)
    fig = Figure(figsize=(6, 5.5))
    ax = fig.add_subplot(1, 1, 1, projection="3d" if dim == 3 else None)
    classes = [None] if y is None else torch.unique(y).tolist()
    cmap = matplotlib.colormaps["tab10" if len(classes) <= 10 else "tab20"]
    radius = float(np.abs(proj).max()) or 1.0
    for i, c in enumerate(classes):
        mask = np.ones(len(proj), bool) if c is None else (y.numpy() == c)
        sel = keep[mask[keep]]
        color = cmap(i % cmap.N)
        pts = proj[sel]
        label = None if c is None else str(c)
        if len(pts):
            ax.scatter(*pts.T[:dim], s=6, alpha=0.6, color=color, label=label)
        zc = z[torch.from_numpy(mask)]
        if zc.shape[0] > 0:
            u = torch.linalg.svd(zc, full_matrices=False)[2][0]  # class top direction (d,)
            d = (u @ basis).numpy()
            if float(np.abs(d).sum()) > 0:
                seg = np.stack([-d, d]) * radius
                ax.plot(*seg.T[:dim], color=color, lw=1.5)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    if dim == 3:
        ax.set_zlabel("PC 3")
    else:
        ax.set_aspect("equal", adjustable="datalim")
    if y is not None and len(classes) <= 20:
        ax.legend(fontsize=7, markerscale=2, loc="best")
    ax.set_title(f"features on top-{dim} principal directions")
    fig.tight_layout()
    return _save(fig, path)
