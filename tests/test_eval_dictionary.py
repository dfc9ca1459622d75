"""Dictionary metrics: how far each CSC stage's dictionary moved from its initialisation and how
well its sparse code explains its input — against hand computations and dense float64 solvers —,
the re-created initial models against those a training run started from, and ctrl-csc-eval."""

import copy
import json
import logging
import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader, TensorDataset

from ctrl_csc.cli import evaluate as eval_cli
from ctrl_csc.cli import train as train_cli
from ctrl_csc.cli.common import config_dir
from ctrl_csc.engine import load_checkpoint
from ctrl_csc.eval import (
    csc_stages,
    dictionary_moved,
    dictionary_report,
    evaluate_reconstructions,
    plot_dictionary,
)
from ctrl_csc.models import CSCEncoder, DCGANEncoder
from ctrl_csc.nn.solver import UnrolledLasso

C, S = 2, 9  # image channels and side of the small models


def compose_cfg(name, overrides):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(name, overrides=list(overrides))


def small_encoder(seed=0):
    """Two CSC stages, absolute λ: signed FISTA (stride 2) then non-negative ISTA, a ReLU between
    them."""
    torch.manual_seed(seed)
    return CSCEncoder(
        in_channels=C,
        image_size=S,
        stages=[
            {"out_channels": 4, "kernel_size": 3, "stride": 2, "lmbda": 0.05, "n_iter": 3,
             "algorithm": "fista", "nonnegative": False, "activation": "relu",
             "lmbda_relative": False},
            {"out_channels": 5, "kernel_size": 3, "stride": 1, "lmbda": 0.02, "n_iter": 4,
             "algorithm": "ista", "nonnegative": True, "lmbda_relative": False},
        ],
        feature_dim=6,
        norm="none",
    ).eval()  # fmt: skip


def perturbed(encoder, scale=0.3, seed=1):
    """A copy whose dictionaries moved (the 'learned' model)."""
    out = copy.deepcopy(encoder)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in csc_stages(out):
            layer.weight.add_(scale * torch.randn(layer.weight.shape, generator=g))
    return out


def images(n=10, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, C, S, S, generator=g) * 2 - 1


# ------------------------------------------------------------------ dense float64 references
def unit_atoms(w):
    w = w.detach().double()
    return w / w.flatten(1).norm(dim=1).view(-1, 1, 1, 1)


def dense_synthesis(atoms, stride, padding, size):
    """``D`` as a ``(C_in·H·W, C_out·h·w)`` matrix: atom ``j`` placed at ``(a·s − p, b·s − p)``
    for code position ``(j, a, b)`` (cropped to the signal)."""
    c_out, c_in, k, _ = atoms.shape
    h = (size + 2 * padding - k) // stride + 1
    m = torch.zeros(c_in, size, size, c_out, h, h, dtype=torch.float64)
    for j in range(c_out):
        for a in range(h):
            for b in range(h):
                for u in range(k):
                    for v in range(k):
                        y, x = a * stride - padding + u, b * stride - padding + v
                        if 0 <= y < size and 0 <= x < size:
                            m[:, y, x, j, a, b] += atoms[j, :, u, v]
    return m.reshape(c_in * size * size, c_out * h * h)


def dense_code(m, u, lmbda, n_iter, algorithm, nonnegative):
    """DESIGN §2's ISTA/FISTA from ``z₀ = 0`` with ``η = 1/((1 + δ)‖DᵀD‖₂)`` (exact ``‖DᵀD‖₂``,
    the solver's safety margin ``δ``), columns of ``u``."""
    margin = 1.0 + UnrolledLasso.STEP_MARGIN
    eta = 1.0 / (margin * torch.linalg.eigvalsh(m.T @ m).max())

    def prox(v):
        return (
            (v - eta * lmbda).clamp_min(0)
            if nonnegative
            else v.sign() * (v.abs() - eta * lmbda).clamp_min(0)
        )

    z = z_prev = torch.zeros(m.shape[1], u.shape[1], dtype=torch.float64)
    tau_prev = 1.0
    for t in range(n_iter):
        y = z
        if algorithm == "fista" and t > 0:
            tau = (1 + math.sqrt(1 + 4 * tau_prev**2)) / 2
            y = z + (tau_prev - 1) / tau * (z - z_prev)
            tau_prev = tau
        z_prev, z = z, prox(y - eta * m.T @ (m @ y - u))
    return z


