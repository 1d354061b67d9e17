#!/usr/bin/env bash
# The small SEA reproduction on CPU (RESULTS.md), each stage resumable (re-run = resume):
#   0. split the Gutenberg corpus into 37 training books and 3 held-out books (never trained
#      on) and train a byte-level BPE tokenizer on the training books,
#   1. pre-train a small dense OPT teacher on the training books,
#   2. distil it into a SEA student and, as the paper's linear baseline, into a Performer
#      student, by the same recipe, data and steps,
#   3. perplexity of teacher, teacher with untrained Performer / SEA attention, the SEA student
#      (dynamic-k sweep up to k = T, every visible key) and the Performer student, on the
#      held-out books and on WikiText-2 validation (`sea` protocol at the trained T),
#   4. RESULTS.md table and plots (k sweep, loss terms, gates, coverage), and pictures of what
#      the SEA student keeps against its teacher.
#
#   bash recipes/small_sea.sh            # the full recipe (119.8 min on 2 idle EPYC cores: RESULTS.md)
#   TOY=1 bash recipes/small_sea.sh      # every stage at toy size in about a minute (CI)
#
# Every setting below can be overridden from the environment.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-runs/small}
CORPUS=${CORPUS:-../shared/data/gutenberg/gutenberg_40books.txt}
if [[ "${TOY:-0}" == 1 ]]; then
  LAYERS=${LAYERS:-2} D_MODEL=${D_MODEL:-32} HEADS=${HEADS:-4} SEQ=${SEQ:-64} VOCAB=${VOCAB:-512}
  TEACHER_STEPS=${TEACHER_STEPS:-4} STUDENT_STEPS=${STUDENT_STEPS:-3} BATCH=${BATCH:-2}
  SEA_K=${SEA_K:-16} SEA_k=${SEA_k:-4} SEA_K_TRAIN=${SEA_K_TRAIN:-2,64}
  EVAL_WINDOWS=${EVAL_WINDOWS:-2} KS=${KS:-1,2,4,8,64}
  MAX_CHARS=${MAX_CHARS:-200000} WARMUP=${WARMUP:-1} STUDENT_WARMUP=${STUDENT_WARMUP:-1}
else
  LAYERS=${LAYERS:-4} D_MODEL=${D_MODEL:-256} HEADS=${HEADS:-8} SEQ=${SEQ:-512}
  VOCAB=${VOCAB:-8192} TEACHER_STEPS=${TEACHER_STEPS:-2000} STUDENT_STEPS=${STUDENT_STEPS:-600}
  BATCH=${BATCH:-8} SEA_K=${SEA_K:-64} SEA_k=${SEA_k:-32} SEA_K_TRAIN=${SEA_K_TRAIN:-16,512}
  EVAL_WINDOWS=${EVAL_WINDOWS:-50}
  KS=${KS:-8,16,32,128,512} MAX_CHARS=${MAX_CHARS:-0} WARMUP=${WARMUP:-100}
fi
TEACHER_LR=${TEACHER_LR:-1e-3}
LR_SEA=${LR_SEA:-1e-3}
LR_PRETRAINED=${LR_PRETRAINED:-3e-5}
# Students: cosine decay (to 0.1x) after a short warm-up, and no dropout: the teacher was
# trained without it (the paper's OPT teachers were trained with 0.1, hence its 0.1).
STUDENT=(--lr-sea "$LR_SEA" --lr-pretrained "$LR_PRETRAINED" --lr-schedule cosine
         --warmup-steps "${STUDENT_WARMUP:-20}" --dropout "${STUDENT_DROPOUT:-0.0}"
         --save-every "${SAVE_EVERY:-50}" --log-every 5)
DATA="$OUT/data"
COMMON=(--seq-len "$SEQ" --batch-size "$BATCH" --keep 2 --cache-dir "$OUT/cache"
        --train-text "$DATA/train.txt" --no-progress)
EVAL=(--seq-len "$SEQ" --max-windows "$EVAL_WINDOWS" --no-progress)
mkdir -p "$OUT/results"
R="$OUT/results"
# Wall time of every stage, one line per (re)run: OUT/stage_times.jsonl (RESULTS.md sums them).
STAGE=""; STAGE_START=0
stage() {  # stage NAME: closes the running stage's clock and starts NAME's
  local now; now=$(date +%s)
  if [[ -n "$STAGE" ]]; then
    printf '{"stage": "%s", "seconds": %d, "ended": "%s"}\n' "$STAGE" $((now - STAGE_START)) \
      "$(date -u +%FT%TZ)" >> "$OUT/stage_times.jsonl"
  fi
  STAGE=$1; STAGE_START=$now
}

