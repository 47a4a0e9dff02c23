#!/usr/bin/env bash
# A small PatchCore seed study in five execution environments (the CPU; CUDA deterministic;
# CUDA with deterministic algorithms off; CUDA with TF32 matmuls; CUDA under bf16 autocast),
# then the check and the report: is each deterministic (same seed, same environment: bitwise?),
# and how far do the others move the scores, the ranking of images and the metrics? It also
# checks the harness's coreset sampler against anomalib's on CUDA. About 12 minutes on one
# GPU plus 2 CPU cores. Needs the harness installed (this repository's
# environment, or the infra/ image) and a visible CUDA device; no network, no Ray.
#   bash benchmarks/gpu_seed_study.sh [OUT]        # OUT: where data and results go (default gpu-study)
# It writes reports/gpu-seed-study.md and its plots; commit them with the records' summary.
set -euo pipefail
out=${1:-gpu-study}
results=$out/results
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible')"
harness data synth "$out/data" --categories disc,weave --n-train 48 --n-test 24 --size 128 --seed 0
# A fixed 'pretrained' backbone (random weights, seeded): the features are the seed's to share
# and the study needs no download.
python - "$out/resnet18.pth" <<'EOF'
import sys, torch, torchvision
torch.manual_seed(123)
torch.save(torchvision.models.resnet18(weights=None).state_dict(), sys.argv[1])
EOF
common=(--set data.image_size=128 --set name=gpu-seed-study --set model_args.pre_trained=true
        --set "model_args.weights=$out/resnet18.pth" --set deterministic=true --results "$results")
# DEVICE NAME SETTINGS: each environment's runs are their own (the run id includes it).
environments=(
  "cpu cpu {}"
  "cuda cuda {}"
  "cuda cuda-nondeterministic {deterministic: false}"
  "cuda cuda-tf32 {matmul_precision: high}"
  "cuda cuda-bf16 {autocast: bf16}"
)
for environment in "${environments[@]}"; do
  read -r device name settings <<<"$environment"
  for category in disc weave; do
    for seed in 0 1 2; do
      for repeat in 0 1; do
        harness run --model patchcore --data-root "$out/data" --category "$category" \
          --seed "$seed" --repeat "$repeat" --device "$device" "${common[@]}" \
          --set "environments.$name=$settings"
      done
    done
  done
done
# The harness's sampler against anomalib's on CUDA (on the CPU they agree index for index).
python - <<'EOF'
import numpy as np, torch
from anomalib.models.components import KCenterGreedy
from harness.coreset import anomalib_draws, greedy_coreset
for seed in range(3):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(12, 384, generator=g) * 4
    e = (centers[torch.randint(12, (25600,), generator=g)] + torch.randn(25600, 384, generator=g)).cuda()
    torch.manual_seed(seed); np.random.seed(seed)
    theirs = KCenterGreedy(embedding=e, sampling_ratio=0.1).select_coreset_idxs()
    torch.manual_seed(seed); np.random.seed(seed)
    ours = greedy_coreset(e, anomalib_draws(e, 0.1))
    print(f"cuda sampler seed {seed}: {np.mean(np.array(ours) == np.array(theirs)):.4f} of the indices agree")
EOF
harness check "$results" --json > "$out/check.json"
harness check "$results"
harness report "$results" --out reports/gpu-seed-study.md
