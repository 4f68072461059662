#!/usr/bin/env bash
# The CUDA check on one GPU, for an air-gapped node (see scripts/gpu_check.py for what it measures).
#
#   scripts/gpu_wheels.sh BUNDLE            # on a machine with network: wheels + the model's config/tokenizer
#   scripts/gpu_check.sh --wheels BUNDLE    # on the node: install what is missing offline, then run the check
#
# Other flags go to gpu_check.py (e.g. --device cpu --tiny, --dpo-steps 20). Without --wheels the packages must be
# installed already and --model-dir must be given.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
args=()
wheels=""
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) wheels="$2"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
start=$(date +%s)
if [ -n "$wheels" ]; then
  missing=()
  for pkg in trl datasets filelock; do
    "$PY" -c "import $pkg" 2>/dev/null || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then  # offline, from the bundle only; their other dependencies are on the node
    "$PY" -m pip install --quiet --no-index --find-links "$wheels" "${missing[@]}"
  fi
  # rbrm itself runs from this checkout (gpu_check.py puts it first on sys.path); nothing to install
  case " ${args[*]:-} " in *" --model-dir "*) ;; *) args+=(--model-dir "$wheels/model") ;; esac
fi
echo "[setup] $(( $(date +%s) - start )) s"
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRL_TELEMETRY=0 exec "$PY" scripts/gpu_check.py "${args[@]}"