def dense_residuals(encoder, initial, x):
    """Per CSC stage ``(residual, residual_init)`` = ``sqrt(Σ‖u − Dz‖² / Σ‖u‖²)`` over ``x``,
    with ``u`` the stage's input in ``encoder`` (image, then ``relu(z_0)``) and ``z`` dense
    float64 codes of ``u`` with the learned / initial unit-norm atoms."""
    with torch.no_grad():
        codes = encoder.stage_outputs(x)
    inputs = [x, torch.relu(codes[0])]
    out = []
    for (i, layer), (_, layer0), u in zip(csc_stages(encoder), csc_stages(initial), inputs):
        spec = encoder.specs[i]
        uu = u.double().flatten(1).T  # (C_in·H·W, N)
        res = []
        for w in (layer.weight, layer0.weight):
            m = dense_synthesis(unit_atoms(w), spec.stride, layer.padding, u.shape[-1])
            z = dense_code(m, uu, spec.lmbda, spec.n_iter, spec.algorithm, spec.nonnegative)
            res.append(float(((uu - m @ z).norm() ** 2 / (uu.norm() ** 2)).sqrt()))
        out.append(tuple(res))
    return out


# ------------------------------------------------------------------ moved
def test_moved_is_zero_for_the_same_atoms_at_any_scale():
    w0 = torch.randn(6, 2, 3, 3, dtype=torch.float64)
    assert dictionary_moved(w0, w0) == 0.0
    # positive per-atom scales: the same unit atoms
    scales = torch.rand(6, 1, 1, 1, dtype=torch.float64) * 5 + 0.1
    assert dictionary_moved(w0 * scales, w0) == pytest.approx(0.0, abs=1e-12)


def test_moved_equals_the_hand_computed_value():
    w0 = torch.randn(8, 1, 4, 4)
    w = w0.clone()
    w[0] = -3 * w0[0]  # atom 0 flipped: its unit atom moves by 2 (‖−â − â‖), the others stay
    w[1] = w0[2]  # atom 1 becomes atom 2: moves by ‖â₂ − â₁‖
    a0 = unit_atoms(w0)
    d1 = float((a0[2] - a0[1]).norm())
    want = math.sqrt(4 + d1**2) / math.sqrt(8)  # ‖Â₀‖_F² = 8 unit atoms
    assert dictionary_moved(w, w0) == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="shapes differ"):
        dictionary_moved(w, w0[:4])


# ------------------------------------------------------------------ residuals
def test_residuals_match_dense_float64_codes():
    initial = small_encoder()
    learned = perturbed(initial)
    x = images(10)
    loader = DataLoader(TensorDataset(x), batch_size=4)  # three batches: ratio of sums over all
    got = dictionary_report(learned, initial, loader)
    want = dense_residuals(learned, initial, x)
    assert set(got) == {
        f"dictionary/enc{i}/{k}" for i in (0, 1) for k in ("moved", "residual", "residual_init")
    }
    for i, (res, res0) in enumerate(want):
        # rel 2e-3: the layers step with a power-iteration estimate of ‖DᵀD‖₂ (slightly low),
        # the reference with the exact eigenvalue
        assert got[f"dictionary/enc{i}/residual"] == pytest.approx(res, rel=2e-3)
        assert got[f"dictionary/enc{i}/residual_init"] == pytest.approx(res0, rel=2e-3)
        w, w0 = learned.stages[i].weight, initial.stages[i].weight
        assert got[f"dictionary/enc{i}/moved"] == pytest.approx(dictionary_moved(w, w0))
        assert 0 < got[f"dictionary/enc{i}/moved"]
    # the learned and initial dictionaries differ, so do their residuals
    assert got["dictionary/enc0/residual"] != pytest.approx(got["dictionary/enc0/residual_init"])


def test_the_initial_model_against_itself_moved_zero_and_equal_residuals():
    initial = small_encoder()
    got = dictionary_report(copy.deepcopy(initial), initial, [images(6)])
    for i in (0, 1):
        assert got[f"dictionary/enc{i}/moved"] == 0.0
        assert got[f"dictionary/enc{i}/residual"] == pytest.approx(
            got[f"dictionary/enc{i}/residual_init"], rel=1e-5
        )
        assert 0 < got[f"dictionary/enc{i}/residual"] < 1


def test_without_an_initial_model_only_the_residual_and_the_model_is_left_as_it_was():
    enc = small_encoder().train()
    got = dictionary_report(enc, None, [(images(4), torch.zeros(4))], num_images=3)
    assert set(got) == {"dictionary/enc0/residual", "dictionary/enc1/residual"}
    assert enc.training
    assert all(not layer._forward_hooks for _, layer in csc_stages(enc))


