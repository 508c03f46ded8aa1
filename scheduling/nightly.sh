#!/usr/bin/env bash
# Nightly incremental embedding run (see crontab.example and the README's
# "Scheduling" section).
#
# Each night writes to its own dated prefix, INDEX_ROOT/YYYY-MM-DD/emb, and
# builds on the newest earlier night that succeeded (--previous_index takes
# the newest successful manifest the glob matches; the first night finds
# none and embeds everything). Only new and changed documents are embedded;
# the night's manifest lists every file of the current index.
#
# A re-run of the same night (after a crash, or by hand) writes the same
# prefix again and gives the same result. The exit status is the job's:
# 0 published, 1 failed, 2 bad usage, 3 error rate over --max_error_rate,
# 4 another run is writing the same prefix; nothing is published unless 0.
set -euo pipefail

PROJECT_DIR="${PROJECT_DIR:-/opt/bert-zh-embed}"
CORPUS="${CORPUS:-/data/corpus/news/*.jsonl.gz}"
INDEX_ROOT="${INDEX_ROOT:-/data/index/news}"
MODEL="${MODEL:-/models/bert_zh_L-12_H-768_A-12}"
NIGHT="${NIGHT:-$(date -u +%Y-%m-%d)}"

cd "$PROJECT_DIR"
exec .venv/bin/python -m pipeline.run \
  --input "$CORPUS" \
  --output "$INDEX_ROOT/$NIGHT/emb" \
  --previous_index "$INDEX_ROOT/*/emb-manifest.json" \
  --model "$MODEL" \
  --dedup \
  --max_error_rate 0.01 \
  --sequence_dtype float16 \
  --parquet_compression zstd \
  --progress_interval 300
