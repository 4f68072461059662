#!/usr/bin/env bash
# Fill BUNDLE with what scripts/gpu_check.sh needs on an air-gapped GPU node that has PyTorch with CUDA,
# transformers, peft, accelerate, safetensors and scikit-learn: wheels of trl, datasets (and their other
# dependencies), plus the default model's config.json and tokenizer (no weights: the check builds the
# architecture with random weights, since speed does not depend on them).
#
#   scripts/gpu_wheels.sh BUNDLE [--python-version 3.12] [--platform manylinux2014_x86_64]
set -euo pipefail
cd "$(dirname "$0")/.."
out="$1"; shift
pyver=$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
platform=manylinux2014_x86_64
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) pyver="$2"; shift 2 ;;
    --platform) platform="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$out/model"
pins=$(grep -E '^(trl|datasets|filelock)==' requirements.txt)
# the versions of datasets' other dependencies that this project's venv resolved
extra=$("$PY" -m pip list --format=freeze 2>/dev/null | grep -i -E '^(pyarrow|dill|multiprocess|xxhash|fsspec)==')
# The node already has torch, transformers, accelerate, peft and pandas: bring trl and datasets with the
# dependencies of theirs that such a node lacks.
"$PY" -m pip download --quiet --dest "$out" --only-binary=:all: --python-version "$pyver" \
  --platform "$platform" --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --no-deps $pins $extra
model=$("$PY" -c 'from rbrm.models import resolve_model; print(resolve_model("smollm2-135m-instruct"))')
for f in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja; do
  [ -f "$model/$f" ] && cp "$model/$f" "$out/model/"
done
du -sh "$out"