stage corpus
echo "== 0/4 corpus: held-out books, BPE tokenizer ($VOCAB tokens)" >&2
python recipes/prepare_corpus.py --corpus "$CORPUS" --out "$DATA" --vocab-size "$VOCAB" \
  --max-train-chars "$MAX_CHARS"

stage teacher
echo "== 1/4 teacher: dense OPT, $LAYERS layers, d_model $D_MODEL, $HEADS heads, T=$SEQ" >&2
python train.py --mode pretrain --out "$OUT/teacher" --steps "$TEACHER_STEPS" \
  --layers "$LAYERS" --d-model "$D_MODEL" --heads "$HEADS" --max-positions "$SEQ" \
  --tokenizer "$DATA/tokenizer" --lr "$TEACHER_LR" --lr-schedule cosine \
  --warmup-steps "$WARMUP" --dropout 0.0 --save-every "${SAVE_EVERY:-100}" --log-every 10 \
  "${COMMON[@]}"

stage sea
echo "== 2/4 SEA student: K=$SEA_K, k=$SEA_k (trained at k drawn from [$SEA_K_TRAIN])" >&2
python train.py --teacher "$OUT/teacher/final" --out "$OUT/sea" --steps "$STUDENT_STEPS" \
  --attention sea --sea-K "$SEA_K" --sea-k "$SEA_k" --sea-k-train "$SEA_K_TRAIN" \
  "${STUDENT[@]}" "${COMMON[@]}"

stage performer
echo "== 3/4 Performer student (the paper's linear baseline)" >&2
python train.py --teacher "$OUT/teacher/final" --out "$OUT/performer" --steps "$STUDENT_STEPS" \
  --attention performer "${STUDENT[@]}" "${COMMON[@]}"

stage perplexity
echo "== 4/4 perplexity: held-out books and WikiText-2 validation" >&2
for text in heldout wikitext; do
  if [[ $text == heldout ]]; then SRC=(--text-file "$DATA/heldout.txt"); else SRC=(--protocol sea); fi
  run() {  # one result file per (model, text); a finished one is not redone
    local name=$1 dst; shift
    dst="$R/${name}_$text.jsonl"
    if [[ ! -s "$dst" ]]; then
      python eval.py "$@" "${SRC[@]}" "${EVAL[@]}" > "$dst.tmp"
      mv -f "$dst.tmp" "$dst"
    fi
  }
  run teacher --model "$OUT/teacher/final"
  run untrained_performer --model "$OUT/teacher/final" --attention performer
  run untrained_sea --model "$OUT/teacher/final" --attention sea --sea-K "$SEA_K" --sea-k "$SEA_k"
  run sea_sweep --model "$OUT/sea/final" --sea-k "$KS"
  run performer --model "$OUT/performer/final"
done
if [[ ! -s "$R/coverage_heldout.json" ]]; then  # the kept mask's coverage at the default k
  python recipes/coverage.py --teacher "$OUT/teacher/final" --student "$OUT/sea/final" \
    --text-file "$DATA/heldout.txt" --seq-len "$SEQ" --sea-k "$SEA_k" > "$R/coverage_heldout.json.tmp"
  mv -f "$R/coverage_heldout.json.tmp" "$R/coverage_heldout.json"
fi
stage pictures
echo "== pictures: what the distilled SEA student keeps, against its teacher" >&2
if [[ ! -s "$OUT/pictures/summary.json" ]]; then  # written last: a finished set is not redrawn
  python -m sea_jax.visualize --model "$OUT/sea/final" --teacher "$OUT/teacher/final" \
    --text-file "$DATA/heldout.txt" --max-tokens "${VIS_TOKENS:-$SEQ}" \
    --sea-k "$SEA_k" --out "$OUT/pictures"
fi
stage report
python recipes/make_results.py --run "$OUT" --trained-k "$SEA_k" --out "$OUT/report"

stage ""
echo "wrote $OUT/report and $OUT/pictures" >&2
