"""int8 for the OpenVINO engine: post-training quantization, made offline.

    python -m model.quantize --model DIR --calibration corpus.jsonl \\
        [--samples 300] [--eval_samples 200] [--output DIR_int8]

Converts the SavedModel (through the engine's IR cache), calibrates NNCF's
post-training quantization (``nncf.quantize``, transformer model type,
SmoothQuant off) on ``--samples`` real documents tokenized exactly as the
pipeline does, then measures the int8 model against float32 on
``--eval_samples`` other documents (``model.accuracy``).  Activations are
quantized symmetrically first (NNCF's ``performance`` preset: no zero
points, 1.08-1.11x the real tokens/s of ``mixed`` on BERT-Base on an AMX
Xeon, bench/RESULTS.md); when that misses ``--min_cosine`` (default: the
int8 target, 0.99), asymmetrically (``mixed``).  A model that misses it
both ways is not written (exit 1).
Otherwise the IR and ``int8.json`` (the source model's digest, the
calibration data and settings, the measured accuracy, the OpenVINO and
NNCF versions) are written to a private directory and renamed into place:
``--output``, or by default the cache, where ``--precision int8`` finds it
for this model without ``--int8_model``.

NNCF is an optional extra (``pip install 'bert-zh-embed[int8]'``); only
this tool imports it.  Exit codes: 0 written, 1 accuracy missed or the
quantization failed, 2 bad usage.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import os
import random
import sys
from typing import Optional, Sequence

from model import console
from model.accuracy import read_texts
from model.errors import ModelFormatError, one_line
from model.self_check import ACCURACY_TARGETS, compare_engines, token_batches

_LOG = logging.getLogger(__name__)


# SmoothQuant (NNCF's default for transformers, alpha 0.95) moves
# activation outliers into the weights.  On BERT-Base it wrecked the
# documents real corpora hold that repeat one character ("！！！...",
# "1111..."): pooled cosine to float32 0.957 on three such reviews, 0.969
# over 250 random documents, against 0.998 and 0.998 without it (150
# calibration documents; the mean over the 250 rose from 0.99948 to
# 0.99960).
_SMOOTH_QUANT_OFF = -1

# NNCF presets in the order tried: the faster first, kept when accurate.
PRESETS = ("performance", "mixed")


class QuantizeError(RuntimeError):
    """Quantization ran but its result is not usable; one line."""


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m model.quantize",
        description="Post-training int8 quantization (OpenVINO + NNCF) of a "
                    "BERT SavedModel, calibrated on real text.")
    parser.add_argument("--model", required=True,
                        help="SavedModel directory (TF Hub BERT interface)")
    parser.add_argument("--calibration", action="append", required=True,
                        help="JSONL (or text) file or glob of real "
                             "documents; repeatable")
    parser.add_argument("--text_field", default="text")
    parser.add_argument("--samples", type=int, default=300,
                        help="documents to calibrate on")
    parser.add_argument("--eval_samples", type=int, default=200,
                        help="other documents to measure accuracy on")
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min_cosine", type=float,
                        default=ACCURACY_TARGETS["int8"],
                        help="lowest pooled and mean-pooled cosine to "
                             "float32 a model must keep to be written")
    parser.add_argument("--output", default=None,
                        help="directory to write (must not exist); default: "
                             "the cache, where --precision int8 finds it")
    return parser


def _split(texts: list[str], samples: int, eval_samples: int, seed: int
           ) -> tuple[list[str], list[str]]:
    """Disjoint seeded random calibration and evaluation sets."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    calibration = [texts[i] for i in order[:samples]]
    evaluation = [texts[i] for i in order[samples:samples + eval_samples]]
    return calibration, evaluation


