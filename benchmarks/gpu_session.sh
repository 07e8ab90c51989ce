#!/usr/bin/env bash
# The GPU measurements, one part per call of at most ten minutes, for a lent GPU machine
# whose image has torch, timm and triton but not fastdeit (and not DALI: see `loader`).
#
#   bash benchmarks/gpu_session.sh tests       # pytest -m gpu: bf16 Triton kernel, DALI GPU graph, flex backward
#   bash benchmarks/gpu_session.sh attention   # Triton vs SDPA's kernels, forward + backward, DeiT-Ti/S/B shapes
#   bash benchmarks/gpu_session.sh model       # DeiT-Ti/S/B distilled, eager vs compiled, sdpa vs triton
#   bash benchmarks/gpu_session.sh distill     # none / live / replay / labelmap at 224 px
#   bash benchmarks/gpu_session.sh loader      # DALI GPU (ROI and full decoding) vs the official pipeline
#
# Results go to $OUT (the device tool brings them back) or benchmarks/results/; each JSON
# names the device, the versions and the date.
set -euo pipefail
part=${1:?"which part: tests | attention | model | distill | loader"}
out=${OUT:-benchmarks/results}
mkdir -p "$out"
gpu=$(python -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-').lower())")
# fastdeit.kernels and fastdeit.pipelines are mapped by setuptools' package-dir: install, no deps.
python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv | tee "$out/gpu-$part.txt"

case "$part" in
  tests)
    python -m pytest -q -m gpu tests 2>&1 | tee "$out/pytest-gpu.txt" | tail -20 ;;
  attention)
    python benchmarks/throughput.py --section attention --device cuda --steps 25 \
      --out "$out/throughput-attention-$gpu.json" ;;
  model)
    python benchmarks/throughput.py --device cuda --img-size 224 --batch-sizes 256 \
      --models deit_tiny_distilled,deit_small_distilled,deit_base_distilled \
      --attn sdpa,triton --compile none,auto --steps 20 --warmup 5 --repeats 3 \
      --out "$out/throughput-model-$gpu.json" ;;
  distill)
    python benchmarks/throughput.py --section distill --device cuda --student deit_small_distilled \
      --teacher regnety_160 --img-size 224 --batch-size 256 --steps 10 --warmup 3 --repeats 3 \
      --out "$out/throughput-distill-$gpu.json" ;;
  loader)
    if ! python -c "import nvidia.dali" 2>/dev/null; then
      echo "DALI is not installed here: bring it with ../shared/tools/stage-gpu-wheels (see .gpuwheels/HOWTO)"
      exit 2
    fi
    python benchmarks/loader.py --make-data 2000 --device cuda --workers 16 --batch-size 256 --img-size 224 \
      --steps 30 --warmup 5 --repeats 3 --out "$out/loader-$gpu.json" ;;
  *)
    echo "unknown part $part: tests | attention | model | distill | loader"; exit 2 ;;
esac
