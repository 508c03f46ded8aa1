#!/usr/bin/env bash
# Runs the embedding job on the bundled sample corpus with the DirectRunner.
# First run: creates .venv and installs the pinned dependencies.
# Extra arguments go to `python -m pipeline.run` (e.g. --format tfrecord,
# --model /path/to/bert_zh_L-12_H-768_A-12, --verbose for every log line).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/venv.sh
ensure_venv
exec .venv/bin/python -m pipeline.run \
  --input data/sample_zh.jsonl \
  --output out/sample/embeddings \
  --runner DirectRunner \
  "$@"
