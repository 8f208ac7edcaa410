#!/usr/bin/env bash
# What docs/predict.md measured: the built-in mlp and gpt, ladder 64-128-256 with 2 seeds, the fit over
# parameters; then `scale` at the targets (each checks the prediction) and `predict` again (the plot and
# JSON with the measured points). Runs in a scratch folder (W); copies the JSON and PNG into OUT.
#   bash bench/predict.sh                  # both (about 15 min on 2 shared CPU cores, one thread each)
#   STEP=mlp bash bench/predict.sh         # or gpt
# The hyperparameters are written by hand (the sweeps' optima, see docs/predict.md), not by `tune`.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
W=${W:-/tmp/mt-predict}; OUT=${OUT:-$W/out}; STEP=${STEP:-all}
mkdir -p "$W" "$OUT"; cd "$W"
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mt() { python3 -m mutransfer.cli "$@"; }
# the built-in recipes with a cosine decay and 64 validation batches (the final iterate at a constant LR
# and an 8-batch validation set are too noisy to predict to 1%); the gpt also shorter for a CPU
sed 's/^name: mlp-pysource/name: mlp-v/; s/eval_batches: 8}/eval_batches: 64, schedule: cosine}/' \
  "$REPO/recipes/mlp-pysource.yaml" > mlp-v.yaml
sed 's/^name: gpt-pysource/name: gpt-v/; s/seq_len: 64}/seq_len: 32}/g; s/steps: 300, batch_size: 32/steps: 120, batch_size: 8/; s/lr: 3.0e-3/lr: 5.5e-3/; s/eval_batches: 8}/eval_batches: 64, schedule: cosine}/' \
  "$REPO/recipes/gpt-pysource.yaml" > gpt-v.yaml
python3 - <<'PY'
from mutransfer.run.hparams_file import write_hparams_file
write_hparams_file("runs/mlp-v/hparams.yaml", recipe="mlp-v.yaml", proxy_width=64, optimizer="adamw",
                   hparams={"lr": 0.016147429631101374}, best_value=None, steps=200,
                   study="grid optimum of docs/transfer-mlp.json", storage="none")
write_hparams_file("runs/gpt-v/hparams.yaml", recipe="gpt-v.yaml", proxy_width=128, optimizer="adamw",
                   hparams={"lr": 2 ** -7.5}, best_value=None, steps=120,
                   study="near the 128-wide optimum of docs/sweep-gpt-mup-240steps.json", storage="none")
PY
run() {   # recipe, targets, json/png stem
  mt predict "$1" --widths 64,128,256 --seeds 2 --width "$2" --device cpu --json "$OUT/$3.json" --plot "$OUT/$3.png"
  for w in ${2//,/ }; do s=$SECONDS; mt scale "$1" --width "$w" --device cpu; echo "scale $w: $((SECONDS - s)) s"; done
  mt predict "$1" --widths 64,128,256 --seeds 2 --width "$2" --device cpu --json "$OUT/$3.json" --plot "$OUT/$3.png"
}
if [[ $STEP == all || $STEP == mlp ]]; then run mlp-v.yaml 1024,2048 predict-mlp; fi
if [[ $STEP == all || $STEP == gpt ]]; then run gpt-v.yaml 512,1024 predict-gpt; fi
echo "results in $OUT"
