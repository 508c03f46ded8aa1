"""How far a reduced precision moves the embeddings from float32, on real
documents:

    python -m model.accuracy --model DIR --corpus 'corpus/*.jsonl' \\
        [--precision bfloat16|int8] [--int8_model DIR] [--docs 1000]

The command line compares TensorFlow float32 (the SavedModel as the
pipeline has always run it) with an OpenVINO precision, or with the
bfloat16 re-trace that GPU workers run (``--engine tensorflow``), on real
documents tokenized exactly as the pipeline does, with
``model.self_check.compare_engines`` (the comparison workers run at load).
``read_texts`` reads the documents (``model.quantize`` calibrates on it).
"""

from __future__ import annotations

import argparse
import glob
import json
import random
import sys
from typing import Optional, Sequence

from model.self_check import (ACCURACY_TARGETS, Model, compare_engines,
                              token_batches)


def read_texts(patterns: Sequence[str], text_field: str = "text",
               limit: Optional[int] = None, seed: int = 0) -> list[str]:
    """Texts of local JSONL files (``text_field``) or text files (a line
    each) matching ``patterns``; with ``limit``, a seeded random sample of
    that many, in file order."""
    texts: list[str] = []
    paths = sorted({p for pattern in patterns for p in glob.glob(pattern)})
    if not paths:
        raise FileNotFoundError(f"no files match {', '.join(patterns)}")
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if not line.strip():
                    continue
                if path.endswith((".jsonl", ".json", ".ndjson")):
                    value = json.loads(line).get(text_field)
                    if isinstance(value, str) and value.strip():
                        texts.append(value)
                else:
                    texts.append(line.rstrip("\n"))
    if limit is not None and limit < len(texts):
        keep = sorted(random.Random(seed).sample(range(len(texts)), limit))
        texts = [texts[i] for i in keep]
    return texts


# --- command line ------------------------------------------------------------


def _candidate(args: argparse.Namespace) -> Model:
    """The model to measure, as the run would load it."""
    if args.engine == "tensorflow":
        from model.bf16_graph import load_bfloat16_model
        return load_bfloat16_model(args.model)
    from model import openvino_engine
    return openvino_engine.load_openvino_model(
        args.model, args.precision, int8_model=args.int8_model)


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m model.accuracy",
        description="Cosine of a reduced precision's embeddings to "
                    "TensorFlow float32 on real documents.")
    parser.add_argument("--model", required=True,
                        help="SavedModel directory (TF Hub BERT interface)")
    parser.add_argument("--corpus", action="append", required=True,
                        help="JSONL or text file or glob; repeatable")
    parser.add_argument("--text_field", default="text")
    parser.add_argument("--engine", default="openvino",
                        choices=("openvino", "tensorflow"),
                        help="openvino: the CPU engine at --precision; "
                             "tensorflow: the bfloat16 re-trace GPU "
                             "workers run (computed here on the CPU)")
    parser.add_argument("--precision", default="bfloat16",
                        choices=("float32", "bfloat16", "int8"))
    parser.add_argument("--int8_model", default=None)
    parser.add_argument("--docs", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_seq_length", type=int, default=128)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Prints the stats as JSON; exit 0 when the precision meets its
    target, 1 when it does not, 2 on bad usage."""
    args = build_arg_parser().parse_args(argv)
    if args.engine == "tensorflow" and args.precision != "bfloat16":
        print("error: --engine tensorflow measures the bfloat16 re-trace "
              "only", file=sys.stderr)
        return 2
    from model.load import load_bert_saved_model
    from model.vocab import load_vocab, read_tokenizer_settings
    settings = read_tokenizer_settings(args.model)
    if settings is None:
        print(f"error: {args.model} has no vocab asset", file=sys.stderr)
        return 2
    texts = read_texts(args.corpus, args.text_field, args.docs, args.seed)
    batches = token_batches(texts, load_vocab(settings.vocab_path),
                            settings.do_lower_case, args.max_seq_length)
    stats = compare_engines(load_bert_saved_model(args.model),
                            _candidate(args), batches)
    target = ACCURACY_TARGETS.get(args.precision, 1.0 - 1e-6)
    print(json.dumps({"engine": args.engine, "precision": args.precision,
                      "target": target, "meets_target": stats.meets(target),
                      **stats.to_dict()}, indent=2))
    return 0 if stats.meets(target) else 1


if __name__ == "__main__":
    sys.exit(main())
