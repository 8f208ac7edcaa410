#!/usr/bin/env bash
# What was run on the lent H100 for the GPU numbers of docs/results.md (one call; logs under $OUT or ./gpu-out).
# 1) the CUDA path on the quick-start (bf16 autocast, TF32, fused AdamW, --compile), 2) MFU of the
# width-2048 GPT (bench/gpt-2048.yaml) with --compile, 3) the muP overhead bench on the GPU.
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
W=/tmp/mt; rm -rf $W
STEP=${STEP:-all}
if [[ $STEP == all || $STEP == quick ]]; then
  python3 -m mutransfer.cli scale recipes/quickstart.yaml --device cuda --steps 30 --out $W/q --checkpoint-every 10 2>&1 | tee "$OUT/quick.log"
  python3 -m mutransfer.cli scale recipes/quickstart.yaml --device cuda --steps 40 --out $W/q --resume --compile 2>&1 | tee -a "$OUT/quick.log"
  cp $W/q/metrics.jsonl "$OUT/quick-metrics.jsonl"
fi
if [[ $STEP == all || $STEP == mfu ]]; then
  python3 -m mutransfer.cli scale bench/gpt-2048.yaml --device cuda --compile --steps ${MFU_STEPS:-60} --out $W/mfu 2>&1 | tee "$OUT/mfu.log"
  cp $W/mfu/metrics.jsonl "$OUT/mfu-metrics.jsonl"; cp $W/mfu/summary.json "$OUT/mfu-summary.json"
fi
if [[ $STEP == all || $STEP == overhead ]]; then
  for extra in "" "--same-init" "--compile"; do
    python3 bench/overhead.py --device cuda --width 1024 --steps 200 --chunk 20 $extra 2>&1 | tee -a "$OUT/overhead.log"
    python3 bench/overhead.py --device cuda --recipe bench/gpt-2048.yaml --width 2048 --steps 40 --chunk 10 --warmup 5 $extra 2>&1 | tee -a "$OUT/overhead.log"
  done
fi
if [[ $STEP == all || $STEP == tune ]]; then
  # issue 14: trials/hour one at a time vs batched trials on the GPU (proxy width 128), and CPU modes
  python3 bench/tune_throughput.py --trials ${TUNE_TRIALS:-32} --repeats 1 --gpu-width 128 2>&1 | tee "$OUT/tune.log"
  # the P3 figure: proxy vs target wall time per trial, both batched (the same mode), on the GPU
  python3 bench/tune.py --recipe recipes/gpt-pysource.yaml --grid 4 --seeds 1 --sampler-seeds 1 --budget 4 \
    --no-random-baseline --no-throughput --wall-trials 16 --parallel-trials 16 --device cuda 2>&1 | tee -a "$OUT/tune.log"
fi
