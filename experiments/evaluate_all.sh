#!/usr/bin/env bash
# FID / IS / PSNR / SSIM of every trained CSC-CTRL and baseline run on 50k reconstructions.
#   bash experiments/evaluate_all.sh INCEPTION_WEIGHTS [OUTPUTS_DIR]
set -euo pipefail
weights=${1:?path of pt_inception-2015-12-05-6726825d.pth}
outputs=${2:-outputs}
for run in "$outputs"/*/; do
  ckpt=$(ls -t "$run"*/checkpoints/last.pt 2>/dev/null | head -n 1) || true
  [ -n "$ckpt" ] || continue
  ctrl-csc-eval checkpoint="$ckpt" eval.num_images=50000 eval.inception_weights="$weights" \
    "eval.metrics=[fid,is,psnr,ssim,density,nearest_subspace,linear_probe]" \
    hydra.run.dir="$(dirname "$(dirname "$ckpt")")/eval"
done
