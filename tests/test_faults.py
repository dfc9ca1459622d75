"""The fault matrix: every error a user can cause in ``ctrl-csc-train`` / ``ctrl-csc-eval``.

Each case runs the console script's own ``main`` in this process (Hydra's command line and all)
and checks what the user sees: one message that names the setting or file to change, no
traceback and no Hydra "Error in call to target" wrapping, a non-zero exit status, nothing
written by a hostile file, and no earlier checkpoint damaged. ``FAULTS`` is the one list of
cases; the README's table in "Safety and faults" is generated from it
(``python tests/test_faults.py``) and a test checks that the two agree.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from safetensors.torch import load_file, save_file

from ctrl_csc.cli import evaluate as eval_cli
from ctrl_csc.cli import train as train_cli
from ctrl_csc.cli.common import (
    EXIT_NON_FINITE,
    EXIT_USER_ERROR,
    config_dir,
    one_clear_answer,
)
from ctrl_csc.engine import NonFiniteObjectiveError, load_checkpoint, save_checkpoint
from ctrl_csc.pretrained import PRETRAINED, RELEASE_FORMAT, read_release

REPO = Path(__file__).resolve().parents[1]
SMOKE = ("trainer=smoke",)
HYDRA_COMPOSE = 1  # Hydra's own status for a command line it cannot compose


# ------------------------------------------------------------------------------ the cases


@dataclass(frozen=True)
class Fault:
    """One fault: the command line, and what the user must see.

    ``args`` are overrides; ``{name}`` is filled from the prepared files (the ``files``
    fixture, plus what ``setup(tmp, files, monkeypatch)`` returns). ``says``: fragments the one
    message must contain (the README shows them joined by "…"). ``status``: the exit status.
    """

    id: str
    area: str
    case: str
    args: tuple[str, ...]
    says: tuple[str, ...]
    status: int = EXIT_USER_ERROR
    cli: str = "train"
    setup: Callable | None = None
    runner: str = "in_process"  # or "kill9", or "measured": a process of its own (see below)
    shows: str | None = None  # the README's column, where ``says`` is not what the user reads
    max_rss_mb: int | None = None  # "measured": the most memory the command may take
    max_seconds: float | None = None  # "measured": the most time it may take
    marks: tuple = field(default=())


def _png(path: Path, mode: str = "L", seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    shape = (12, 12) if mode == "L" else (12, 12, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(path)


def _image_folder(root: Path, per_class: int = 5, classes=("a", "b")) -> Path:
    for c in classes:
        for i in range(per_class):
            _png(root / c / f"{i}.png", seed=i)
    return root


IMAGEFOLDER = ("dataset=imagefolder", "dataset.root={data}", "dataset.image_size=32")


def empty_class_folder(tmp, files, mp):
    data = _image_folder(tmp / "data", classes=("a",))
    (data / "b").mkdir()
    return {"data": data}


def non_image_file(tmp, files, mp):
    data = _image_folder(tmp / "data")
    (data / "a" / "00_notes.png").write_text("not an image\n")
    return {"data": data}


def non_images_in_a_worker(tmp, files, mp):
    """Only the first image (which the model check reads) is real: a loader worker meets the
    others."""
    data = tmp / "data"
    _png(data / "a" / "0.png")
    for i in range(1, 10):
        (data / "a" / f"{i}.png").write_bytes(b"\x00" * 64)
    return {"data": data}


def truncated_image(tmp, files, mp):
    data = _image_folder(tmp / "data")
    first = data / "a" / "0.png"
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    big.save(first)
    first.write_bytes(first.read_bytes()[:300])
    return {"data": data}


def _huge_png(path, side):
    """A grey PNG whose header declares ``side`` x ``side`` pixels (all black), written row by
    row: a few hundred kB on disk, ``side²`` bytes once decoded."""
    import struct
    import zlib

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    pack = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte + pixels
    body = b"".join(pack.compress(row) for _ in range(side)) + pack.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body)
                     + chunk(b"IEND", b""))  # fmt: skip


def _image_folder_with_one_of(side):
    """An image folder holding one ``side²``-pixel image; decoding any image above our limit
    (4096² for 32-pixel images) fails the case: the peak memory of a decode stays bounded."""
    from PIL import ImageFile

    def setup(tmp, files, mp):
        data = _image_folder(tmp / "data")
        _huge_png(data / "a" / "00_huge.png", side)
        real = ImageFile.ImageFile.load

        def load(image):
            assert image.size[0] * image.size[1] <= 4096 * 4096, f"decoded {image.size}"
            return real(image)

        mp.setattr(ImageFile.ImageFile, "load", load)
        return {"data": data}

    return setup


def unsorted_imagenet(tmp, files, mp):
    for i in range(3):
        _png(tmp / "imagenet" / "train" / f"img{i}.png", "RGB", seed=i)
    return {"data": tmp / "imagenet"}


def truncated_cifar(tmp, files, mp):
    folder = tmp / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {"data": rng.integers(0, 255, (10, 3072), dtype=np.uint8), "labels": [0] * 10}
        (folder / name).write_bytes(pickle.dumps(entry))
    cut = folder / "data_batch_3"
    cut.write_bytes(cut.read_bytes()[:1000])
    return {"data": tmp / "cifar10"}


def hostile_cifar(tmp, files, mp):
    """A CIFAR-10 batch whose pickle calls os.system: it must be refused and run nothing."""
    found = truncated_cifar(tmp, files, mp)
    batch = tmp / "cifar10" / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(pickle.dumps({"data": _Payload(files["dir"] / "pwned"), "labels": [0]}))
    return found


def no_data(tmp, files, mp):
    (tmp / "empty").mkdir()
    mp.setenv("CTRL_CSC_DATA", str(tmp / "empty"))
    return {}


def a_file(tmp, files, mp):
    (tmp / "file").write_text("")
    return {"file": tmp / "file"}


def checkpoints_is_a_file(tmp, files, mp):
    (tmp / "run").mkdir()
    (tmp / "run" / "checkpoints").write_text("")
    return {}


def previous_run(tmp, files, mp):
    """A copy of the 2-step run; the next save of its last.pt is what the case breaks."""
    shutil.copytree(files["ckpt"].parent.parent, tmp / "run", ignore=shutil.ignore_patterns(".*"))
    return {}


def disk_full(tmp, files, mp):
    previous_run(tmp, files, mp)
    real = torch.save

    def half_then_enospc(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    mp.setattr(torch, "save", half_then_enospc)
    return {}


FAULTS = [
    # ---------------------------------------------------------------- configuration
    Fault("unknown-group-option", "configuration", "a config group option that does not exist",
          ("model=nonexistent",), ("Could not find 'model/nonexistent'", "Available options"),
          status=HYDRA_COMPOSE),
    Fault("unknown-key", "configuration", "a misspelt setting",
          ("trainer.batchsize=8",), ("Could not override 'trainer.batchsize'",
                                     "Key 'batchsize' is not in struct"), status=HYDRA_COMPOSE),
    Fault("wrong-type-trainer", "configuration", "a count that is not a number",
          ("trainer.batch_size=abc",),
          ("trainer.batch_size must be a positive integer, got 'abc'",)),
    Fault("wrong-type-fraction", "configuration", "a count that is not an integer",
          ("trainer.max_steps=2.5",), ("trainer.max_steps must be a positive integer, got 2.5",)),
    Fault("wrong-type-model", "configuration", "a model number that is a string",
          ("model.lmbda=abc",), ("model.lmbda must be a number, got 'abc'",)),
    Fault("zero-batch-size", "configuration", "a zero size",
          ("trainer.batch_size=0",), ("trainer.batch_size must be a positive integer, got 0",)),
    Fault("zero-steps", "configuration", "zero training steps",
          ("trainer.max_steps=0",), ("trainer.max_steps must be a positive integer, got 0",)),
    Fault("negative-channels", "configuration", "a negative layer width",
          ("model.widths=[-4,64,128]",),
          ("model.widths[0] must be a positive integer, got -4",)),
    Fault("zero-stride", "configuration", "a zero stride",
          ("model.encoder.stages=[{{out_channels:32,stride:2}},{{out_channels:64,stride:0}}]",),
          ("model.encoder.stages.1.stride must be a positive integer, got 0",)),
    Fault("stage-entry-of-made-stages", "configuration",
          "one stage's key where the config makes the stages from its widths",
          ("model.encoder.stages.1.lmbda=0.2",),
          ("model.encoder.stages of model=csc_ctrl_mini is made from model.widths",
           "cannot be set one by one", "model.first_stage.KEY")),
    Fault("negative-image-size", "configuration", "a negative image size",
          ("dataset.image_size=-32",), ("dataset.image_size must be a positive integer",)),
    Fault("image-too-small", "configuration", "an image too small for the strided stages",
          ("dataset.image_size=4",), ("dataset.image_size=4 is too small for this model",
                                      "model.encoder.stages[2]")),
    Fault("feature-size-mismatch", "configuration", "a code that cannot be the feature",
          ("model=csc_ctrl_tiny", "dataset.image_size=24"),
          ("model.encoder.projection=false", "set feature_dim: 1152 or projection: true")),
    Fault("batch-larger-than-data", "configuration", "a batch larger than the dataset",
          ("trainer.batch_size=100000",), ("lower trainer.batch_size",)),
    Fault("unknown-option-value", "configuration", "a value that is not one of the choices",
          ("optim.lr_decay=cosine",), ("optim.lr_decay must be linear or none",)),
    Fault("unknown-model-argument", "configuration", "an argument the model class lacks",
          ("++model.encoder.nonsense=1",), ("model.encoder", "nonsense")),
    Fault("target-not-allowed", "configuration", "a `_target_` outside ctrl_csc.models",
          ("model.encoder._target_=os.system",), ("model.encoder._target_", "os.system")),
    Fault("unknown-dataset-option", "configuration", "an option the dataset does not have",
          ("++dataset.shuffle=true",), ("unknown option(s) dataset.shuffle",)),
    Fault("unknown-device", "configuration", "a device name torch does not know",
          ("trainer.device=tpu",), ("trainer.device='tpu' is not a device",)),
    Fault("unknown-dtype", "configuration", "a training precision other than float32/float64",
          ("trainer.dtype=float16",), ("trainer.dtype must be one of ['float32', 'float64']",
                                       "got 'float16'")),
    Fault("amp-in-float64", "configuration", "mixed precision asked of a float64 run",
          ("trainer.dtype=float64", "trainer.amp=true"),
          ("trainer.amp=true runs in half precision", "trainer.dtype=float32")),
    Fault("unknown-monitor", "configuration", "a sweep's `monitor` the run does not report",
          ("monitor=ssim",), ("monitor='ssim' is not a metric of this run's evaluation",
                              "one of psnr, density/enc0")),
    Fault("no-gpu", "configuration", "`trainer.device=cuda` without a GPU",
          ("trainer.device=cuda",), ("no CUDA device is visible", "trainer.device=cpu"),
          marks=(pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present"),)),
    Fault("zero-eval-images", "configuration", "zero images to evaluate",
          ("eval.num_images=0",), ("eval.num_images must be a positive integer",
                                   "eval.num_images=N"), cli="eval"),
    Fault("negative-eval-batch", "configuration", "a negative evaluation batch size",
          ("eval.batch_size=-1",), ("eval.batch_size must be a positive integer",), cli="eval"),
    Fault("unknown-metric", "configuration", "a metric that does not exist",
          ("eval.metrics=[psnr,fidelity]",), ("eval.metrics: unknown metric(s) ['fidelity']",),
          cli="eval"),
    # ---------------------------------------------------------------- data
    Fault("missing-root", "data", "`experiment=cifar10` without the data",
          ("experiment=cifar10",),
          ("dataset=cifar10: no data found under dataset.root=", "cifar-10-batches-py",
           "dataset.download=true"), setup=no_data),
    Fault("wrong-layout", "data", "ImageNet images not sorted into class folders",
          ("dataset=imagenet", "dataset.root={data}", "dataset.image_size=32"),
          ("are not sorted into class folders", "train/<wnid>/"), setup=unsorted_imagenet),
    Fault("truncated-data-file", "data", "a truncated CIFAR-10 batch",
          ("dataset=cifar10", "dataset.root={data}"),
          ("data_batch_3 is truncated or is not a CIFAR-10 batch", "extract"),
          setup=truncated_cifar),
    Fault("hostile-data-file", "data", "a CIFAR-10 batch whose pickle calls `os.system`",
          ("dataset=cifar10", "dataset.root={data}"),
          ("data_batch_3 is truncated or is not a CIFAR-10 batch", "system"),
          setup=hostile_cifar),
    Fault("corrupted-image", "data", "a truncated image file",
          IMAGEFOLDER, ("the image file", "0.png' cannot be read", "replace or remove it"),
          setup=truncated_image),
    Fault("non-image-file", "data", "a text file named `.png` in an image folder",
          IMAGEFOLDER, ("the image file", "00_notes.png' cannot be read"),
          setup=non_image_file),
    Fault("non-image-in-worker", "data", "the same, met by a data-loader worker",
          (*IMAGEFOLDER, "trainer.num_workers=1"), ("the image file", "cannot be read"),
          setup=non_images_in_a_worker),
    Fault("decompression-bomb", "data", "a 200 kB PNG declaring 15,000 x 15,000 pixels",
          IMAGEFOLDER, ("the image file", "00_huge.png' cannot be read",
                        "DecompressionBombError"), setup=_image_folder_with_one_of(15000)),
    Fault("oversized-image", "data", "a 5,000 x 5,000 image (under PIL's own limit)",
          IMAGEFOLDER, ("the image file", "00_huge.png' declares 5000x5000 pixels",
                        "downscale it"), setup=_image_folder_with_one_of(5000)),
    Fault("empty-class-folder", "data", "a class folder with no images",
          IMAGEFOLDER, ("the class folder", "holds no images", "remove the folder"),
          setup=empty_class_folder),
    Fault("rgb-for-grayscale", "data", "RGB channels asked of a grayscale dataset",
          ("dataset.channels=3",),
          ("dataset.channels=3 but dataset=mnist5k has 1-channel images",
           "set dataset.channels=1")),
    Fault("rgb-data-for-grayscale-model", "data", "a grayscale model evaluated on RGB data",
          ("checkpoint=quickstart", "dataset=natural_patches"),
          ("dataset=natural_patches has 3-channel images", "1-channel"), cli="eval"),
    # ---------------------------------------------------------------- checkpoints
    Fault("ckpt-missing", "checkpoint", "a checkpoint path that does not exist",
          ("trainer.resume=/nonexistent/last.pt",), ("does not exist", "trainer.resume=")),
    Fault("ckpt-truncated", "checkpoint", "a truncated checkpoint (resume)",
          ("trainer.resume={cut}",), ("is truncated or corrupted",)),
    Fault("ckpt-truncated-eval", "checkpoint", "a truncated checkpoint (eval)",
          ("checkpoint={cut}",), ("is truncated or corrupted",), cli="eval"),
    Fault("ckpt-foreign-torch-file", "checkpoint", "a torch file that is not a checkpoint",
          ("trainer.resume={foreign}",), ("is not a ctrl_csc checkpoint",
                                          "written by ctrl-csc-train")),
    Fault("ckpt-foreign-file", "checkpoint", "a file that is not a torch file at all",
          ("trainer.resume={text}",), ("is not a torch checkpoint", "trainer.resume=")),
    Fault("ckpt-pickled-payload", "checkpoint", "a checkpoint carrying a pickled object",
          ("trainer.resume={payload}",), ("carries a pickled object payload",
                                          "nothing in it was run", "posix.system")),
    Fault("ckpt-directory", "checkpoint", "a directory instead of a checkpoint file",
          ("trainer.resume={run}",), ("is a directory, not a checkpoint file",
                                      "did you mean", "checkpoints/last.pt")),
    Fault("ckpt-other-architecture", "checkpoint", "a checkpoint of another architecture",
          ("trainer.resume={ckpt}", "trainer.resume_strict=false",
           "model.widths=[16,64,128]"),
          ("does not match the configured architecture", "different shapes", "model=")),
    Fault("ckpt-other-config", "checkpoint", "a checkpoint of another configuration",
          ("trainer.resume={ckpt}", "model.lmbda=0.05"),
          ("model.lmbda: checkpoint 0.1, now 0.05", "trainer.resume_strict=false")),
    Fault("ckpt-hostile-config", "checkpoint", "a checkpoint whose config names another target",
          ("trainer.resume={hostile}",), ("model.encoder", "numpy.savetxt")),
    Fault("release-hostile-config", "checkpoint", "the same in a `.safetensors` release",
          ("checkpoint={evil}",), ("numpy.savetxt", "evil.safetensors"), cli="eval"),
    Fault("release-wider-stages", "checkpoint",
          "the quickstart release, its config edited to 8,192 atoms in two stages",
          ("checkpoint={wide_8192}",), ("builds stages.1.weight of shape (8192, 32, 4, 4)",
                                        "the file's tensor is (64, 32, 4, 4)", "wide_8192"),
          cli="eval", runner="measured", max_rss_mb=1536, max_seconds=20),
    Fault("release-huge-stages", "checkpoint", "the same with 131,072 atoms (a TB of weights)",
          ("checkpoint={wide_131072}",), ("builds stages.1.weight of shape (131072, 32, 4, 4)",
                                          "the stored config and the weights disagree"),
          cli="eval", runner="measured", max_rss_mb=1536, max_seconds=20),
    Fault("release-missing", "checkpoint", "an unknown release name or path",
          ("checkpoint=/nonexistent.pt",), ("no pretrained model '/nonexistent.pt'",),
          cli="eval"),
    # ---------------------------------------------------------------- the run
    Fault("unwritable-run-dir", "run", "a run directory that cannot be created",
          ("hydra.run.dir={file}/run",), ("cannot be created", "is a file, not a folder",
                                          "hydra.run.dir=PATH"), setup=a_file),
    Fault("unwritable-eval-dir", "run", "an evaluation directory that cannot be created",
          ("hydra.run.dir={file}/eval",), ("cannot be created", "is a file, not a folder",
                                           "hydra.run.dir=PATH"), cli="eval", setup=a_file),
    Fault("unwritable-checkpoints", "run", "a run directory whose checkpoints/ is a file",
          (), ("could not write checkpoint", "checkpoints/last.pt", "hydra.run.dir=PATH"),
          setup=checkpoints_is_a_file),
    Fault("disk-full", "run", "the disk fills up while last.pt is written",
          ("trainer.resume=auto", "trainer.max_steps=3"),
          ("could not write checkpoint", "(the previous one is intact)",
           "No space left on device"), setup=disk_full),
    Fault("kill-9-during-save", "run", "`kill -9` while last.pt is written",
          ("trainer.resume=auto", "trainer.max_steps=3"), (), status=-signal.SIGKILL,
          setup=previous_run, runner="kill9",
          shows="nothing (killed); the previous `last.pt` loads and resumes, the next save "
          "removes the half-written temporary file"),
]  # fmt: skip


# ------------------------------------------------------------------------------ running them


def cfg_of(name, overrides):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(name, overrides=list(overrides))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A real 2-step checkpoint and the damaged, foreign and hostile files made from it."""
    d = tmp_path_factory.mktemp("faults")
    train_cli.run(cfg_of("train", SMOKE), d / "run")
    ckpt = d / "run" / "checkpoints" / "last.pt"
    data = ckpt.read_bytes()
    (d / "cut.pt").write_bytes(data[: len(data) // 2])
    torch.save({"weights": torch.ones(3)}, d / "foreign.pt")
    (d / "text.pt").write_text("step,loss\n1,0.5\n" * 20)
    torch.save(
        {"format": "ctrl_csc.checkpoint/1", "models": _Payload(d / "pwned")}, d / "payload.pt"
    )
    state = load_checkpoint(ckpt)
    state["config"]["model"]["encoder"] = {
        "_target_": "numpy.savetxt",
        "fname": str(d / "pwned"),
        "X": [1],
    }
    save_checkpoint({k: v for k, v in state.items() if k != "format"}, d / "hostile.pt")
    _, config, _ = read_release(PRETRAINED["quickstart"])
    config["model"]["encoder"] = {"_target_": "numpy.savetxt", "fname": str(d / "pwned"), "X": [1]}
    meta = {"format": RELEASE_FORMAT, "config": json.dumps(config), "metrics": "{}"}
    save_file(load_file(str(PRETRAINED["quickstart"])), str(d / "evil.safetensors"), metadata=meta)
    for atoms in (8192, 131072):  # the weights as shipped, the config declaring wider stages
        wide = read_release(PRETRAINED["quickstart"])[1]
        for stage in wide["model"]["encoder"]["stages"][1:]:
            stage["out_channels"] = atoms
        meta = {"format": RELEASE_FORMAT, "config": json.dumps(wide), "metrics": "{}"}
        save_file(load_file(str(PRETRAINED["quickstart"])), str(d / f"wide_{atoms}.safetensors"),
                  metadata=meta)  # fmt: skip
    names = ("cut", "foreign", "text", "payload", "hostile")
    return {
        "dir": d,
        "run": d / "run",
        "ckpt": ckpt,
        "ckpt_digest": digest(ckpt),
        "evil": d / "evil.safetensors",
        **{f"wide_{n}": d / f"wide_{n}.safetensors" for n in (8192, 131072)},
        **{n: d / f"{n}.pt" for n in names},
    }


def run_in_process(cli: str, args: list[str], capsys) -> tuple[int, str]:
    """The console script's ``main`` with ``args`` as its command line: (status, output)."""
    main = {"train": train_cli.main, "eval": eval_cli.main}[cli]
    argv = sys.argv
    sys.argv = [f"ctrl-csc-{cli}", *args]
    capsys.readouterr()
    try:
        main()
        status = 0
    except SystemExit as stop:
        status = stop.code if isinstance(stop.code, int) else 1
    finally:
        sys.argv = argv
        logging.getLogger().handlers.clear()  # Hydra's, bound to this case's captured streams
    out = capsys.readouterr()
    return status, out.out + out.err


KILL_DURING_SAVE = r"""
import io, sys, time, torch
real, marker = torch.save, sys.argv[1]
def half_then_hang(obj, f, *args, **kwargs):  # the save of last.pt gets half-way, then hangs
    buffer = io.BytesIO()
    real(obj, buffer, *args, **kwargs)
    f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    f.flush()
    open(marker, "w").close()
    time.sleep(300)
torch.save = half_then_hang
from ctrl_csc.cli.train import main
sys.argv = ["ctrl-csc-train", *sys.argv[2:]]
main()
"""


MEASURE = """
import resource, subprocess, sys, time
start = time.monotonic()
done = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024
sys.stdout.write(done.stdout)
print(f"MEASURED {done.returncode} {peak} {time.monotonic() - start:.1f}")
"""


def run_measured(cli: str, args: list[str]) -> tuple[int, str, int, float]:
    """The console script in a process of its own, through a wrapper whose only child it is:
    ``(status, output, peak resident memory in MB, seconds)``."""
    module = {"train": "ctrl_csc.cli.train", "eval": "ctrl_csc.cli.evaluate"}[cli]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, sys.executable, "-m", module, *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    out, _, last = done.stdout.rstrip("\n").rpartition("\n")
    _, status, peak, seconds = last.split()
    return int(status), out, int(peak), float(seconds)


def run_killed_during_save(args: list[str], tmp: Path) -> tuple[int, str]:
    marker = tmp / "saving"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_DURING_SAVE, str(marker), *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "the save never started"
        time.sleep(0.02)
    proc.kill()  # SIGKILL, half-way through writing last.pt
    out, _ = proc.communicate(timeout=60)
    return proc.returncode, out


@pytest.mark.parametrize(
    "fault", [pytest.param(f, id=f.id, marks=f.marks) for f in FAULTS]
)  # fmt: skip
def test_fault(fault, files, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.delenv("CTRL_CSC_TRACEBACK", raising=False)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    names = {k: str(v) for k, v in files.items()}
    if fault.setup is not None:
        names.update({k: str(v) for k, v in fault.setup(tmp_path, files, monkeypatch).items()})
    args = [a.format(**names) for a in fault.args]
    if fault.cli == "train":
        args = [*SMOKE, *args]
    else:
        args = ["eval.plots=false", "eval.num_images=16", "eval.probe_images=16", *args]
    if not any(a.startswith("hydra.run.dir=") for a in args):
        args.append(f"hydra.run.dir={tmp_path / 'run'}")
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    before = digest(last) if last.is_file() else None

    if fault.runner == "kill9":
        status, text = run_killed_during_save(args, tmp_path)
    elif fault.runner == "measured":
        status, text, peak_mb, seconds = run_measured(fault.cli, args)
        assert peak_mb <= fault.max_rss_mb, f"peak memory {peak_mb} MB"
        assert seconds <= fault.max_seconds, f"{seconds} s"
    else:
        status, text = run_in_process(fault.cli, args, capsys)

    assert status == fault.status != 0, text[-3000:]
    assert "Traceback" not in text and "Error in call to target" not in text, text[-3000:]
    assert "\\n" not in text, text  # a message is plain text, not an exception's repr
    for fragment in fault.says:
        assert fragment in text, f"{fragment!r} not in:\n{text[-3000:]}"
    if fault.status == EXIT_USER_ERROR:  # one message: logged once, or the one line before Hydra
        reports = [line for line in text.splitlines() if "[ERROR]" in line]
        reports += [line for line in text.splitlines() if line.startswith("ctrl-csc-")]
        assert len(reports) == 1, text
    # nothing damaged or written: the earlier run's checkpoint, this run's previous last.pt
    assert digest(files["ckpt"]) == files["ckpt_digest"]
    assert not (files["dir"] / "pwned").exists()
    if before is not None:
        assert digest(last) == before
        assert load_checkpoint(last)["step"] == 2
        if fault.runner != "kill9":
            assert not list(last.parent.glob(".*.tmp"))
    if fault.runner == "kill9":  # the half-written file was a temporary one beside last.pt
        assert list(last.parent.glob(".last.pt.*.tmp"))
        again = [*SMOKE, "trainer.max_steps=3", "trainer.resume=auto"]
        train_cli.run(cfg_of("train", again), tmp_path / "run")  # continues from step 2
        rows = [
            json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        ]
        assert [r["step"] for r in rows if "objective/total" in r] == [1, 2, 3]
        assert load_checkpoint(last)["step"] == 3
        assert not list(last.parent.glob(".*.tmp"))  # the next save removed the leftover


# ------------------------------------------------------------------------------ the README


def readme_table() -> str:
    """The README's fault table, generated from :data:`FAULTS`."""
    rows = [
        "| case | area | what the user sees | exit |",
        "|---|---|---|---|",
    ]
    for f in FAULTS:
        shows = f.shows or " … ".join(f"`{s}`" for s in f.says)
        status = "killed (-9)" if f.status < 0 else str(f.status)
        rows.append(f"| `{f.id}`: {f.case} | {f.area} | {shows} | {status} |")
    return "\n".join(rows)


def test_the_readme_table_lists_every_case():
    text = (REPO / "README.md").read_text()
    section = text.split("## Safety and faults", 1)[1].split("\n## ", 1)[0]
    assert readme_table() in section, (
        "README's fault table differs from tests/test_faults.py: regenerate it with "
        "`python tests/test_faults.py`"
    )


def test_there_are_at_least_25_cases_in_every_area():
    assert len(FAULTS) >= 25 and len({f.id for f in FAULTS}) == len(FAULTS)
    assert {f.area for f in FAULTS} == {"configuration", "data", "checkpoint", "run"}


# ------------------------------------------------------------------------------ the mechanism


def test_the_console_scripts_log_the_message_and_exit_with_their_status(caplog, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.delenv("CTRL_CSC_TRACEBACK", raising=False)
    with caplog.at_level(logging.ERROR, "ctrl_csc"), pytest.raises(SystemExit) as stop:
        with one_clear_answer():
            raise ValueError("dataset.root: no such folder")
    assert stop.value.code == EXIT_USER_ERROR == 2
    assert caplog.messages == ["dataset.root: no such folder"]
    with pytest.raises(SystemExit) as stop, one_clear_answer():
        raise NonFiniteObjectiveError("the decoder objective became nan")
    assert stop.value.code == EXIT_NON_FINITE == 3
    with pytest.raises(KeyError), one_clear_answer():  # a bug, not a user error: traceback
        raise KeyError("x")
    monkeypatch.setenv("CTRL_CSC_TRACEBACK", "1")
    with pytest.raises(ValueError), one_clear_answer():
        raise ValueError("let through for debugging")


def _cli(module, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_installed_commands_print_one_message_and_exit_2(files, tmp_path):
    """The same answer from a fresh interpreter, through ``python -m`` (what the console scripts
    run): a refused resume, and an unwritable run directory that Hydra would have failed on."""
    out = _cli(
        "ctrl_csc.cli.train",
        *SMOKE,
        f"trainer.resume={files['ckpt']}",
        "seed=7",
        f"hydra.run.dir={tmp_path}",
    )
    assert out.returncode == EXIT_USER_ERROR, out.stderr[-2000:]
    text = out.stdout + out.stderr
    assert "Traceback" not in text and "seed: checkpoint 0, now 7" in text
    assert len([line for line in text.splitlines() if "[ERROR]" in line]) == 1, text
    assert load_checkpoint(files["ckpt"])["step"] == 2


if __name__ == "__main__":  # print the README's table
    sys.stdout.write(readme_table() + "\n")
