"""The suite: every run behind the paper's claims, at two scales, as Hydra configurations.

A :class:`Row` is one training run (a model *family* on a *data kind*, plus the settings it
varies), and the evaluations done on its final checkpoint. A :class:`Scale` turns a row into
concrete Hydra config choices and values: ``miniature`` uses the embedded datasets, the models of
about 0.86M parameters (``csc_ctrl_mini`` and its baselines) and a few hundred steps on a CPU;
``full`` uses the paper's experiment files (``conf/experiment/``) for data, models, optimiser and
trainer, so the same rows become the paper's protocol. ``--smoke`` keeps the rows and shrinks the
training to a few steps on a few images.

The miniature's data:

- ``mnist``: trained on ``mnist5k``, unseen ``digits`` (scikit-learn's 8x8 digits, upsampled);
- ``photos``: trained on ``natural_patches`` crops of five photos, unseen crops of the other
  five (the full scale: CIFAR-10, unseen STL-10 resized to 32 px).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ctrl_csc.cli.common import config_dir

#: Model families compared in the reconstruction table, in table order.
FAMILIES = ("csc_ctrl", "dcgan_ctrl", "conv_ae", "sparse_ae", "denoising_ae", "vae")
FAMILY_LABELS = {
    "csc_ctrl": "CSC-CTRL",
    "dcgan_ctrl": "CTRL, DCGAN pair",
    "conv_ae": "conv autoencoder",
    "sparse_ae": "sparse conv AE",
    "denoising_ae": "denoising conv AE",
    "vae": "VAE (β = 1)",
}
DATA_KINDS = ("mnist", "photos")

# The five photos the miniature trains on, and the five it never sees.
PHOTOS_SEEN = ["astronaut", "chelsea", "coins", "hubble_deep_field", "grass"]
PHOTOS_UNSEEN = ["camera", "coffee", "rocket", "gravel", "brick"]


@dataclass(frozen=True)
class Row:
    """One training run of the suite.

    Attributes:
        name: the run's directory and config name (``<runs>/<name>/``).
        family: one of :data:`FAMILIES`.
        data: one of :data:`DATA_KINDS`.
        group: the table it belongs to (``reconstruction``, ``solver``, ``lambda``, ``stages``,
            ``decoder``, ``batch``, ``seeds``); the reconstruction rows are the baselines of the
            ablations and the stability figure.
        setting: what the row varies, as the table shows it.
        values: nested config values on top of the scale's base for the family (Hydra keys).
        seed: the training seed.
    """

    name: str
    family: str
    data: str
    group: str
    setting: str
    values: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0


@dataclass(frozen=True)
class Evaluation:
    """One ``ctrl-csc-eval`` of a row's checkpoint: ``on`` is ``test`` (its own held-out split)
    or ``unseen`` (the data kind's unseen dataset)."""

    row: str
    on: str

    @property
    def name(self) -> str:
        return f"{self.row}__{self.on}"


def _stages(n: int) -> dict[str, Any]:
    """``csc_ctrl_mini`` cut to its first ``n`` CSC stages (the decoder mirrors them:
    conf/model/csc/decoder.yaml)."""
    return {"model": {"widths": [32, 64, 128][:n]}}


def _solver(n_iter: int, algorithm: str) -> dict[str, Any]:
    defaults = {"stage_defaults": {"algorithm": algorithm}}
    return {"model": {"n_iter": n_iter, "encoder": defaults, "decoder": copy.deepcopy(defaults)}}


def rows() -> list[Row]:
    """Every run of the suite (the same at every scale)."""
    out = [
        Row(f"{family}_{data}", family, data, "reconstruction", FAMILY_LABELS[family])
        for data in DATA_KINDS
        for family in FAMILIES
    ]
    base = "csc_ctrl_mnist"  # the baseline of every ablation: ISTA, T = 2, λ = 0.1, 3 stages
    for t, alg in ((1, "ista"), (5, "ista"), (5, "fista")):  # FISTA at T <= 2: see SAME_AS
        out.append(
            Row(
                f"{base}_T{t}_{alg}",
                "csc_ctrl",
                "mnist",
                "solver",
                f"T={t} {alg.upper()}",
                _solver(t, alg),
            )
        )
    for lam in (0.05, 0.2):
        out.append(
            Row(
                f"{base}_lmbda{lam}",
                "csc_ctrl",
                "mnist",
                "lambda",
                f"λ={lam}·λ_max",
                {"model": {"lmbda": lam}},
            )
        )
    for n in (1, 2):
        out.append(
            Row(
                f"{base}_stages{n}",
                "csc_ctrl",
                "mnist",
                "stages",
                f"{n} stage" + "s" * (n > 1),
                _stages(n),
            )
        )
    out.append(
        Row(
            f"{base}_synthesis",
            "csc_ctrl",
            "mnist",
            "decoder",
            "synthesis stages",
            {"model": {"decoder": {"stage_defaults": {"kind": "synthesis"}}}},
        )
    )
    for b in (32, 64):
        out.append(
            Row(
                f"{base}_batch{b}",
                "csc_ctrl",
                "mnist",
                "batch",
                f"batch {b}",
                {"trainer": {"batch_size": b}},
            )
        )
    for family in ("csc_ctrl", "dcgan_ctrl"):
        for seed in (1, 2):
            out.append(
                Row(
                    f"{family}_mnist_seed{seed}",
                    family,
                    "mnist",
                    "seeds",
                    f"seed {seed}",
                    seed=seed,
                )
            )
    return out


#: Ablation settings that are not run because they compute exactly what another row computes:
#: FISTA's first momentum weight is 0, so its first two iterates are ISTA's
#: (``tests/test_repro.py`` checks the model's outputs and gradients agree bit for bit).
SAME_AS = {"T=1 FISTA": "csc_ctrl_mnist_T1_ista", "T=2 FISTA": "csc_ctrl_mnist"}


def evaluations(suite_rows: list[Row]) -> list[Evaluation]:
    """Every row on its own test split; the reconstruction rows also on the unseen dataset."""
    out = [Evaluation(r.name, "test") for r in suite_rows]
    out += [Evaluation(r.name, "unseen") for r in suite_rows if r.group == "reconstruction"]
    return out


# ----------------------------------------------------------------------------------------- scales
@dataclass(frozen=True)
class Scale:
    """How rows become Hydra configs.

    Attributes:
        name: ``miniature`` or ``full``.
        family_parts: ``(family, data) -> (choices, values)``: config-group choices
            (``{"model": "csc_ctrl_mini", ...}``) and nested values of a family's base run.
        unseen: ``data -> (dataset choice, dataset values)`` of the unseen evaluation.
        eval_values: nested values of every evaluation (``eval.*``).
        unseen_metrics: the metrics of the unseen evaluations.
        generate_values: nested values added to the reconstruction rows' test evaluations: the
            class consistency of samples decoded from each class's fitted features (issue 23).
        classical_values: nested values added to CSC-CTRL's reconstruction rows' test
            evaluations: each stage's dictionary against a classical one learned on the same
            stage inputs, at equal density (the "dictionaries" verdict).
        step_cost: ``family -> seconds per training step`` (one CPU thread, batch 128, T = 2),
            used only to balance the local shards.
    """

    name: str
    family_parts: Any
    unseen: Mapping[str, tuple[str, dict[str, Any]]]
    eval_values: Mapping[str, Any]
    unseen_metrics: tuple[str, ...] = ("psnr", "ssim", "density")
    generate_values: Mapping[str, Any] = field(
        default_factory=lambda: {"eval": {"generate": ["samples"]}}
    )
    classical_values: Mapping[str, Any] = field(
        default_factory=lambda: {"eval": {"classical_steps": 300}}
    )
    step_cost: Mapping[str, float] = field(default_factory=dict)


_MINI_MODELS = {
    "csc_ctrl": ("csc_ctrl_mini", "ctrl_samplewise_quickstart", {}),
    "dcgan_ctrl": (
        "dcgan_ctrl_mini",
        "ctrl_samplewise_quickstart",
        {"loss": {"joint_batch": True}},
    ),
    "conv_ae": ("conv_ae_mini", "reconstruction", {}),
    "sparse_ae": ("sparse_ae_mini", "sparse_reconstruction", {}),
    "denoising_ae": ("conv_ae_mini", "reconstruction", {"loss": {"noise_std": 0.1}}),
    "vae": ("conv_vae_mini", "vae", {}),
}
_MINI_DATA = {
    "mnist": ("mnist5k", {}),
    "photos": ("natural_patches", {"dataset": {"photos": PHOTOS_SEEN, "num_classes": 5}}),
}
#: The miniature's training protocol: the quickstart's trainer, 250 steps of batch 128.
MINI_STEPS = 250


def _mini_parts(family: str, data: str) -> tuple[dict[str, str], dict[str, Any]]:
    model, loss, values = _MINI_MODELS[family]
    dataset, data_values = _MINI_DATA[data]
    choices = {
        "dataset": dataset,
        "model": model,
        "loss": loss,
        "optim": "quickstart",
        "trainer": "quickstart",
    }
    trainer = {
        "max_steps": MINI_STEPS,
        "batch_size": 128,
        "eval_every": 50,
        "log_every": 25,
        "threads": 1,
        "progress": False,
    }
    return choices, merge({"trainer": trainer}, data_values, values)


def experiment_parts(name: str) -> tuple[dict[str, str], dict[str, Any]]:
    """The group choices and values of ``conf/experiment/<name>.yaml``."""
    cfg = OmegaConf.to_container(OmegaConf.load(Path(config_dir()) / "experiment" / f"{name}.yaml"))
    choices = {}
    for entry in cfg.pop("defaults", []):
        (key, value), *_ = entry.items()
        choices[key.removeprefix("override ").lstrip("/")] = value
    cfg.pop("name", None)
    return choices, cfg


# The paper's experiment file of each family on CIFAR-10; on MNIST the family keeps MNIST's
# experiment (data, trainer) with the family's model and loss.
_FULL_EXPERIMENTS = {
    "csc_ctrl": "cifar10",
    "dcgan_ctrl": "cifar10_dcgan_ctrl",
    "conv_ae": "cifar10_conv_ae",
    "sparse_ae": "cifar10_sparse_ae",
    "denoising_ae": "cifar10_denoising_ae",
    "vae": "cifar10_vae",
}


def _full_parts(family: str, data: str) -> tuple[dict[str, str], dict[str, Any]]:
    choices, values = experiment_parts(_FULL_EXPERIMENTS[family])
    if data == "mnist":
        mnist_choices, mnist_values = experiment_parts("mnist")
        choices = {**mnist_choices, "model": choices["model"], "loss": choices["loss"]}
        values = merge(mnist_values, {"loss": values.get("loss", {})})
    return choices, values


SCALES = {
    "miniature": Scale(
        "miniature",
        _mini_parts,
        unseen={
            "mnist": ("digits", {}),
            "photos": ("natural_patches", {"photos": PHOTOS_UNSEEN, "num_classes": 5}),
        },
        eval_values={"eval": {"num_images": 1000, "probe_images": 2000, "progress": False}},
        step_cost={
            "csc_ctrl": 0.72,
            "dcgan_ctrl": 0.45,
            "conv_ae": 0.28,
            "sparse_ae": 0.28,
            "denoising_ae": 0.28,
            "vae": 0.3,
        },
    ),
    "full": Scale(
        "full",
        _full_parts,
        unseen={"mnist": ("digits", {}), "photos": ("stl10", {})},
        eval_values={"eval": {"num_images": 10000, "probe_images": 50000, "progress": False}},
    ),
}

#: ``--smoke``: every row for a few steps on a few images (CI runs the whole suite this way).
SMOKE_VALUES = {
    "trainer": {
        "max_steps": 2,
        "batch_size": 16,
        "eval_batch_size": 64,
        "eval_every": 1,
        "log_every": 1,
        "eval_images": 64,
        "baseline_images": 64,
        "device": "cpu",
        "num_workers": 0,
        "checkpoint_every": 0,
        "threads": 1,
        "progress": False,
    },
}
SMOKE_EVAL_VALUES = {
    "eval": {"num_images": 64, "probe_images": 64, "batch_size": 64, "classical_images": 16}
}


def merge(*dicts: Mapping[str, Any]) -> dict[str, Any]:
    """Nested merge, later dicts winning; lists are replaced, not merged."""
    out: dict[str, Any] = {}
    for d in dicts:
        for k, v in d.items():
            if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
                out[k] = merge(out[k], v)
            else:
                out[k] = copy.deepcopy(v)
    return out


def train_config(row: Row, scale: Scale, smoke: bool = False) -> tuple[dict[str, str], dict]:
    """The group choices and nested values of a row's training run."""
    choices, values = scale.family_parts(row.family, row.data)
    values = merge(values, {"seed": row.seed, "name": row.name}, row.values)
    if smoke:  # a row's own batch size stays (the batch ablation), everything else shrinks
        smoke_values = copy.deepcopy(SMOKE_VALUES)
        if "batch_size" in row.values.get("trainer", {}):
            del smoke_values["trainer"]["batch_size"]
        values = merge(values, smoke_values)
    return choices, values


def eval_config(
    evaluation: Evaluation, row: Row, checkpoint: Path, scale: Scale, smoke: bool = False
) -> tuple[dict[str, str], dict]:
    """The group choices and nested values of an evaluation of ``row``'s ``checkpoint`` (the
    reconstruction rows' test evaluations also decode samples, ``scale.generate_values``, and
    CSC-CTRL's compare its dictionaries with classical ones, ``scale.classical_values``)."""
    values = merge({"checkpoint": str(checkpoint)}, scale.eval_values)
    choices: dict[str, str] = {}
    if evaluation.on == "unseen":
        dataset, data_values = scale.unseen[row.data]
        choices["dataset"] = dataset
        values = merge(values, {"dataset": data_values, "eval": {"metrics": scale.unseen_metrics}})
    elif row.group == "reconstruction":
        values = merge(values, scale.generate_values)
        if row.family == "csc_ctrl":
            values = merge(values, scale.classical_values)
    if smoke:
        values = merge(values, SMOKE_EVAL_VALUES)
        if values["eval"].get("classical_steps"):
            values["eval"]["classical_steps"] = 2
    return choices, values


def estimated_cost(row: Row, scale: Scale) -> float:
    """Seconds of one CPU thread a row's training takes, roughly (for balancing shards)."""
    per_step = scale.step_cost.get(row.family, 1.0)
    trainer = row.values.get("trainer", {})
    per_step *= trainer.get("batch_size", 128) / 128
    n_iter = row.values.get("model", {}).get("n_iter")
    if n_iter is not None and row.family == "csc_ctrl":
        per_step *= (1 + 2 * n_iter) / 5  # the CSC stages' convolutions, 2T - 1 each, and more
    return per_step * MINI_STEPS + 20
