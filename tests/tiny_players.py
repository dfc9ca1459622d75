"""Tiny players for the engine and evaluation tests (no Hydra), and the small trainer the engine,
checkpoint, preemption and non-finite tests share."""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from ctrl_csc.engine import CTRLStep, Trainer, build_loader
from ctrl_csc.losses import CTRLObjective


class TinyEncoder(nn.Module):
    """One stage: a 3x3 convolution (1 → 4 channels, ``stride``) whose code is
    ``relu(conv(x) − threshold)``, then a linear map to the unit sphere of ``d`` dimensions.
    ``codeless_stage`` reports a second stage whose output is not a code (``None``)."""

    def __init__(self, d=8, size=8, stride=1, threshold=0.0, codeless_stage=False):
        super().__init__()
        side = -(-size // stride)
        self.conv = nn.Conv2d(1, 4, 3, stride=stride, padding=1)
        self.fc = nn.Linear(4 * side * side, d)
        self.threshold, self.codeless_stage = threshold, codeless_stage

    def forward_with_codes(self, x):
        code = F.relu(self.conv(x) - self.threshold)
        z = F.normalize(self.fc(code.flatten(1)), dim=1)
        return z, [code, None] if self.codeless_stage else [code]

    def forward(self, x):
        return self.forward_with_codes(x)[0]


class TinyDecoder(nn.Module):
    """A linear map from ``d`` features to a ``size × size`` grey image, through tanh."""

    def __init__(self, d=8, size=8):
        super().__init__()
        self.size = size
        self.fc = nn.Linear(d, size * size)

    def forward(self, z):
        return torch.tanh(self.fc(z)).view(-1, 1, self.size, self.size)


class CodedTinyDecoder(TinyDecoder):
    """:class:`TinyDecoder` that reports one code of 4 entries per sample, one non-zero (density
    0.25)."""

    def forward_with_codes(self, z):
        code = z.new_zeros(z.shape[0], 4)
        code[:, 0] = 1.0
        return self(z), [code]


def tiny_data(n=64, seed=0):
    """``n`` random 8x8 grey images in [-1, 1] with labels in {0, 1, 2}."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
    return TensorDataset(x, torch.randint(0, 3, (n,), generator=g))


def make_trainer(tmp_path, max_steps=6, step=None, **kw):
    """A :class:`Trainer` of the tiny players on :func:`tiny_data` (batches of 16, Adam with a
    linear decay, held-out batches of 8, a log row every step)."""
    torch.manual_seed(0)
    f, g = TinyEncoder(), TinyDecoder()
    opts = {
        "encoder": torch.optim.Adam(f.parameters(), lr=1e-2, betas=(0.5, 0.999)),
        "decoder": torch.optim.Adam(g.parameters(), lr=1e-2, betas=(0.5, 0.999)),
    }
    scheds = {
        k: torch.optim.lr_scheduler.LinearLR(o, 1.0, 0.0, total_iters=max_steps)
        for k, o in opts.items()
    }
    step = step or CTRLStep(CTRLObjective("samplewise"), noise_std=0.05)
    return Trainer(
        f,
        g,
        step,
        opts,
        build_loader(tiny_data(), 16, seed=1),
        schedulers=scheds,
        eval_loader=torch.utils.data.DataLoader(tiny_data(16, 1), batch_size=8),
        output_dir=tmp_path,
        max_steps=max_steps,
        log_every=1,
        progress=False,
        **kw,
    )


def assert_same_weights(a, b):
    """The two trainers' encoders and decoders hold equal tensors, bit for bit."""
    for part in ("encoder", "decoder"):
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (part, k)


# 64 samples in batches of 16: 4 steps an epoch. Stopping at step 6 is mid-way through the
# second epoch and the run goes on into the third; periodic evaluation and checkpoints on, and
# k = 2 encoder updates a step (with input noise: the random stream must be restored too).
RESUME_RUN = {
    "max_steps": 10,
    "baseline_images": 32,
    "eval_every": 2,
    "checkpoint_every": 3,
}


def resumable_trainer(path):
    """:func:`make_trainer` for the resume tests (:data:`RESUME_RUN`)."""
    step = CTRLStep(CTRLObjective("samplewise"), encoder_steps=2, noise_std=0.05)
    return make_trainer(path, step=step, **RESUME_RUN)
