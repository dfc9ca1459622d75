"""Held-out PSNR against wall time of a run, from its ``metrics.jsonl``.

python experiments/psnr_vs_time.py outputs/quickstart/metrics.jsonl
"""

import json
import sys


def main(path: str) -> None:
    elapsed, table = {}, []
    for line in open(path):
        row = json.loads(line)
        if "time/elapsed_s" in row:
            elapsed[row["step"]] = row["time/elapsed_s"]
        if "psnr" in row:
            table.append(
                (row["step"], elapsed.get(row["step"]), row["psnr"], row.get("psnr_mean_image"))
            )
    print("| step | train time (s) | held-out PSNR (dB) | mean-image PSNR (dB) |")
    print("|---|---|---|---|")
    for step, t, p, base in table:
        t = "" if t is None else f"{t:.0f}"
        base = "" if base is None else f"{base:.2f}"
        print(f"| {step} | {t} | {p:.2f} | {base} |")


if __name__ == "__main__":
    main(sys.argv[1])
