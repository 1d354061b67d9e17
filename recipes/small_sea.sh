#!/usr/bin/env bash
# A small SEA reproduction on CPU (issue: end to end), each stage resumable (re-run = resume):
#   1. pre-train a small dense OPT teacher on the Gutenberg corpus (OPT tokenizer),
#   2. distil it into a SEA student (K=64, k=16) and, as the paper's linear baseline, into a
#      Performer student, by the same recipe,
#   3. evaluate teacher, untrained student, SEA student (k sweep) and Performer student on
#      WikiText-2 (sea protocol at the trained sequence length); results/*.jsonl feed RESULTS.md,
#   4. draw the teacher's attention, SEA's estimate, the kept mask and their overlap.
#
#   bash recipes/small_sea.sh            # the full recipe (about 40-50 minutes on 2 cores)
#   TOY=1 bash recipes/small_sea.sh      # seconds: every stage at toy size (what CI runs)
#
# Every setting below can be overridden from the environment.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-runs/small}
CORPUS=${CORPUS:-../shared/data/gutenberg/gutenberg_40books.txt}
if [[ "${TOY:-0}" == 1 ]]; then
  LAYERS=${LAYERS:-2} D_MODEL=${D_MODEL:-32} HEADS=${HEADS:-4} SEQ=${SEQ:-64}
  TEACHER_STEPS=${TEACHER_STEPS:-4} STUDENT_STEPS=${STUDENT_STEPS:-3} BATCH=${BATCH:-2}
  SEA_K=${SEA_K:-16} SEA_k=${SEA_k:-4} EVAL_WINDOWS=${EVAL_WINDOWS:-2} KS=${KS:-1,2,4,8,16}
  TEXT_ARGS=(--train-text "${TOY_TEXT:-sea_jax/assets/wikitext-2-raw/wiki.valid.raw}")
else
  LAYERS=${LAYERS:-4} D_MODEL=${D_MODEL:-256} HEADS=${HEADS:-8} SEQ=${SEQ:-512}
  TEACHER_STEPS=${TEACHER_STEPS:-450} STUDENT_STEPS=${STUDENT_STEPS:-120} BATCH=${BATCH:-4}
  SEA_K=${SEA_K:-64} SEA_k=${SEA_k:-16} EVAL_WINDOWS=${EVAL_WINDOWS:-100} KS=${KS:-4,8,16,32,64}
  TEXT_ARGS=(--train-text "$CORPUS")
fi
TEACHER_LR=${TEACHER_LR:-1e-3}
LR_SEA=${LR_SEA:-1e-3}
LR_PRETRAINED=${LR_PRETRAINED:-2e-6}
COMMON=(--seq-len "$SEQ" --batch-size "$BATCH" --save-every "${SAVE_EVERY:-25}" --keep 2
        --cache-dir "$OUT/cache" --log-every "${LOG_EVERY:-1}" "${TEXT_ARGS[@]}")
EVAL=(--seq-len "$SEQ" --protocol sea ${EVAL_WINDOWS:+--max-windows $EVAL_WINDOWS})
mkdir -p "$OUT/results"

echo "== 1/4 teacher: dense OPT, $LAYERS layers, d_model $D_MODEL, $HEADS heads, T=$SEQ" >&2
python train.py --mode pretrain --out "$OUT/teacher" --steps "$TEACHER_STEPS" \
  --layers "$LAYERS" --d-model "$D_MODEL" --heads "$HEADS" --max-positions "$SEQ" \
  --lr "$TEACHER_LR" --dropout 0.0 "${COMMON[@]}"

echo "== 2/4 SEA student: K=$SEA_K, k=$SEA_k" >&2
python train.py --teacher "$OUT/teacher/final" --out "$OUT/sea" --steps "$STUDENT_STEPS" \
  --attention sea --sea-K "$SEA_K" --sea-k "$SEA_k" \
  --lr-sea "$LR_SEA" --lr-pretrained "$LR_PRETRAINED" "${COMMON[@]}"

echo "== 3/4 Performer student (the paper's linear baseline)" >&2
python train.py --teacher "$OUT/teacher/final" --out "$OUT/performer" --steps "$STUDENT_STEPS" \
  --attention performer --lr-sea "$LR_SEA" --lr-pretrained "$LR_PRETRAINED" "${COMMON[@]}"

echo "== 4/4 WikiText-2 perplexity" >&2
python eval.py --model "$OUT/teacher/final" "${EVAL[@]}" > "$OUT/results/teacher.jsonl"
python eval.py --model "$OUT/teacher/final" --attention sea --sea-K "$SEA_K" --sea-k "$SEA_k" \
  "${EVAL[@]}" > "$OUT/results/untrained_sea.jsonl"
python eval.py --model "$OUT/sea/final" --sea-k "$KS" "${EVAL[@]}" > "$OUT/results/sea_sweep.jsonl"
python eval.py --model "$OUT/performer/final" "${EVAL[@]}" > "$OUT/results/performer.jsonl"
python recipes/make_results.py --results "$OUT/results" --trained-k "$SEA_k" \
  --out-md "$OUT/RESULTS.md" --out-png "$OUT/k_sweep.png"

echo "== pictures: what the distilled SEA student keeps, against its teacher" >&2
python -m sea_jax.visualize --model "$OUT/sea/final" --teacher "$OUT/teacher/final" \
  --text-file sea_jax/assets/wikitext-2-raw/wiki.valid.raw --max-tokens "${VIS_TOKENS:-$SEQ}" \
  --sea-k "$SEA_k" --out "$OUT/pictures"
echo "wrote $OUT/RESULTS.md and $OUT/pictures" >&2
