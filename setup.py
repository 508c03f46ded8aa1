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
    "tensorflow-text==2.21.1",
    "tensorflow-transform==1.21.0",
    "tfx-bsl==1.21.0",
    "pyarrow>=25,<26",
]

# Test-only: pytest; an independent BERT WordPiece implementation that our
# tokenizer is checked against; tensorflow-hub for resolving TF Hub handles
# from a pre-filled cache (it is optional at run time: install it to pass
# --model https://tfhub.dev/...) and, with tf_keras (Keras 2, which
# hub.KerasLayer needs on TF 2.16+), for fine-tuning exported models;
# tensorflow-hub imports pkg_resources (removed in setuptools 82).
# Plots: only ``python -m pipeline.analyze`` draws one (its token-length
# histogram); without matplotlib it writes the JSON report and says so.
PLOTS = ["matplotlib==3.11.2"]

TEST = ["pytest==9.2.0", "tokenizers==0.23.3", "tensorflow-hub==0.16.1",
        "tf_keras==2.21.0", "setuptools==80.10.2"] + PLOTS

setuptools.setup(
    name="bert-zh-embed",
    version="0.1.0",
    description="Batch BERT embeddings for Chinese text on Apache Beam",
    python_requires=">=3.10,<3.13",
    packages=setuptools.find_packages(include=["pipeline", "pipeline.*",
                                               "transforms", "transforms.*",
                                               "model", "model.*"]),
    install_requires=REQUIRED,
    extras_require={"test": TEST, "plots": PLOTS},
)
