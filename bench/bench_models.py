"""Parameter count and CPU forward+backward time of every model config in ``conf/model``.

    python bench/bench_models.py                 # every config, batch 16, 1 thread
    python bench/bench_models.py --batch 64 --threads 2 csc_ctrl_32 dcgan_ctrl_32
    python bench/bench_models.py --headers       # the "# Parameters ..." header line of each

One JSON line per config. The timed step is one round trip of a batch at the resolution stated in
the config's header: ``z = f(x)``, ``x̂ = g(z)``, then ``backward`` of a scalar of both outputs
(train mode); ``fwd_bwd_s`` is the median of ``--repeats`` runs after one warm-up run. For each
``ctrl`` config, ``ratio_to_baseline`` is its time over the time of the baseline it names in its
header ("Baseline of the same size: ..."), measured in the same process, interleaved.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

import torch
from hydra.utils import instantiate

from ctrl_csc.cli.common import compose_model
from ctrl_csc.models import count_parameters

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
HEADER = re.compile(r"# Parameters \(at (\d+) px, (\d+) channels?\)")
BASELINE = re.compile(r"# Baseline of the same size: (\w+)")


def geometry(path: Path) -> tuple[int, int]:
    """``(channels, image_size)`` stated in the header, else 3 channels at the name's suffix."""
    text = path.read_text()
    m = HEADER.search(text)
    if m:
        return int(m.group(2)), int(m.group(1))
    m = re.search(r"_(\d+)$", path.stem)
    return 3, int(m.group(1)) if m else 32


def build(path: Path, channels: int, image_size: int):
    cfg = compose_model(path.stem, channels, image_size)
    return cfg, instantiate(cfg.encoder), instantiate(cfg.decoder)


def step(enc, dec, x: torch.Tensor) -> None:
    z = enc(x)
    xh = dec(z)
    (z.square().sum() + xh.mean()).backward()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*", help="config names (default: all)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--headers", action="store_true", help="print header lines, no timing")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    paths = sorted(CONF.glob("*.yaml"))
    if args.names:
        paths = [CONF / f"{n}.yaml" for n in args.names]
    models = {}
    for p in paths:
        c, s = geometry(p)
        cfg, enc, dec = build(p, c, s)
        ne, nd = count_parameters(enc), count_parameters(dec)
        models[p.stem] = (cfg, enc, dec, c, s, ne, nd)
        if args.headers:
            unit = "channel" if c == 1 else "channels"
            print(
                f"{p.stem}: # Parameters (at {s} px, {c} {unit}): {ne + nd:,} = encoder {ne:,} "
                f"+ decoder {nd:,}."
            )
    if args.headers:
        return
    times: dict[str, list[float]] = {n: [] for n in models}
    for r in range(args.repeats + 1):
        for name, (_, enc, dec, c, s, *_rest) in models.items():
            x = torch.rand(args.batch, c, s, s) * 2 - 1
            enc.zero_grad(set_to_none=True)
            dec.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            step(enc, dec, x)
            if r > 0:  # the first round is a warm-up
                times[name].append(time.perf_counter() - t0)
    med = {n: statistics.median(t) for n, t in times.items()}
    for name, (cfg, _, _, c, s, ne, nd) in models.items():
        row = {
            "config": name,
            "encoder": str(cfg.encoder._target_).rsplit(".", 1)[-1],
            "image": [c, s, s],
            "batch": args.batch,
            "threads": args.threads,
            "params": ne + nd,
            "params_encoder": ne,
            "params_decoder": nd,
            "fwd_bwd_s": round(med[name], 4),
        }
        m = BASELINE.search((CONF / f"{name}.yaml").read_text())
        if m and m.group(1) in med:
            row["baseline"] = m.group(1)
            row["ratio_to_baseline"] = round(med[name] / med[m.group(1)], 2)
        print(json.dumps(row))


if __name__ == "__main__":
    main()