def test_runner_pass_gives_the_report_values():
    initial = small_encoder()
    learned = perturbed(initial)
    x = images(10)
    decoder = torch.nn.Sequential(
        torch.nn.Linear(6, C * S * S), torch.nn.Tanh(), torch.nn.Unflatten(1, (C, S, S))
    )
    loader = DataLoader(TensorDataset(x, torch.arange(10) % 2), batch_size=4)
    res = evaluate_reconstructions(
        learned, decoder, loader, metrics=["psnr", "dictionary"], initial_encoder=initial
    )
    want = dictionary_report(learned, initial, loader)
    for k, v in want.items():
        assert res.metrics[k] == pytest.approx(v, rel=1e-6)
    assert list(res.metrics)[-1] == "num_images"
    assert all(not layer._forward_hooks for _, layer in csc_stages(learned))


def test_models_without_csc_stages_get_no_dictionary_metrics():
    enc = DCGANEncoder(in_channels=1, image_size=32, feature_dim=8, base_channels=4).eval()
    assert csc_stages(enc) == [] and dictionary_report(enc, None, [torch.zeros(2, 1, 32, 32)]) == {}


def test_an_initial_encoder_of_another_architecture_is_refused():
    other = CSCEncoder(C, S, [{"out_channels": 3, "kernel_size": 3}], feature_dim=6, norm="none")
    with pytest.raises(ValueError, match="initial encoder does not match"):
        dictionary_report(small_encoder(), other, [images(2)])


def test_plot_dictionary_with_the_initial_atoms(tmp_path):
    initial = small_encoder()
    out = plot_dictionary(perturbed(initial), tmp_path / "d.png", initial_encoder=initial)
    assert out.stat().st_size > 1000


# ------------------------------------------------------------------ initial models of a run
@pytest.fixture(scope="module")
def one_step_run(tmp_path_factory):
    """A one-step quickstart run: its checkpoint and the encoder/decoder weights the trainer
    started from (recorded when ``fit`` begins, after everything train.run does)."""
    out = tmp_path_factory.mktemp("run")
    started = {}

    class Recording(train_cli.Trainer):
        def fit(self, resume=None, resume_state=None):
            started["encoder"] = copy.deepcopy(self.encoder.state_dict())
            started["decoder"] = copy.deepcopy(self.decoder.state_dict())
            return super().fit(resume, resume_state)

    mp = pytest.MonkeyPatch()
    mp.setattr(train_cli, "Trainer", Recording)
    try:
        train_cli.run(compose_cfg("train", ["trainer=smoke", "trainer.max_steps=1"]), out)
    finally:
        mp.undo()
    return out / "checkpoints" / "last.pt", started


def test_recreated_initial_models_are_those_the_run_started_from(one_step_run):
    ckpt, started = one_step_run
    config = load_checkpoint(ckpt)["config"]
    rng = torch.get_rng_state()
    encoder, decoder = eval_cli.initial_models(config)
    assert torch.equal(torch.get_rng_state(), rng)  # the global random state is left alone
    for part, module in (("encoder", encoder), ("decoder", decoder)):
        state = module.state_dict()
        assert state.keys() == started[part].keys()
        for k, v in started[part].items():
            assert torch.equal(state[k], v), f"{part}.{k}"
    trained = load_checkpoint(ckpt)["models"]["encoder"]["stages.0.weight"]
    assert not torch.equal(trained, encoder.stages[0].weight)  # the step did change it


def test_initial_models_need_the_run_seed(caplog):
    config = {"model": {"name": "x"}}
    with caplog.at_level(logging.WARNING, logger="ctrl_csc"):
        assert eval_cli.initial_models(config) is None
    assert "seed" in caplog.text


def test_eval_cli_writes_the_dictionary_metrics(one_step_run, tmp_path):
    ckpt, _ = one_step_run
    cfg = compose_cfg(
        "eval",
        [f"checkpoint={ckpt}", "eval.num_images=16", "eval.batch_size=8",
         "eval.metrics=[psnr,dictionary]"],
    )  # fmt: skip
    metrics = eval_cli.run(cfg, tmp_path)
    saved = json.loads((tmp_path / "eval.json").read_text())
    for k in ("moved", "residual", "residual_init"):
        key = f"dictionary/enc0/{k}"
        assert math.isfinite(saved[key]) and saved[key] >= 0
        assert saved[key] == pytest.approx(metrics[key])
    # one step at the quickstart's encoder lr: a small move (an unrelated init would give ~√2)
    assert 0 < saved["dictionary/enc0/moved"] < 0.1
    assert saved["dictionary/enc0/residual"] < 1
    assert (tmp_path / "dictionary.png").stat().st_size > 1000
