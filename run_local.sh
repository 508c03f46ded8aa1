#!/usr/bin/env bash
# Runs the embedding job on the bundled sample corpus with the DirectRunner.
# First run: creates .venv and installs the pinned dependencies.
# Extra arguments go to `python -m pipeline.run` (e.g. --format tfrecord,
# --model /path/to/bert_zh_L-12_H-768_A-12).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/venv.sh
ensure_venv
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec .venv/bin/python -m pipeline.run \
  --input data/sample_zh.jsonl \
  --output out/sample/embeddings \
  --runner DirectRunner \
  "$@"
