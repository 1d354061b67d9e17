#!/usr/bin/env bash
# Every figure of RESULTS.md's SmolLM2-135M section, one result file per row under
# OUT/results (a finished row is not redone; re-run = resume):
#   - dense and the SEA student at k = 64 on the whole WikiText-2 validation split (sea
#     protocol, T = 1,024) and test split (gptq protocol),
#   - both at T = 2,048 and 4,096 (the student was distilled at 1,024) on the first
#     LONG_TOKENS tokens of validation,
#   - the k sweep 16 ... 1,024 at T = 1,024, the untrained SEA (fresh modules) and the Performer
#     on a frozen base (it has no parameters of its own, so its student is the untrained
#     Performer), and the held-out books, on the first SWEEP_WINDOWS windows,
#   - the oracle mask (the teacher's own top bins, no estimator) at k on the same windows,
#   - per-layer coverage of the teacher's attention by the kept mask against the oracle's,
#   - pictures of the kept mask against the teacher's attention.
#
#   bash recipes/smollm2_eval.sh                    # after recipes/smollm2_sea.sh
#   STUDENT=sea_jax/assets/models/... bash recipes/smollm2_eval.sh   # another student folder
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-runs/smollm2}
BASE=${BASE:-smollm2-135m}
STUDENT=${STUDENT:-$OUT/student}
SEQ=${SEQ:-1024} SEA_k=${SEA_k:-64} SEA_K=${SEA_K:-256}
SWEEP_WINDOWS=${SWEEP_WINDOWS:-8} LONG_TOKENS=${LONG_TOKENS:-32768}
KS=${KS:-16,32,64,128,256,512,1024}
R="$OUT/results"
mkdir -p "$R"

run() {  # run NAME ARGS...: eval.py ARGS > R/NAME.jsonl, once
  local name=$1 dst; shift
  dst="$R/$name.jsonl"
  if [[ ! -s "$dst" ]]; then
    echo "== $name: eval.py $*" >&2
    local start; start=$(date +%s)
    python eval.py --no-progress "$@" > "$dst.tmp"
    mv -f "$dst.tmp" "$dst"
    echo "   $(( $(date +%s) - start )) s" >&2
  fi
}

# the headline: the whole validation split at the trained window (the test split comes last)
run dense_val --model "$BASE" --seq-len "$SEQ" --protocol sea
run sea_val --model "$STUDENT" --seq-len "$SEQ" --protocol sea --sea-k "$SEA_k"
# the k sweep, the untrained rows and the Performer, on the first windows
SUB=(--seq-len "$SEQ" --max-windows "$SWEEP_WINDOWS")
run dense_sub --model "$BASE" "${SUB[@]}"
run sea_sweep --model "$STUDENT" "${SUB[@]}" --sea-k "$KS"
run untrained_sea --model "$BASE" "${SUB[@]}" --attention sea --sea-K "$SEA_K" --sea-k "$SEA_k"
run performer --model "$BASE" "${SUB[@]}" --attention performer
if [[ -f "$OUT/data/heldout.txt" ]]; then
  run dense_heldout --model "$BASE" --seq-len "$SEQ" --max-windows "$SWEEP_WINDOWS" \
    --text-file "$OUT/data/heldout.txt"
  run sea_heldout --model "$STUDENT" --seq-len "$SEQ" --max-windows "$SWEEP_WINDOWS" \
    --text-file "$OUT/data/heldout.txt" --sea-k "$SEA_k"
fi
if [[ ! -s "$R/oracle_sub.jsonl" ]]; then  # the ceiling: SEA on the teacher's own mass per bin
  echo "== oracle mask at k = $SEA_k" >&2
  python recipes/oracle_perplexity.py --model "$BASE" --seq-len "$SEQ" --sea-k "$SEA_k" \
    --sea-K "$SEA_K" --windows "$SWEEP_WINDOWS" > "$R/oracle_sub.jsonl.tmp"
  mv -f "$R/oracle_sub.jsonl.tmp" "$R/oracle_sub.jsonl"
fi
if [[ ! -s "$R/coverage_val.json" ]]; then
  echo "== coverage: kept mask vs oracle, per layer" >&2
  python recipes/coverage.py --teacher "$BASE" --student "$STUDENT" --seq-len "$SEQ" \
    --sea-k "$SEA_k" --windows "${COVERAGE_WINDOWS:-4}" > "$R/coverage_val.json.tmp"
  mv -f "$R/coverage_val.json.tmp" "$R/coverage_val.json"
fi
if [[ ! -d "$OUT/pictures" ]]; then
  echo "== pictures" >&2
  python -m sea_jax.visualize --model "$STUDENT" --teacher "$BASE" --sea-k "$SEA_k" \
    --text-file "${PICTURE_TEXT:-sea_jax/assets/wikitext-2-raw/wiki.valid.raw}" --layers "${PICTURE_LAYERS:-3,15,29}" \
    --max-tokens "${PICTURE_TOKENS:-512}" --out "$OUT/pictures"
fi
# longer windows than the student was trained at
for T in 2048 4096; do
  W=$(( LONG_TOKENS / T ))
  run "dense_val_T$T" --model "$BASE" --seq-len "$T" --max-windows "$W"
  run "sea_val_T$T" --model "$STUDENT" --seq-len "$T" --max-windows "$W" --sea-k "$SEA_k"
done
# the test split (gptq protocol), the longest row
run dense_test --model "$BASE" --seq-len "$SEQ" --protocol gptq
run sea_test --model "$STUDENT" --seq-len "$SEQ" --protocol gptq --sea-k "$SEA_k"
echo "wrote $R" >&2
