"""``ctrl-csc-eval``: measure a trained model on its reconstructions ``X̂ = g(f(X))``.

Writes ``eval.json`` and pictures (reconstruction grid, dictionary atoms, code densities, feature
subspaces) to the run directory and logs a table. ``dataset=NAME`` other than the training set is
the cross-dataset generalisation test (images are resized to the model's training size).

The dictionary metrics compare each CSC stage with its initial dictionary, which is not stored in
checkpoints or releases: :func:`initial_models` re-creates it from the run's stored config and seed,
exactly as ``ctrl-csc-train`` built it (``seed_all(seed)``, then the models on the CPU).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from ctrl_csc.cli.common import (
    build_models,
    check_eval_settings,
    check_run_dir_arguments,
    check_writable,
    config_dir,
    one_clear_answer,
    seed_all,
    seeded_subset,
)
from ctrl_csc.engine.checkpoint import rng_state, set_rng_state
from ctrl_csc.engine.distributed import resolve_device
from ctrl_csc.eval import (
    build_inception_feature_extractor,
    classical_comparison,
    compute_fid,
    compute_inception_score,
    csc_stages,
    evaluate_reconstructions,
    plot_densities,
    plot_dictionary,
    plot_feature_subspaces,
    reconstruction_grid,
)
from ctrl_csc.eval.generate import collect_images, encode_loader, generation_report
from ctrl_csc.eval.visualize import labelled_rows
from ctrl_csc.pretrained import load_pretrained
from ctrl_csc.pretrained.guard import DATASET_BUILDERS, checked_entry, plain_config

log = logging.getLogger("ctrl_csc")


def eval_dataset_config(cfg: DictConfig, train_config: dict[str, Any]) -> DictConfig:
    """The checkpoint's own dataset, or ``dataset=NAME`` resized to the model's image size."""
    trained = OmegaConf.create(train_config["dataset"])
    if cfg.get("dataset") is None:
        return trained
    data = cfg.dataset.copy()
    if data.channels != trained.channels:
        raise ValueError(
            f"dataset={data.name} has {data.channels}-channel images but the model was "
            f"trained on {trained.channels}-channel {trained.name}: pick a dataset "
            "with as many channels"
        )
    if data.image_size != trained.image_size:
        log.info(
            "dataset=%s resized to the model's %d px (dataset.image_size was %d)",
            data.name,
            trained.image_size,
            data.image_size,
        )
        data.image_size = trained.image_size
    return data


#: Dataset arguments that say where data is read, written or fetched from: a stored config's
#: are never used (the command line's ``eval.data_root`` / ``eval.download`` or the environment's
#: ``$CTRL_CSC_DATA`` decide), so a model file cannot choose what is downloaded or where.
LOCATION_KEYS = ("root", "download")


def build_eval_dataset(cfg: DictConfig, data_cfg: DictConfig, split: str):
    """The evaluation dataset: ``dataset=NAME`` of the user's own config through Hydra, or the
    checkpoint's stored dataset, built only through the allow-listed
    :func:`ctrl_csc.data.build_dataset` (a file's config never reaches ``instantiate``), with
    its location and ``download`` from this command (:data:`LOCATION_KEYS`), not from the file."""
    if cfg.get("dataset") is not None:
        return instantiate(data_cfg, split=split)
    source = f"{str(cfg.checkpoint)!r}"
    entry = plain_config(data_cfg, source)
    stored_root = entry.get("root")
    entry = {k: v for k, v in entry.items() if k not in LOCATION_KEYS}
    root = cfg.eval.get("data_root")
    if stored_root is not None and root is None:
        log.info(
            "the checkpoint's dataset root %r is not used: the data is read from "
            "eval.data_root, else $CTRL_CSC_DATA/%s",
            stored_root,
            entry.get("name"),
        )
    fn, kwargs = checked_entry(
        entry,
        DATASET_BUILDERS,
        "dataset",
        source,
        split=split,
        root=root,
        download=bool(cfg.eval.get("download", False)),
    )
    return fn(**kwargs)


def initial_models(
    train_config: dict[str, Any], source: str = "a stored configuration"
) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """The ``(encoder, decoder)`` a training run started from, re-created from its config.

    ``ctrl-csc-train`` seeds every generator with ``seed`` and then builds the models on the CPU
    (moving them to the device after), so the same two calls give the same initial weights. The
    global random state is restored afterwards. This relies on the model classes initialising as
    they did when the run was trained.

    Args:
        train_config: the run's resolved configuration (as stored in a checkpoint or release),
            with ``seed`` and ``model``.
        source: the file it came from (for messages; its interpolations are refused).

    Returns:
        The two modules on the CPU in eval mode, or ``None`` (with a warning) when the config
        holds no seed (e.g. a checkpoint of a trainer used from Python without one).
    """
    seed = train_config.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool) or "model" not in train_config:
        log.warning(
            "the run's config has no integer `seed` and `model`: the initial dictionaries cannot "
            "be re-created, so dictionary/*/moved and residual_init are skipped"
        )
        return None
    state = rng_state()
    try:
        seed_all(seed)
        encoder, decoder = build_models(train_config["model"], "cpu", source=source)
    finally:
        set_rng_state(state)
    return encoder.eval(), decoder.eval()


def format_table(metrics: dict[str, float]) -> str:
    width = max(map(len, metrics))
    return "\n".join(
        f"  {k:<{width}}  {v:.4f}" if isinstance(v, float) else f"  {k:<{width}}  {v}"
        for k, v in metrics.items()
    )


def write_generations(
    model, probe, loader, ecfg, device, output_dir: Path, probe_features=None
) -> dict[str, float]:
    """``eval.generate``: fit each class's features on the training images (``probe``, or their
    features and labels ``probe_features`` where the probes already encoded them), decode
    samples, traversals and interpolations of held-out pairs (``loader``), write one labelled
    PNG each; return the class-consistency measures (:mod:`ctrl_csc.eval.generate`)."""
    if probe_features is not None:
        z_train, y_train = probe_features[0].double(), probe_features[1]
    else:
        progress = ecfg.progress is not False
        z_train, y_train = encode_loader(model.encoder, probe, device, ecfg.probe_images, progress)
    x_test, y_test = collect_images(loader, ecfg.num_images)  # generation_report encodes them
    report = generation_report(
        model.encoder, model.decoder, z_train, y_train, x_test, y_test,
        n_components=ecfg.generate_components, per_class=ecfg.generate_per_class,
        directions=ecfg.generate_directions, steps=ecfg.generate_steps, device=device,
    )  # fmt: skip
    if {"fid", "is"} & set(ecfg.metrics):  # of the samples, against the held-out images
        fe = build_inception_feature_extractor(ecfg.inception_weights).to(device).eval()
        pool = report.sample_pool.to(device)
        if "fid" in ecfg.metrics:
            report.metrics["fid/samples"] = compute_fid(x_test.to(device), pool, fe)
        if "is" in ecfg.metrics:
            report.metrics["is/samples"] = compute_inception_score(pool, fe)[0]
    data = getattr(probe.dataset, "dataset", probe.dataset)  # through seeded_subset's Subset
    names = getattr(data, "classes", None)

    def name(label: int) -> str:
        return str(names[label]) if names is not None and 0 <= label < len(names) else str(label)

    per = ecfg.generate_per_class
    classes = [m.label for m in report.models]
    wanted = set(ecfg.generate)
    if "samples" in wanted:
        rows = report.samples.unflatten(0, (len(classes), per))
        labelled_rows(rows, [name(c) for c in classes], output_dir / "samples.png",
                      "samples: class mean + Gaussian on its top directions")  # fmt: skip
    if "traversals" in wanted:
        t = report.traversals  # (classes, directions * steps, ...)
        k = t.shape[1] // ecfg.generate_steps
        rows = t.unflatten(1, (k, ecfg.generate_steps)).flatten(0, 1)
        labels = [f"{name(c)} · u{i + 1}" for c in classes for i in range(k)]
        labelled_rows(rows, labels, output_dir / "traversals.png",
                      "traversals: class mean ± 2σ along each top direction")  # fmt: skip
    if "interpolations" in wanted and len(report.interpolations):
        pairs = report.pair_labels
        labels = (
            [f"{name(a)} → {name(b)}" for a, b in pairs]
            if pairs is not None
            else [f"pair {i + 1}" for i in range(len(report.interpolations))]
        )
        along = "the sphere" if getattr(model.encoder, "normalize", False) else "the chord"
        labelled_rows(report.interpolations, labels, output_dir / "interpolations.png",
                      f"interpolations between held-out images (along {along})")  # fmt: skip
    return report.metrics


def compare_with_classical(encoder, cfg, data_cfg, loader, ecfg, device, initial_encoder=None):
    """``eval.classical_steps > 0``: each CSC stage against a classical dictionary learned on
    the stage's inputs from ``eval.classical_images`` training images, compared at equal density
    on as many held-out images, with the initial atoms too where the run's start can be re-created
    (:func:`ctrl_csc.eval.classical.classical_comparison`)."""
    n = ecfg.classical_images
    train_set = seeded_subset(build_eval_dataset(cfg, data_cfg, "train"), n)
    train = DataLoader(train_set, batch_size=ecfg.batch_size, num_workers=ecfg.num_workers)
    log.info(
        "learning a classical dictionary per CSC stage (%d steps on %d images)",
        ecfg.classical_steps,
        len(train_set),
    )

    def images(batches, limit):
        seen = 0
        for x, *_ in batches:
            if seen >= limit:
                return
            yield x[: limit - seen].to(device, torch.float32)
            seen += len(x)

    return classical_comparison(
        encoder,
        images(train, n),
        images(loader, n),
        steps=ecfg.classical_steps,
        initial_encoder=initial_encoder,
    )


def run(cfg: DictConfig, output_dir: str | Path) -> dict[str, float]:
    output_dir = check_writable(output_dir)
    ecfg = cfg.eval
    check_eval_settings(ecfg)
    seed_all(0)
    device = resolve_device(ecfg.device)
    model, train_config = load_pretrained(cfg.checkpoint, device)
    data_cfg = eval_dataset_config(cfg, train_config)
    source = f"{str(cfg.checkpoint)!r}"
    test_set = seeded_subset(build_eval_dataset(cfg, data_cfg, ecfg.split), ecfg.num_images)
    loader = DataLoader(test_set, batch_size=ecfg.batch_size, num_workers=ecfg.num_workers)
    generate = list(ecfg.get("generate") or [])
    wants_probe = {"nearest_subspace", "linear_probe"} & set(ecfg.metrics)
    probe = None
    if wants_probe or generate:
        probe_set = seeded_subset(build_eval_dataset(cfg, data_cfg, "train"), ecfg.probe_images)
        probe = DataLoader(probe_set, batch_size=ecfg.batch_size, num_workers=ecfg.num_workers)
    wants_initial = "dictionary" in ecfg.metrics or bool(ecfg.get("classical_steps"))
    initial = initial_models(train_config, source) if wants_initial else None
    initial_encoder = None if initial is None else initial[0]
    result = evaluate_reconstructions(
        model.encoder,
        model.decoder,
        loader,
        metrics=tuple(ecfg.metrics),
        inception_weights=ecfg.inception_weights,
        device=device,
        probe_loader=probe,
        subspace_components=ecfg.n_components,
        progress=ecfg.progress is not False,
        initial_encoder=initial_encoder,
    )
    if generate:
        result.metrics.update(
            write_generations(model, probe, loader, ecfg, device, output_dir, result.probe)
        )
    classical = None
    if ecfg.get("classical_steps") and csc_stages(model.encoder):
        classical_metrics, classical = compare_with_classical(
            model.encoder, cfg, data_cfg, loader, ecfg, device, initial_encoder
        )
        result.metrics.update(classical_metrics)
    metrics = {
        "checkpoint": str(cfg.checkpoint),
        "dataset": data_cfg.name,
        "trained_on": train_config["dataset"]["name"],
        **result.metrics,
    }
    (output_dir / "eval.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if ecfg.plots:
        reconstruction_grid(
            result.inputs, result.reconstructions, output_dir / "reconstructions.png"
        )
        if csc_stages(model.encoder):
            plot_dictionary(
                model.encoder,
                output_dir / "dictionary.png",
                initial_encoder=initial_encoder,
                classical=classical,
            )
        densities = {k: v for k, v in result.metrics.items() if k.startswith("density/")}
        if densities:
            plot_densities(densities, output_dir / "densities.png")
        if result.labels is not None and result.features is not None:
            plot_feature_subspaces(result.features, result.labels, output_dir / "features.png")
    log.info(
        "%s on %s (%d images):\n%s",
        cfg.checkpoint,
        data_cfg.name,
        len(test_set),
        format_table(result.metrics),
    )
    log.info("wrote %s", output_dir / "eval.json")
    return result.metrics


def main() -> None:
    """Console script ``ctrl-csc-eval`` (Hydra's command line; see :func:`hydra_main`)."""
    check_run_dir_arguments(sys.argv, "ctrl-csc-eval")  # Hydra creates it before we run
    hydra_main()


@hydra.main(config_path=config_dir(), config_name="eval", version_base="1.3")
def hydra_main(cfg: DictConfig) -> float:
    """The Hydra task of ``ctrl-csc-eval``; returns the PSNR (for sweeps over checkpoints)."""
    with one_clear_answer():
        metrics = run(cfg, HydraConfig.get().runtime.output_dir)
    return float(metrics.get("psnr", float("nan")))


if __name__ == "__main__":
    main()
