#!/usr/bin/env bash
# The paper's evaluation (docs/method.md §5): greedy answers to the Salad-Bench base questions, judged,
# with the unsafe rate (and the paper's safe rate = 1 - unsafe) overall and per `1-category`.
#
# usage (from the repository root):
#   eval/salad_bench.sh [MODEL] [--limit N] [other `rbrm eval` options, e.g. --over-refusal]
#     MODEL       alias, model folder, .gguf file or hub id (default: the packaged smollm2-135m-instruct)
#   environment:
#     JUDGE         minilm (default, ships with rbrm), refusal, llamaguard1/2/3 or mdjudge
#     JUDGE_MODEL   local folder of the Llama Guard / MD-Judge model (needed by those judges)
#     OUT           output folder (default runs/eval/salad_bench/<model name>-<judge>)
#     MAX_NEW_TOKENS  default 128
# Rerun the same command to resume an interrupted run.
set -euo pipefail

cd "$(dirname "$0")/.."
RBRM=${RBRM:-}
if [[ -z "$RBRM" ]]; then
  if [[ -x .venv/bin/rbrm ]]; then RBRM=.venv/bin/rbrm; else RBRM=rbrm; fi
fi
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}

MODEL=smollm2-135m-instruct
if [[ $# -gt 0 && "$1" != -* ]]; then
  MODEL=$1
  shift
fi
JUDGE=${JUDGE:-minilm}
NAME=$(basename "${MODEL%/}")
NAME=${NAME%.gguf}
OUT=${OUT:-runs/eval/salad_bench/${NAME}-${JUDGE}}

args=(--model "$MODEL"
      --prompts "salad_base=data/salad_bench/derived_base_questions_available.jsonl"
      --category-field 1-category
      --judge "$JUDGE"
      --max-new-tokens "${MAX_NEW_TOKENS:-128}"
      --out "$OUT")
if [[ -n "${JUDGE_MODEL:-}" ]]; then
  args+=(--judge-model "$JUDGE_MODEL")
fi

echo "+ $RBRM eval ${args[*]} $*" >&2
"$RBRM" eval "${args[@]}" "$@"
echo "results in $OUT: summary.md (table), summary.json (rates, 95% CIs, per-category rates), categories.png" >&2
