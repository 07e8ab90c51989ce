#!/usr/bin/env bash
# The GPU measurements, one part per call of at most ten minutes, for a lent GPU machine whose
# image has torch, timm and triton but not fastdeit (nor DALI: see below). GPU time is scarce:
# fifteen minutes a session, the machine's start (1-2 min) and every idle second included. DALI
# arrives in three carried parts, so the first two calls only carry (seconds each) and the
# product, end to end, is the first measurement. A warm machine goes back after 30 s idle,
# taking /tmp/gw with it: make the calls of a window back to back. Each call's timeout_s is its
# budget (a part cut there keeps what it measured: every JSON is rewritten after each variant,
# phase or round). Window 1's budgets, with 90 s for the start, fit its 900 s (the tests check
# this table); the calls of window 2 wait for the next session, in their order:
#
#   call  part         window  timeout_s  what
#   1.    carry        1       60         carries .gpuwheels/x0; device and versions
#   2.    carry        1       60         carries .gpuwheels/x1
#   3.    e2e          1       360        carries x2 (DALI unpacked): JPEGs -> prepare-data -> cache-teacher ->
#                                         fastdeit train --gpus 1 (DALI, spawned readers, compiled) vs the step alone
#   4.    tests        1       180        pytest -m "gpu and not slow": DALI GPU graphs and evaluation, readers
#                                         spawned after CUDA, no host sync in the step, one wait per cached
#                                         batch, Triton backward under Inductor, compiled drop path
#   5.    loader       1       150        DALI (ROI, full, hardware share, inline reads) vs the official pipeline,
#                                         source JPEGs and prepared 512/256; 25,600 generated JPEGs (~20 s on
#                                         16 cores: 2,000 took 23 s on 2 here); round 1 of every loader is kept
#   6.    candidates   2       270        the batch tail's cost (erasing) + step candidates vs today's compiled
#                                         step + profile (--budget-s 220)
#   7.    tests-slow   2       360        pytest -m "gpu and slow": max-autotune-no-cudagraphs (over 5 min for
#                                         DeiT-S on the H200; a 4-block DeiT-Ti here), FlexAttention's compile
#   8.    step-triton  2       180        DeiT-S/B with --attn triton, eager and compiled
#   9.    carry        3       60         a fresh machine: carries .gpuwheels/x0 again
#   10.   carry        3       60         carries .gpuwheels/x1
#   11.   loader-deit3 3       120        carries x2: DeiT III's 3-Augment, DALI and the reference vs the official
#                                         augment.py transform, source JPEGs
#   12.   step-deit3   3       150        DeiT III's ViT-B compiled at 192 and 224 px: its lower-resolution
#                                         pre-training measured (performance.md projects it from FLOPs)
#
# Calls 4-8 and 12 carry nothing but the repo: DALI stays unpacked in /tmp/site while the machine
# is held. A machine that went back between calls takes DALI with it: start the window again with
# its carries (window 2 needs DALI for no call; window 3 carries it again, calls 9-11).
#
# Parts measured before (results in benchmarks/results/*nvidia-h200*, H200 of 2026-11-30):
#   step-s ~1 min, step-b ~1.5 min, step-ti ~1 min, attention ~1 min, distill ~1.5 min.
#
# DALI: run benchmarks/stage_dali.sh here first; calls 1-3 each carry one of .gpuwheels/x0..x2
# (mkdir -p /tmp/gw && cp .gpuwheels/xN/* /tmp/gw/ before this script); this script unpacks
# DALI once the three parts are in /tmp/gw. Call 3, for instance, carrying .gpuwheels/x2:
#   mkdir -p /tmp/gw && cp .gpuwheels/x2/* /tmp/gw/ && bash benchmarks/gpu_session.sh e2e
#
#   bash benchmarks/gpu_session.sh --dry all   # every part at toy size on the CPU, nothing installed (the tests run it)
#   bash benchmarks/gpu_session.sh --dry e2e   # one part at toy size
#
# Results go to $OUT (the device tool brings them back) or benchmarks/results/. Each JSON names
# the device, the versions, the date and the commit, and is written again after every variant
# or phase, so a part cut short keeps what it measured.
set -euo pipefail
dry=0
if [ "${1:-}" = "--dry" ]; then dry=1; shift; fi
part=${1:?"which part: carry | e2e | tests | loader | candidates | tests-slow | step-triton | loader-deit3 | step-deit3 | step-s | step-b | step-ti | attention | distill | all (with --dry)"}
out=${OUT:-benchmarks/results}
mkdir -p "$out"
py=${PYTHON:-python}

