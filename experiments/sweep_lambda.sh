#!/usr/bin/env bash
# Sparsity / accuracy trade-off: λ (shared by all stages) × FISTA iterations on CIFAR-10.
# Extra arguments go to Hydra (e.g. hydra/launcher=slurm hydra.launcher.partition=gpu).
set -euo pipefail
ctrl-csc-train -m experiment=cifar10 model.lmbda=0.02,0.05,0.1,0.2 model.n_iter=2,5 \
  trainer.max_steps=20000 "$@"
