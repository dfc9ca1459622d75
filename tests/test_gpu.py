"""The GPU path: bf16 autocast and ``channels_last`` against fp32 (relative error of the objective
and of every stage's code), on CUDA (``gpu``-marked, skipped without a device) and, where it is
cheap, on CPU; and ``bench/bench_gpu.py --smoke``, which runs on CPU too."""

import copy
import importlib.util
import json
import math
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ctrl_csc.cli.common import build_models, compose_model
from ctrl_csc.losses import CTRLObjective

REPO = Path(__file__).resolve().parents[1]


def build(name, channels, image_size, device):
    model = compose_model(name, channels, image_size)
    torch.manual_seed(0)
    return build_models(model, device)


def images(n, channels, size, device):
    """Smooth random images in [-1, 1] (upsampled noise; no constant regions)."""
    g = torch.Generator().manual_seed(1)
    small = torch.randn(n, channels, size // 4, size // 4, generator=g)
    x = F.interpolate(small, size=(size, size), mode="bilinear", align_corners=False)
    return torch.tanh(x).to(device)


def forward_record(f, g, x, autocast=None, channels_last=False):
    """Encoder codes of X, decoder codes (or image) of Z = f(X), and the sample-wise objective of
    (Z, f(g(Z))) — on copies of the models, in training mode, all returned in float32."""
    f, g = copy.deepcopy(f), copy.deepcopy(g)
    if channels_last:
        f, g = f.to(memory_format=torch.channels_last), g.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    objective = CTRLObjective("samplewise", beta=10.0, distance="l2")
    with torch.no_grad(), autocast or nullcontext():
        enc = f.stage_outputs(x)
        z = f(x)
        # every decoding stage's output, the last one the image before its output activation
        dec = g.stage_outputs(z)
        z_hat = f(g(z))
    terms = objective(z.float(), z_hat.float(), None)
    return {
        "enc": [c.float() for c in enc],
        "dec": [c.float() for c in dec],
        "terms": {k: float(v) for k, v in terms.as_dict().items()},
    }


def relative_errors(ref, other):
    """Per stage ``‖c − c_ref‖ / ‖c_ref‖``; per objective ``|T − T_ref| / max(|T_ref|, R(Z))``."""
    out = {}
    for part in ("enc", "dec"):
        assert len(ref[part]) == len(other[part]) > 0
        for i, (a, b) in enumerate(zip(ref[part], other[part])):
            assert a.shape == b.shape and torch.isfinite(b).all(), (part, i)
            out[f"{part}{i}"] = float((b - a).norm() / a.norm().clamp_min(1e-30))
    # The objectives relative to the rates they are made of: ΔR(Z, Ẑ) (the decoder's) is a
    # difference of rates of about R(Z) that nearly cancel while Ẑ ≈ Z (at initialisation 0.002
    # against R(Z) = 2.8 for csc_ctrl_128), so its own relative error says nothing.
    a, b = ref["terms"], other["terms"]
    scale = abs(a["R_Z"])
    for k in ("total", "decoder_total"):
        out[k] = abs(b[k] - a[k]) / max(abs(a[k]), scale)
    return out


def check(errors, code_tol, objective_tol):
    bad = {
        k: v
        for k, v in errors.items()
        if not math.isfinite(v) or v > (objective_tol if "total" in k else code_tol)
    }
    assert not bad, f"relative errors above tolerance: {bad} (all: {errors})"


@pytest.fixture
def exact_fp32():
    """fp32 references without TF32 (on by default in cuDNN convolutions)."""
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


GPU_MODELS = [("csc_ctrl_32", 32, 64), ("dcgan_ctrl_32", 32, 64), ("csc_ctrl_128", 128, 16)]


@pytest.mark.gpu
@pytest.mark.parametrize(("name", "size", "batch"), GPU_MODELS, ids=[m[0] for m in GPU_MODELS])
def test_bf16_autocast_on_cuda_agrees_with_fp32(name, size, batch, exact_fp32):
    f, g = build(name, 3, size, "cuda")
    x = images(batch, 3, size, "cuda")
    ref = forward_record(f, g, x)
    bf16 = forward_record(f, g, x, torch.autocast("cuda", dtype=torch.bfloat16))
    # bf16 keeps 8 bits of mantissa (relative rounding 2^-9 ≈ 2e-3 per operation)
    check(relative_errors(ref, bf16), code_tol=5e-2, objective_tol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize(("name", "size", "batch"), GPU_MODELS, ids=[m[0] for m in GPU_MODELS])
def test_channels_last_on_cuda_agrees_with_fp32(name, size, batch, exact_fp32):
    f, g = build(name, 3, size, "cuda")
    x = images(batch, 3, size, "cuda")
    ref = forward_record(f, g, x)
    check(relative_errors(ref, forward_record(f, g, x, channels_last=True)), 1e-4, 1e-4)
    bf16_cl = forward_record(
        f, g, x, torch.autocast("cuda", dtype=torch.bfloat16), channels_last=True
    )
    check(relative_errors(ref, bf16_cl), code_tol=5e-2, objective_tol=2e-2)


@pytest.mark.gpu
def test_training_step_on_cuda_with_bf16_and_channels_last():
    """One CTRL round on CUDA through Game with bf16 autocast and channels_last: finite, and the
    objective of the round within bf16 error of the fp32 round's."""
    from ctrl_csc.engine import CTRLStep, Game
    from ctrl_csc.engine.distributed import DistContext

    totals = {}
    for amp in (False, True):
        f, g = build("csc_ctrl_32", 3, 32, "cuda")
        f, g = f.to(memory_format=torch.channels_last), g.to(memory_format=torch.channels_last)
        opts = {
            k: torch.optim.Adam(m.parameters(), lr=1e-4)
            for k, m in (("encoder", f), ("decoder", g))
        }
        game = Game(f, g, opts, DistContext(device=torch.device("cuda")), amp=amp)
        x = images(32, 3, 32, "cuda").contiguous(memory_format=torch.channels_last)
        out = CTRLStep(CTRLObjective("samplewise", beta=10.0, distance="l2"))(game, x, None)
        totals[amp] = float(out["objective/total"])
        assert all(torch.isfinite(p).all() for p in [*f.parameters(), *g.parameters()])
    assert abs(totals[True] - totals[False]) <= 2e-2 * abs(totals[False]), totals


def _cpu_bf16_autocast_works() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = F.conv2d(torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3))
        return y.dtype == torch.bfloat16
    except RuntimeError:
        return False


CPU_MODELS = ["csc_ctrl_mini", "dcgan_ctrl_mini"]


@pytest.mark.skipif(not _cpu_bf16_autocast_works(), reason="no bf16 autocast on this CPU")
@pytest.mark.parametrize("name", CPU_MODELS)
def test_bf16_autocast_on_cpu_agrees_with_fp32(name):
    f, g = build(name, 3, 32, "cpu")
    x = images(16, 3, 32, "cpu")
    ref = forward_record(f, g, x)
    bf16 = forward_record(f, g, x, torch.autocast("cpu", dtype=torch.bfloat16))
    check(relative_errors(ref, bf16), code_tol=5e-2, objective_tol=2e-2)
    # and not vacuously: the bf16 codes are not the fp32 ones
    assert any(v > 0 for v in relative_errors(ref, bf16).values())


@pytest.mark.parametrize("name", CPU_MODELS)
def test_channels_last_on_cpu_agrees_with_fp32(name):
    f, g = build(name, 3, 32, "cpu")
    x = images(16, 3, 32, "cpu")
    ref = forward_record(f, g, x)
    check(relative_errors(ref, forward_record(f, g, x, channels_last=True)), 1e-4, 1e-4)


def test_bench_gpu_smoke_runs_and_reports(tmp_path):
    """``bench/bench_gpu.py --smoke``: a measurement per model and variant it can run here, the
    GPU-only ones skipped with a reason, the loader at 128 px, a CSC/baseline summary."""
    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "bench" / "bench_gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--smoke", "--device", "cpu", "--threads", "1", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    records = json.loads(out.read_text())
    assert records[0]["kind"] == "header" and records[0]["smoke"]
    train = [r for r in records if r["kind"] == "train"]
    measured = [r for r in train if "images_per_s" in r]
    skipped = [r for r in train if "skipped" in r]
    assert not [r for r in records if "error" in r]
    assert {r["model"] for r in measured} == {"csc_ctrl_mini", "dcgan_ctrl_mini"}
    assert {(r["precision"], r["channels_last"]) for r in measured} >= {
        ("fp32", False),
        ("fp32", True),
    }
    for r in measured:
        assert r["images_per_s"] > 0 and math.isfinite(r["objective_total"])
        assert r["params"] > 0 and r["peak_mib"] is None and "CUDA" in r["peak_mib_skipped"]
    assert skipped and all(r["compile"] and "CUDA" in r["skipped"] for r in skipped)
    (loader,) = [r for r in records if r["kind"] == "loader"]
    assert loader["image_size"] == 128 and loader["images_per_s"] > 0
    rows = [r for r in records if r["kind"] == "summary"]
    assert rows and all(r["throughput_ratio"] > 0 for r in rows)


@pytest.mark.gpu
@pytest.mark.distributed
@pytest.mark.skipif(
    torch.cuda.device_count() < 2
    or not (torch.distributed.is_available() and torch.distributed.is_nccl_available()),
    reason="needs 2 CUDA devices and NCCL",
)
def test_ctrl_game_with_sync_batch_norm_on_two_gpus_is_the_one_gpu_game(tmp_path):
    """The 2-rank = 1-process check of test_distributed_state on 2 GPUs with NCCL, where the
    batch norms become torch's SyncBatchNorm."""
    from distributed_workers import check_game, game_worker, join_workers
    from torchrun_helpers import free_port

    join_workers(
        torch.multiprocessing.start_processes(
            game_worker,
            args=(free_port(), tmp_path, "nccl"),
            nprocs=2,
            join=False,
            start_method="spawn",
        )
    )
    for joint_batch in (False, True):
        check_game(tmp_path, joint_batch, torch.device("cuda", 0), "SyncBatchNorm")


@pytest.mark.gpu
def test_generation_on_cuda_is_the_cpu_generation(exact_fp32):
    """``generation_report`` with the models on CUDA: the same samples (fp32, no TF32, to
    rounding) and class-consistency measures as on the CPU (issue 23)."""
    import ctrl_csc
    from ctrl_csc.data import build_dataset
    from ctrl_csc.eval.generate import encode_loader, generation_report

    model, _ = ctrl_csc.load_pretrained("quickstart")
    train, test = build_dataset("mnist5k", "train"), build_dataset("mnist5k", "test")
    probe = torch.utils.data.DataLoader(train, batch_size=250)
    z, y = encode_loader(model.encoder, probe, "cpu")  # every class (the files are sorted)
    x_t = torch.stack([test[i][0] for i in range(0, 1000, 5)])
    y_t = torch.tensor([test[i][1] for i in range(0, 1000, 5)])
    reports = {}
    for device in ("cpu", "cuda"):
        m = copy.deepcopy(model).to(device)
        reports[device] = generation_report(m.encoder, m.decoder, z, y, x_t, y_t, device=device)
    cpu, cuda = reports["cpu"], reports["cuda"]
    torch.testing.assert_close(cuda.samples.cpu(), cpu.samples, rtol=0, atol=1e-3)
    for k, v in cpu.metrics.items():
        assert cuda.metrics[k] == pytest.approx(v, abs=0.02), k
