#!/usr/bin/env bash
# A small PatchCore seed study on CUDA and the same on the CPU, then the check and the report:
# is the GPU deterministic (same seed, same GPU: bitwise?), and how far do GPU and CPU agree?
# About 5 minutes on one GPU plus 2 CPU cores. Needs the harness installed (this repository's
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
for device in cuda cpu; do
  for category in disc weave; do
    for seed in 0 1 2; do
      for repeat in 0 1; do
        harness run --model patchcore --data-root "$out/data" --category "$category" \
          --seed "$seed" --repeat "$repeat" --device "$device" "${common[@]}"
      done
    done
  done
done
harness check "$results" --json > "$out/check.json"
harness check "$results"
harness report "$results" --out reports/gpu-seed-study.md