if [ "$dry" = 1 ]; then
  dev=cpu; tag=dry; compiled=none
  export TRITON_INTERPRET=1  # the Triton kernel on the CPU
  model_args=(--device cpu --img-size 32 --patch-size 8 --depth 2 --batch-sizes 4 --steps 1 --warmup 1 --repeats 1)
else
  dev=cuda; compiled=none,auto
  tag=$($py -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-').lower())")
  model_args=(--device cuda --img-size 224 --batch-sizes 256 --steps 20 --warmup 5 --repeats 3)
  # fastdeit.kernels and fastdeit.pipelines are mapped by setuptools' package-dir: install, no deps.
  $py -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
  if [ -f /tmp/gw/gw.sha256 ] && [ ! -d /tmp/site/nvidia/dali ]; then  # DALI staged by stage_dali.sh
    if (cd /tmp/gw && cat gw.part.0 gw.part.1 gw.part.2 > gw.tar.xz && sha256sum -c --quiet gw.sha256); then
      mkdir -p /tmp/site && $py -c "import tarfile; tarfile.open('/tmp/gw/gw.tar.xz').extractall('/tmp/site')"
    else
      echo "the DALI parts in /tmp/gw are incomplete or corrupt: carry .gpuwheels/x0..x2, one per call"
    fi
  fi
  [ -d /tmp/site/nvidia/dali ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv | tee "$out/gpu-$part.txt"
fi
# Device, driver and versions first: a cut run still says what it ran on.
$py -c "import platform, torch, timm; print('python', platform.python_version(), 'torch', torch.__version__,
'cuda', torch.version.cuda, 'timm', timm.__version__,
'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')" | tee -a "$out/gpu-$part.txt"

step() {  # step NAME MODELS ATTN COMPILE
  $py benchmarks/throughput.py "${model_args[@]}" --models "$2" --attn "$3" --compile "$4" \
    --out "$out/throughput-$1-$tag.json"
}

run_part() {
  case "$1" in
    carry)  # a DALI part came with this call; the device and versions are printed above
      echo "DALI parts here: $(ls /tmp/gw 2>/dev/null | tr '\n' ' ')$([ -d /tmp/site/nvidia/dali ] && echo '(unpacked)')" ;;
    tests|tests-slow)
      marks="gpu and not slow"
      [ "$1" = tests-slow ] && marks="gpu and slow"
      if [ "$dry" = 1 ]; then  # collected (and skipped) on a CPU
        $py -m pytest -q -m "$marks" tests/test_pipeline_dali.py tests/test_step.py -p no:cacheprovider 2>&1 | tail -3
      else
        $py -m pytest -q -m "$marks" tests 2>&1 | tee "$out/pytest-$1.txt" | tail -20
      fi ;;
    step-s) step step-s deit_small_distilled sdpa "$compiled" ;;
    step-b) step step-b deit_base_distilled sdpa "$compiled" ;;
    step-ti) step step-ti deit_tiny_distilled sdpa "$compiled" ;;
    step-deit3)
      $py benchmarks/throughput.py "${model_args[@]}" --models "$([ "$dry" = 1 ] && echo deit3_small || echo deit3_base)" \
        --img-sizes "$([ "$dry" = 1 ] && echo 24,32 || echo 192,224)" --attn sdpa \
        --compile "$([ "$dry" = 1 ] && echo none || echo default)" --out "$out/throughput-step-deit3-$tag.json" ;;
    step-triton)
      step step-triton "$([ "$dry" = 1 ] && echo deit_tiny_distilled || echo deit_small_distilled,deit_base_distilled)" \
        triton "$compiled" ;;
    attention)
      $py benchmarks/throughput.py --section attention --device "$dev" --steps "$([ "$dry" = 1 ] && echo 1 || echo 25)" \
        --out "$out/throughput-attention-$tag.json" ;;
    distill)
      if [ "$dry" = 1 ]; then
        $py benchmarks/throughput.py --section distill --device cpu --student deit_tiny_distilled --teacher resnet10t \
          --img-size 32 --batch-size 8 --steps 1 --warmup 1 --repeats 1 --out "$out/throughput-distill-$tag.json"
      else
        $py benchmarks/throughput.py --section distill --device cuda --student deit_small_distilled \
          --teacher regnety_160 --img-size 224 --batch-size 256 --steps 10 --warmup 3 --repeats 3 \
          --out "$out/throughput-distill-$tag.json"
      fi ;;
    loader|loader-deit3)
      if ! $py -c "import nvidia.dali" 2>/dev/null; then
        echo "DALI is not installed here: stage it with benchmarks/stage_dali.sh (see the top of this script)"
        return 2
      fi
      if [ "$1" = loader-deit3 ]; then
        if [ "$dry" = 1 ]; then
          $py benchmarks/loader.py --make-data 56 --device cpu --workers 1 --batch-size 8 --img-size 32 \
            --steps 1 --warmup 1 --repeats 1 --loader dali,torch,baseline --augment three --out "$out/loader-deit3-$tag.json"
        else
          $py benchmarks/loader.py --make-data 25600 --device cuda --workers 16 --batch-size 256 --img-size 224 \
            --steps 30 --warmup 5 --repeats 2 --loader dali,torch,baseline --augment three \
            --out "$out/loader-deit3-$tag.json"
        fi
      elif [ "$dry" = 1 ]; then
        # every kind and prepared set of the GPU call below, at toy size
        $py benchmarks/loader.py --make-data 56 --device cpu --workers 1 --batch-size 8 --img-size 32 \
          --steps 1 --warmup 1 --repeats 1 --loader dali,dali-full,dali-hw,dali-inline,torch,baseline \
          --prepared 64,32 --out "$out/loader-$tag.json"
      else
        # one epoch holds the window: the torch loader's 16 workers x 4 prefetched + 1 warm-up, 30 timed
        $py benchmarks/loader.py --make-data 25600 --device cuda --workers 16 --batch-size 256 --img-size 224 \
          --steps 30 --warmup 5 --repeats 2 --loader dali,dali-full,dali-hw,dali-inline,torch,baseline \
          --prepared 512,256 --out "$out/loader-$tag.json"
      fi ;;
    e2e)
      if [ "$dry" = 1 ]; then
        $py benchmarks/e2e.py --tiny --out "$out/e2e-$tag.json"
      else
        $py benchmarks/e2e.py --device cuda --out "$out/e2e-$tag.json"
      fi ;;
    candidates)
      if [ "$dry" = 1 ]; then
        $py benchmarks/candidates.py --device cpu --variants ti:8:none,ti:16:none:2 --img-size 32 --patch-size 8 \
          --depth 2 --steps 1 --warmup 1 --repeats 1 --out "$out/candidates-$tag.json"
      else
        $py benchmarks/candidates.py --device cuda --out "$out/candidates-$tag.json"
      fi ;;
    *)
      echo "unknown part $1: carry | e2e | tests | loader | candidates | tests-slow | step-triton | loader-deit3 | step-deit3 | step-s | step-b | step-ti | attention | distill"
      return 2 ;;
  esac
}

if [ "$part" = all ]; then
  [ "$dry" = 1 ] || { echo "'all' is for --dry: on a GPU, one part per call"; exit 2; }
  for p in carry e2e tests loader candidates tests-slow step-triton loader-deit3 step-deit3 step-s step-b step-ti attention \
      distill; do
    echo "== $p"
    run_part "$p"
  done
else
  run_part "$part"
fi