def quantize(model_dir: str, calibration_files: Sequence[str],
             output: Optional[str] = None, samples: int = 300,
             eval_samples: int = 200, max_seq_length: int = 128,
             seed: int = 0, min_cosine: float = ACCURACY_TARGETS["int8"],
             text_field: str = "text") -> tuple[str, dict]:
    """Quantizes the SavedModel at ``model_dir`` and writes it (see the
    module docstring); returns the directory and its ``int8.json``.

    Raises ValueError/FileNotFoundError for bad arguments, QuantizeError
    when the result misses ``min_cosine``.
    """
    import nncf
    import numpy as np
    import openvino as ov
    from model import openvino_engine
    from model.handles import resolve_model_path
    from model.signature import INPUT_NAMES
    from model.variables import read_model_limits
    from model.vocab import load_vocab, read_tokenizer_settings
    model_dir = resolve_model_path(model_dir)
    digest = openvino_engine.model_digest(model_dir)
    output = output or openvino_engine.default_int8_dir(digest)
    if os.path.exists(output):
        raise ValueError(f"{output} already exists: delete it or pass "
                         "another --output")
    settings = read_tokenizer_settings(model_dir)
    if settings is None:
        raise ValueError(f"{model_dir} carries no vocab asset to tokenize "
                         "the calibration text with")
    texts = read_texts(calibration_files, text_field)
    if len(texts) < samples + eval_samples:
        raise ValueError(f"the calibration files hold {len(texts)} "
                         f"documents; --samples {samples} and "
                         f"--eval_samples {eval_samples} need more")
    calibration, evaluation = _split(texts, samples, eval_samples, seed)
    vocab = load_vocab(settings.vocab_path)
    # One document per calibration item, at its own length (the model's
    # shapes are dynamic).
    items = [dict(zip(INPUT_NAMES, b))
             for b in token_batches(calibration, vocab,
                                    settings.do_lower_case, max_seq_length,
                                    batch_size=1)]
    core = ov.Core()
    model, _ = openvino_engine.converted_model(model_dir, core)
    reference = openvino_engine.OpenVINOBertModel(
        model_dir, core.compile_model(
            model, "CPU", openvino_engine.compile_config("float32")),
        "float32")
    evaluation_batches = token_batches(
        evaluation, vocab, settings.do_lower_case, max_seq_length)
    misses = []
    for preset in PRESETS:
        quantized = _quantize(model.clone(), items, preset)
        candidate = openvino_engine.OpenVINOBertModel(
            model_dir, core.compile_model(
                quantized, "CPU", openvino_engine.compile_config("int8")),
            "int8")
        stats = compare_engines(reference, candidate, evaluation_batches)
        if stats.meets(min_cosine):
            break
        misses.append(f"{preset}: {stats.summary()}")
        _LOG.info("the %s preset misses --min_cosine %s (%s)", preset,
                  min_cosine, stats.summary())
    else:
        raise QuantizeError(
            f"the int8 model misses --min_cosine {min_cosine} against "
            f"float32 ({'; '.join(misses)}); nothing written")
    info = {
        "format": 1,
        "source_model": model_dir, "source_digest": digest,
        "openvino": openvino_engine.openvino_version(),
        "nncf": nncf.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"),
        "calibration": {"files": list(calibration_files),
                        "documents": len(items),
                        "max_seq_length": max_seq_length, "seed": seed,
                        "model_type": "transformer", "preset": preset,
                        "smooth_quant": False},
        "accuracy": {"reference": "openvino float32", "target": min_cosine,
                     **stats.to_dict()},
        # Read here, so that a worker running this model need not import
        # TensorFlow to read them (see openvino_engine.model_limits).
        "limits": dataclasses.asdict(read_model_limits(model_dir)),
        "mean_tokens_per_calibration_document": float(np.mean(
            [item["input_mask"].sum() for item in items])),
    }
    openvino_engine.save_ir(quantized, output, info,
                            openvino_engine.INT8_INFO_FILE)
    return output, info


def _quantize(model, items: list, preset: str):
    """``nncf.quantize`` of ``model`` on ``items`` with ``preset``
    (``performance``: symmetric activations; ``mixed``: asymmetric),
    SmoothQuant off."""
    import nncf
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters, AdvancedSmoothQuantParameters)
    presets = {"performance": nncf.QuantizationPreset.PERFORMANCE,
               "mixed": nncf.QuantizationPreset.MIXED}
    return nncf.quantize(
        model, nncf.Dataset(items), preset=presets[preset],
        model_type=nncf.ModelType.TRANSFORMER, subset_size=len(items),
        advanced_parameters=AdvancedQuantizationParameters(
            smooth_quant_alphas=AdvancedSmoothQuantParameters(
                matmul=_SMOOTH_QUANT_OFF)))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_arg_parser().parse_args(argv)
    console.setup_logging(verbose=True)  # its INFO lines say what it does
    try:
        import nncf  # noqa: F401  (the optional extra)
    except ImportError:
        print("error: model.quantize needs NNCF: pip install "
              "'bert-zh-embed[int8]'", file=sys.stderr)
        return 2
    try:
        output, info = quantize(
            args.model, args.calibration, args.output, args.samples,
            args.eval_samples, args.max_seq_length, args.seed,
            args.min_cosine, args.text_field)
    except (ValueError, FileNotFoundError, ModelFormatError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except QuantizeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    accuracy = info["accuracy"]
    print(f"int8 model: {output}")
    print(f"accuracy vs float32 on {accuracy['documents']} documents: pooled "
          f"cosine min {accuracy['pooled_cosine_min']:.6f}, mean-pooled min "
          f"{accuracy['mean_pooled_cosine_min']:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
