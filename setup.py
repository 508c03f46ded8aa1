"""Packaging for bert-zh-embed: local installs and remote Beam workers.

Dataflow (and other remote runners) install the project on each worker with
``--setup_file ./setup.py``, which ships ``pipeline``, ``transforms`` and
``model`` and their runtime dependencies.
"""

import setuptools

# Runtime dependencies, pinned to a set that resolves together on Python 3.11
# (constraints.txt pins every transitive package for reproducible installs).
REQUIRED = [
    "apache-beam[gcp]==2.77.0",
    "tensorflow==2.21.0",
    "tensorflow-transform==1.21.0",
    "tfx-bsl==1.21.0",
    "pyarrow>=25,<26",
    # The CPU inference engine (model.openvino_engine); it reads the
    # SavedModel itself, so users still bring a TF SavedModel.
    "openvino==2026.4.1",
]

# Optional: int8 quantization (python -m model.quantize); runs do not need
# it, they read the int8 model it writes with OpenVINO alone.
INT8 = ["nncf==3.4.0"]

# Test-only: pytest; an independent BERT WordPiece implementation that our
# tokenizer is checked against; tensorflow-hub for resolving TF Hub handles
# from a pre-filled cache (it is optional at run time: install it to pass
# --model https://tfhub.dev/...) and, with tf_keras (Keras 2, which
# hub.KerasLayer needs on TF 2.16+), for fine-tuning exported models;
# tensorflow-hub imports pkg_resources (removed in setuptools 82); NNCF so
# the quantize tool is tested; DuckDB and Polars, to check that tools other
# than ours read the outputs.
# Plots: only ``python -m pipeline.analyze`` draws one (its token-length
# histogram); without matplotlib it writes the JSON report and says so.
PLOTS = ["matplotlib==3.11.2"]

TEST = ["pytest==9.2.0", "tokenizers==0.23.3", "tensorflow-hub==0.16.1",
        "tf_keras==2.21.0", "setuptools==80.10.2", "duckdb==2.0.1",
        "polars==2.1.0", *INT8, *PLOTS]

# Benchmarks (bench/): the chart of bench.throughput, and the peer it is
# measured against, Hugging Face transformers on PyTorch (pinned: an
# unpinned torch pulls a multi-GB CUDA build).
BENCH = [*PLOTS, "torch==2.13.0", "transformers==5.24.0"]

setuptools.setup(
    name="bert-zh-embed",
    version="0.1.0",
    description="Batch BERT embeddings for Chinese text on Apache Beam",
    python_requires=">=3.10,<3.13",
    packages=setuptools.find_packages(include=["pipeline", "pipeline.*",
                                               "transforms", "transforms.*",
                                               "model", "model.*"]),
    install_requires=REQUIRED,
    extras_require={"test": TEST, "bench": BENCH, "int8": INT8,
                    "plots": PLOTS},
)
