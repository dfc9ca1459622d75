"""Benchmark: batched CTRL objectives vs a straightforward class loop (CPU by default).

Prints one JSON line per case. The reference, written below, is what the original CTRL code does:
a Python loop over classes, each rate a ``torch.logdet`` of a ``d×d`` matrix. Both run in this
process, interleaved (fast, reference, fast, ...), and each time is the median over ``--repeats``
samples (a sample averages enough calls to last ``--min-sample-s``). Times are for float32
features ``Z, Ẑ`` of unit rows; "fwd_bwd" is forward plus ``backward`` of the total, "fwd" a
forward under ``torch.no_grad``. Values are compared with the reference evaluated in float64:
``max_rel_diff_float64`` for float64 features, ``max_rel_diff_float32`` for float32 features (the
maximum over the total and the named terms both report).

    python bench/bench_rate.py [--threads 1] [--repeats 7] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from ctrl_csc.losses import CTRLObjective

EPS_SQ = 0.5


# ----------------------------------------------------------------------------- reference


def ref_rate(Z: torch.Tensor, eps_sq: float = EPS_SQ) -> torch.Tensor:
    """R(Z) = ½ logdet(I_d + d/(n ε²) ZᵀZ), always d×d."""
    n, d = Z.shape
    eye = torch.eye(d, dtype=Z.dtype, device=Z.device)
    return 0.5 * torch.logdet(eye + d / (n * eps_sq) * Z.T @ Z)


def ref_binary(Z, Zh, labels=None, num_classes=None):
    r_z, r_zh, r_u = ref_rate(Z), ref_rate(Zh), ref_rate(torch.cat([Z, Zh]))
    dr = r_u - 0.5 * r_z - 0.5 * r_zh
    return {"total": dr, "R_Z": r_z, "R_Zh": r_zh, "R_Z_union_Zh": r_u, "delta_R_Z_Zh": dr}


def ref_multiclass(Z, Zh, labels, num_classes):
    n = Z.shape[0]
    r_z, r_zh = ref_rate(Z), ref_rate(Zh)
    rc_z = rc_zh = classwise = 0.0
    for j in range(num_classes):
        mask = labels == j
        nj = int(mask.sum())
        if nj == 0:
            continue
        Zj, Zhj = Z[mask], Zh[mask]
        a, b = ref_rate(Zj), ref_rate(Zhj)
        rc_z = rc_z + nj / n * a
        rc_zh = rc_zh + nj / n * b
        classwise = classwise + ref_rate(torch.cat([Zj, Zhj])) - 0.5 * a - 0.5 * b
    total = (r_z - rc_z) + (r_zh - rc_zh) + classwise
    return {
        "total": total,
        "R_Z": r_z,
        "R_Zh": r_zh,
        "Rc_Z": rc_z,
        "Rc_Zh": rc_zh,
        "delta_R_classwise": classwise,
    }


REFERENCES = {"binary": ref_binary, "multiclass": ref_multiclass}

CASES = [
    {"variant": "binary", "n": 300, "d": 128, "K": None},  # Z and Ẑ of 300 rows each
    {"variant": "multiclass", "n": 1600, "d": 128, "K": 10},
    {"variant": "multiclass", "n": 600, "d": 128, "K": 1000},
]


# ----------------------------------------------------------------------------- timing


def _inputs(case, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, d, K = case["n"], case["d"], case["K"]
    Z = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    Zh = F.normalize(Z + 0.7 * torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, K, (n,), generator=g) if K else None
    to = {"dtype": dtype, "device": device}
    return Z.to(**to), Zh.to(**to), (labels.to(device) if labels is not None else None)


def _runner(fn, Z, Zh, labels, backward: bool):
    if backward:
        Zg, Zhg = Z.clone().requires_grad_(), Zh.clone().requires_grad_()

        def run():
            Zg.grad = Zhg.grad = None
            fn(Zg, Zhg, labels).backward()

    else:

        def run():
            with torch.no_grad():
                fn(Z, Zh, labels)

    return run


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _calibrate(run, device, min_s):
    run()
    _sync(device)
    t0 = time.perf_counter()
    run()
    _sync(device)
    one = max(time.perf_counter() - t0, 1e-6)
    return max(1, int(min_s / one))


def _sample(run, calls, device):
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        run()
    _sync(device)
    return (time.perf_counter() - t0) / calls


def _time_pair(fast, ref, repeats, min_s, device):
    """Interleaved medians (seconds per call) of two runners."""
    cf, cr = _calibrate(fast, device, min_s), _calibrate(ref, device, min_s)
    tf, tr = [], []
    for _ in range(repeats):
        tf.append(_sample(fast, cf, device))
        tr.append(_sample(ref, cr, device))
    return statistics.median(tf), statistics.median(tr)


def _max_rel_diff(case, dtype, device):
    Z, Zh, labels = _inputs(case, dtype, device)
    obj = CTRLObjective(case["variant"], eps_sq=EPS_SQ, num_classes=case["K"], gather=False)
    with torch.no_grad():
        fast = obj(Z, Zh, labels)
        Z64, Zh64 = Z.double(), Zh.double()
        ref = REFERENCES[case["variant"]](Z64, Zh64, labels, case["K"])
    got = {"total": fast.total, **fast.terms}
    rel = [abs(float(got[k]) - float(v)) / max(abs(float(v)), 1e-12) for k, v in ref.items()]
    return max(rel)


def run_case(case, args, device):
    Z, Zh, labels = _inputs(case, torch.float32, device)
    obj = CTRLObjective(case["variant"], eps_sq=EPS_SQ, num_classes=case["K"], gather=False)
    reference = REFERENCES[case["variant"]]

    def fast(Z, Zh, labels):
        return obj(Z, Zh, labels).total

    def ref(Z, Zh, labels):
        return reference(Z, Zh, labels, case["K"])["total"]

    out = {
        "case": f"{case['variant']}"
        + (f"_K{case['K']}" if case["K"] else "")
        + f"_n{case['n']}_d{case['d']}",
        **case,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "dtype": "float32",
    }
    for label, backward in (("fwd_bwd", True), ("fwd", False)):
        tf, tr = _time_pair(
            _runner(fast, Z, Zh, labels, backward),
            _runner(ref, Z, Zh, labels, backward),
            args.repeats,
            args.min_sample_s,
            device,
        )
        out[f"{label}_ms_fast"] = round(tf * 1e3, 3)
        out[f"{label}_ms_ref"] = round(tr * 1e3, 3)
        out[f"{label}_speedup"] = round(tr / tf, 2)
    out["max_rel_diff_float64"] = float(f"{_max_rel_diff(case, torch.float64, device):.3e}")
    out["max_rel_diff_float32"] = float(f"{_max_rel_diff(case, torch.float32, device):.3e}")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (fixed)")
    p.add_argument("--repeats", type=int, default=7, help="samples per method (median taken)")
    p.add_argument("--min-sample-s", type=float, default=0.05, help="minimum length of a sample")
    p.add_argument("--device", default="cpu")
    p.add_argument("--case", default=None, help="run only cases whose name contains this")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    for case in CASES:
        name = f"{case['variant']}_K{case['K']}_n{case['n']}"
        if args.case and args.case not in name:
            continue
        print(json.dumps(run_case(case, args, device)), flush=True)


if __name__ == "__main__":
    main()
