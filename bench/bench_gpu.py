"""GPU benchmark: training images/s and peak memory of CSC-CTRL against the CTRL baselines of the
same size, and the data loader's images/s alone.

Run (on a machine with a CUDA device; one JSON line per measurement, a summary at the end):

    python bench/bench_gpu.py                          # 32 and 128 px, every variant
    python bench/bench_gpu.py --sizes 32 --precision bf16 --compile 0
    python bench/bench_gpu.py --smoke                  # tiny, seconds, runs on CPU too
    python bench/bench_gpu.py --out bench_gpu.json     # also write every record to a file

Pairs of the same parameter count (``conf/model``): at 32 px ``csc_ctrl_32`` (5.06 M) against
``dcgan_ctrl_32`` (4.86 M), at 128 px ``csc_ctrl_128`` (9.93 M) against ``sngan_ctrl_128``
(9.54 M), 3 channels. A measurement is the real training step of the paper configs:
``CTRLStep(CTRLObjective("samplewise", beta=10, distance="l2", encoder_beta=0))`` through
``Game`` (one encoder update, one decoder update, Adam lr 1.5e-4, betas (0.5, 0.999)) on a fixed
batch of images in ``[-1, 1]``, after ``--warmup`` steps (which also compile). Variants:

* ``precision``: ``fp32``, or ``bf16`` autocast (``Game(amp=True)``, as ``trainer.amp=true``);
* ``channels_last``: models and batch in ``torch.channels_last``;
* ``compile``: ``torch.compile`` of encoder and decoder (default mode). A variant that fails to
  compile is reported with its error, not measured.

``images_per_s`` counts training images (the batch) per second of wall time between CUDA
synchronisations, median over ``--repeats`` timed blocks of ``--steps`` steps; ``peak_mib`` is
``torch.cuda.max_memory_allocated`` over the timed steps. ``fp32`` keeps torch's TF32 defaults
(recorded in the header line). The summary gives, per size and variant, CSC-CTRL's images/s over
the baseline's (target at 32 px, bf16: ≥ 0.5, i.e. within 2×).

The loader measurement writes a synthetic ImageFolder tree of JPEG images (``--loader-images``
of 160×160, two classes) to a temporary directory and reads it at 128 px through the project's
``imagefolder`` dataset and ``build_loader`` (resize, crop, ``[-1, 1]``), once per worker count
in ``--loader-workers``; ``images_per_s`` is that of the second pass over the folder (the first
warms the page cache and starts the workers).

On a machine without CUDA the script measures what a CPU can (``fp32`` and ``channels_last``
eager, and ``bf16`` autocast on CPU) and reports the GPU-only measurements (``torch.compile``,
peak memory) as skipped with the reason. ``--smoke`` uses ``csc_ctrl_mini`` against
``dcgan_ctrl_mini`` at 32 px, batch 4, one step each and 8 loader images, to check the script.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ctrl_csc.cli.common import build_models, compose_model
from ctrl_csc.engine import CTRLStep, Game, build_loader
from ctrl_csc.engine.distributed import DistContext
from ctrl_csc.losses import CTRLObjective

CHANNELS = 3
PAIRS = {32: ("csc_ctrl_32", "dcgan_ctrl_32"), 128: ("csc_ctrl_128", "sngan_ctrl_128")}
SMOKE_PAIRS = {32: ("csc_ctrl_mini", "dcgan_ctrl_mini")}
BATCH = {32: 128, 128: 32}  # per GPU: the 32 px batch of a CIFAR-10 step, 128 px of ImageNet's


def build(name: str, image_size: int, device: torch.device):
    cfg = compose_model(name, CHANNELS, image_size)
    torch.manual_seed(0)
    return build_models(cfg, device)


def n_params(*modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def make_step(name: str, image_size: int, device: torch.device, variant: dict):
    """``(run_one_step, batch, labels)`` for this model and variant."""
    f, g = build(name, image_size, device)
    params = n_params(f, g)
    fmt = torch.channels_last if variant["channels_last"] else torch.contiguous_format
    f, g = f.to(memory_format=fmt), g.to(memory_format=fmt)
    opts = {
        "encoder": torch.optim.Adam(f.parameters(), lr=1.5e-4, betas=(0.5, 0.999)),
        "decoder": torch.optim.Adam(g.parameters(), lr=1.5e-4, betas=(0.5, 0.999)),
    }
    if variant["compile"]:
        f, g = torch.compile(f), torch.compile(g)
    game = Game(
        f,
        g,
        opts,
        DistContext(device=device),
        amp=variant["precision"] == "bf16",
        amp_dtype="bfloat16",
    )
    step = CTRLStep(CTRLObjective("samplewise", beta=10.0, distance="l2", encoder_beta=0.0))
    return game, step, params, fmt


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name, image_size, batch, device, variant, args) -> dict:
    rec = {"kind": "train", "model": name, "image_size": image_size, "batch": batch, **variant}
    try:
        game, step, params, fmt = make_step(name, image_size, device, variant)
        rec["params"] = params
        gen = torch.Generator().manual_seed(0)
        x = (torch.rand(batch, CHANNELS, image_size, image_size, generator=gen) * 2 - 1).to(device)
        x = x.contiguous(memory_format=fmt)
        y = torch.zeros(batch, dtype=torch.long, device=device)
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            game.begin_step()
            out = step(game, x, y)
        sync(device)
        rec["warmup_s"] = time.perf_counter() - t0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        rates = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for _ in range(args.steps):
                game.begin_step()
                out = step(game, x, y)
            sync(device)
            rates.append(batch * args.steps / (time.perf_counter() - t0))
        rec["images_per_s"] = statistics.median(rates)
        rec["images_per_s_all"] = rates
        rec["objective_total"] = float(out["objective/total"])
        if device.type == "cuda":
            rec["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        else:
            rec["peak_mib"] = None
            rec["peak_mib_skipped"] = "peak memory is measured on CUDA only"
    except torch.cuda.OutOfMemoryError as e:
        rec["error"] = f"out of memory: {str(e).splitlines()[0]}"
    except Exception as e:  # noqa: BLE001 - e.g. a compile failure: report it, go on
        rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if variant["compile"]:
            torch._dynamo.reset()
    return rec


def synthetic_folder(root: Path, n: int, side: int = 160) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        # smooth random images (noise blurred by upsampling), closer to photos than white noise
        small = rng.integers(0, 256, (side // 8, side // 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((side, side), Image.BICUBIC)
        img.save(folder / f"{i:05d}.jpg", quality=90)


def measure_loader(n_images: int, workers: int, batch: int, pin: bool) -> dict:
    from ctrl_csc.data import build_dataset

    rec = {"kind": "loader", "image_size": 128, "images": n_images, "workers": workers}
    rec["batch"] = batch
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        synthetic_folder(Path(tmp), n_images)
        ds = build_dataset("imagefolder", root=tmp, image_size=128, channels=3)
        ctx = DistContext(device=torch.device("cuda" if pin else "cpu"))
        loader = build_loader(ds, batch, ctx, num_workers=workers, drop_last=False)
        passes = []
        for _ in range(2):
            t0, seen = time.perf_counter(), 0
            for xb, _ in loader:
                seen += len(xb)
            passes.append(seen / (time.perf_counter() - t0))
        assert tuple(xb.shape[1:]) == (3, 128, 128), xb.shape
        rec["images_per_s"] = passes[-1]
        rec["images_per_s_first_pass"] = passes[0]
        rec["pin_memory"] = pin
    return rec


def variants(device: torch.device, args) -> tuple[list[dict], list[dict]]:
    """The variants to measure, and the skipped ones with the reason."""
    grid = itertools.product(args.precision, args.channels_last, args.compile)
    run, skipped = [], []
    for precision, cl, comp in grid:
        v = {"precision": precision, "channels_last": bool(cl), "compile": bool(comp)}
        if device.type != "cuda" and comp:
            skipped.append({**v, "skipped": "torch.compile is measured on CUDA only"})
        else:
            run.append(v)
    return run, skipped


def summary(records: list[dict], pairs: dict) -> list[dict]:
    out = []
    for size, (ours, base) in pairs.items():
        by = {}
        for r in records:
            if r.get("kind") == "train" and r["image_size"] == size and "images_per_s" in r:
                key = (r["precision"], r["channels_last"], r["compile"])
                by.setdefault(key, {})[r["model"]] = r
        for key, models in sorted(by.items()):
            if ours in models and base in models:
                a, b = models[ours], models[base]
                row = {
                    "kind": "summary",
                    "image_size": size,
                    "precision": key[0],
                    "channels_last": key[1],
                    "compile": key[2],
                    "csc": ours,
                    "baseline": base,
                    "csc_images_per_s": a["images_per_s"],
                    "baseline_images_per_s": b["images_per_s"],
                    "throughput_ratio": a["images_per_s"] / b["images_per_s"],
                }
                if a.get("peak_mib") and b.get("peak_mib"):
                    row["peak_mib_ratio"] = a["peak_mib"] / b["peak_mib"]
                out.append(row)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny models and batches (CPU is fine)")
    ap.add_argument("--device", default="auto", help="auto | cuda | cpu")
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="32 and/or 128")
    ap.add_argument("--batch", type=int, default=None, help="per step (default: per size)")
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--channels-last", type=int, nargs="+", default=[0, 1], choices=[0, 1])
    ap.add_argument("--compile", type=int, nargs="+", default=[0, 1], choices=[0, 1])
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="steps per timed block")
    ap.add_argument("--repeats", type=int, default=None, help="timed blocks")
    ap.add_argument("--loader-images", type=int, default=None)
    ap.add_argument("--loader-workers", type=int, nargs="+", default=None)
    ap.add_argument("--no-loader", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    ap.add_argument("--out", type=Path, default=None, help="also write all records (JSON)")
    args = ap.parse_args(argv)
    smoke = args.smoke
    defaults = {
        "warmup": 1 if smoke else 3,
        "steps": 1 if smoke else 10,
        "repeats": 1 if smoke else 3,
        "loader_images": 8 if smoke else 512,
        "loader_workers": [0] if smoke else [0, 4, 8],
    }
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    pairs = SMOKE_PAIRS if smoke else PAIRS
    sizes = args.sizes or list(pairs)
    pairs = {s: pairs[s] for s in sizes}
    to_run, skipped = variants(device, args)

    header = {
        "kind": "header",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "smoke": smoke,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "warmup": args.warmup,
        "steps": args.steps,
        "repeats": args.repeats,
    }
    records = [header]

    def emit(rec):
        records.append(rec)
        print(json.dumps(rec), flush=True)

    print(json.dumps(header), flush=True)
    for size, models in pairs.items():
        batch = args.batch or (4 if smoke else BATCH[size])
        for variant in to_run:
            for name in models:
                emit(measure(name, size, batch, device, variant, args))
        for v in skipped:
            for name in models:
                emit({"kind": "train", "model": name, "image_size": size, "batch": batch, **v})
    if not args.no_loader:
        for w in args.loader_workers:
            emit(measure_loader(args.loader_images, w, 4 if smoke else 64, device.type == "cuda"))
    for row in summary(records, pairs):
        emit(row)
    if args.out is not None:
        args.out.write_text(json.dumps(records, indent=1) + "\n")
    errors = [r for r in records if "error" in r]
    return 1 if smoke and errors else 0


if __name__ == "__main__":
    sys.exit(main())
