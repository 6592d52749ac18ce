#!/usr/bin/env bash
# The one GPU check of the performance issue, for a session lent a GPU machine (about 8 minutes):
#   1. nvidia-smi;
#   2. python -m bench.bench_gpu: fp32 / fp16 / channels_last images/s per backbone and the T4
#      projection (its own 330 s budget guard);
#   3. a training smoke test through the real loop (utils.train: fp16 autocast, GradScaler,
#      channels_last, DataLoader workers): bench.image_signal, convnextv2_nano at 224 px,
#      2 folds x 2 epochs on 2,000 synthetic rows.
# Every log goes to $OUT (the device tool's return folder), or /tmp/gpu-check elsewhere.
# Packages: the suite's requirements. Wheels in .whl/ are installed first into /tmp/site, for a
# machine whose image lacks some (docs/benchmarks.md, section 4, lists the ones to carry).
#
#     bash bench/gpu_check.sh
set -uo pipefail
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
export NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
status=0
nvidia-smi 2>&1 | tee "$out/nvidia-smi.txt"
timeout 420 "$py" -m bench.bench_gpu --budget-s 330 2>&1 | tee "$out/bench_gpu.txt" || status=1
timeout 180 "$py" -m bench.image_signal --model convnextv2_nano --image-size 224 --rows 2000 \
    --patients 40 --epochs 2 --folds 2 2>&1 | tee "$out/train_smoke.txt" || status=1
exit $status
