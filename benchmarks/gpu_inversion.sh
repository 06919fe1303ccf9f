#!/usr/bin/env bash
# InversionView decoders toward the reference's scale on one GPU (issue #22). Prepared on CPU, not yet run on a GPU.
#
#   bash benchmarks/gpu_inversion.sh [OUT]          # OUT defaults to /tmp/iv-gpu; about 10 minutes of device time
#
# Each run is the recipe's own command with --device cuda; drop that flag (or say --device cpu) and the same command
# trains the same way on a CPU, only slower. Every run warm-starts from the shipped decoder, so the card records
# it under "warm_start", and is resumable: if a run is cut off, the same command continues from <out>.ckpt.
# Afterwards compare with the shipped decoders on the CPU:
#   python benchmarks/inversion_in_eps.py nbfeatures/zoo/counting/inversion $OUT/counting --sites blocks.1.hook_attn_out blocks.0.hook_attn_out
# and, if a decoder is better, copy its folder into nbfeatures/zoo/<name>/inversion (its card keeps the command).
set -euo pipefail
OUT=${1:-/tmp/iv-gpu}
PY=${PY:-.venv/bin/python}
RUN="$PY -m nbfeatures.recipes.train_inversion"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv

# 1. smoke and speed (under a minute): 50 steps x 1024 pairs; the card must say cuda, the weights load on the CPU
$RUN counting --init nbfeatures/zoo/counting/inversion --steps 50 --batch-size 1024 --device cuda --out "$OUT/smoke" --no-progress
STEPS=$($PY -c "import sys; from nbfeatures import zoo; from nbfeatures.inversion import load_decoder
c = zoo.card(sys.argv[1]); load_decoder(sys.argv[1]); assert c['hardware']['device'] == 'cuda', c['hardware']
print(c['hardware'], file=sys.stderr); print(int(50 * 360 / c['wall_time_s_this_run']) // 500 * 500 or 500)" "$OUT/smoke")
echo "counting: $STEPS steps x 1024 pairs fit in about 6 minutes"

# 2. counting, the decoder: the shipped recipe's second run (rebalanced sites) at batch 1024, lr 1e-3 (on CPU
#    no worse per pair than 256 at 5e-4), in-epsilon by site every 500 steps (the card's inside_curve). No site focus:
#    on CPU it moved quality from blocks.0 to blocks.1 attention instead of adding any (recipe docstring).
$RUN counting --init nbfeatures/zoo/counting/inversion --steps "$STEPS" --batch-size 1024 --lr 1e-3 --rebalance 6 \
    --eval-every 500 --eval-queries 32 --device cuda --out "$OUT/counting" --no-progress

# 3. tokfsm (its codebook feature site included), about 2 minutes; a cut-off run resumes with the same command
mkdir -p "$OUT/tokfsm" && cp -r nbfeatures/zoo/tokfsm/inversion/codebook "$OUT/tokfsm/"
timeout 150 $RUN tokfsm --init nbfeatures/zoo/tokfsm/inversion --steps 2000 --batch-size 1024 --lr 1e-3 --eval-every 500 \
    --device cuda --out "$OUT/tokfsm" --no-progress || echo "tokfsm cut off; run the same command again to finish it"
