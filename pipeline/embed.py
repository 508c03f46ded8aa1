"""Embedding a few texts in this process, exactly as a run would.

    from pipeline.embed import embed_texts
    vectors = embed_texts(["今天天气很好"], model="/models/bert_zh",
                          pooling="mean", normalize=True)     # [1, 768]
    query = embed_texts(["酒店服务"], index="out/news/emb-manifest.json")

For a notebook or a query at serving time: the same tokenizer (the model's
vocabulary and ``do_lower_case``, read as the launcher reads them, and the
pipeline's own ``TokenizeDocuments``), the same model handler
(``BertModelHandler.load_model`` / ``run_inference``, so precision and
padding are the pipeline's) and the same pooling (``transforms.pooling``).
With ``index=`` every setting comes from that run's manifest, and its model
fingerprint is recomputed and must equal the manifest's, so a query vector
is comparable with the index's vectors or refused (``IndexMismatch``).
A text longer than ``max_seq_length`` is truncated, or, when the settings
say ``long_text="chunk"``, embedded chunk by chunk and averaged as
``--document_vectors`` does.  Loaded models are kept (a few, per settings),
so repeated calls do not load again.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence

import numpy as np
from apache_beam.pvalue import TaggedOutput

from model.handles import resolve_model_path
from model.load import probe_encoder_layers
from model.variables import check_max_seq_length, infer_hidden_size
from model.vocab import load_vocab, tokenizer_settings_with_overrides
from pipeline.cli import UsageError
from pipeline.fingerprint import settings_fingerprint
from transforms.batch import BatchSettings, cut_batches
from transforms.embedding_files import manifest_of
from transforms.infer import BertModelHandler, InferSettings
from transforms.pooling import (DEFAULT_POOLING, check_pooling,
                                mean_of_vectors, needs_layers)
from transforms.records import Document, TokenizedDocument
from transforms.tokenize import TokenizeDocuments, TokenizeSettings

DEFAULT_MAX_SEQ_LENGTH = 128
DEFAULT_BATCH_SIZE = 32
DEFAULT_MAX_TOKENS_PER_BATCH = 2048
# Embedders (loaded models) kept per process, most recently used first.
_KEPT_EMBEDDERS = 2


class IndexMismatch(UsageError):
    """A query's model or settings differ from the index's: its vectors
    would not be comparable with the index's."""


def check_model_pooling(model_dir: str, pooling: str,
                        flag: str = "--pooling") -> None:
    """Raises ``UsageError`` (one line) when the model cannot give
    ``pooling``: ``first_last_avg`` needs a model that returns its layers'
    ``encoder_outputs`` (dict-interface encoders and the models
    ``model.export`` and ``model.convert`` write do; list-interface models
    such as TF Hub's ``bert_zh_L-12_H-768_A-12/1``, and models exported
    before this, do not)."""
    check_pooling(pooling)
    if needs_layers(pooling) and probe_encoder_layers(model_dir) < 1:
        raise UsageError(
            f"{flag} {pooling} needs a model that returns encoder_outputs "
            "(each layer's token vectors, as TF Hub's dict-interface BERT "
            "encoders and the models python -m model.convert writes do); "
            f"{model_dir} returns only pooled_output and sequence_output: "
            "use --pooling mean or cls")


@dataclasses.dataclass(frozen=True)
class EmbedSettings:
    """Everything that decides a text's vector (and how fast it is made):
    the run's tokenize, infer and batch stage settings.

    ``infer.model_dir`` as given (a directory, ``gs://`` path or TF Hub
    handle), with pooled vectors only and XLA off (a handful of texts would
    spend more time compiling each new shape than running it);
    ``vocab_file`` and ``do_lower_case`` as the launcher resolves them.
    """
    vocab_file: str
    do_lower_case: bool
    tokenize: TokenizeSettings
    infer: InferSettings
    batch: BatchSettings

    def fingerprint(self) -> str:
        """The model fingerprint of vectors made with these settings
        (``pipeline.fingerprint``), as the launcher computes it."""
        return settings_fingerprint(
            resolve_model_path(self.infer.model_dir), self.vocab_file,
            self.do_lower_case, self.tokenize, self.infer)

    def replaced(self, name: str, value: Any) -> "EmbedSettings":
        """These settings with the field ``name`` (of this class or of a
        stage's settings) set to ``value``; ``TypeError`` for a name none
        has.  ``max_seq_length`` is the tokenizer's, and the batches'
        width cap."""
        for stage in ("tokenize", "infer", "batch"):
            current = getattr(self, stage)
            if name in {f.name for f in dataclasses.fields(current)}:
                changed = dataclasses.replace(self, **{
                    stage: dataclasses.replace(current, **{name: value})})
                if name == "max_seq_length" and stage == "tokenize":
                    changed = dataclasses.replace(
                        changed, batch=dataclasses.replace(
                            changed.batch,
                            max_seq_length=changed.tokenize.max_seq_length))
                return changed
        if name in ("vocab_file", "do_lower_case"):
            return dataclasses.replace(self, **{name: value})
        raise TypeError(f"embed_texts() got an unexpected argument {name!r}")


def _stages(model_dir: str, max_seq_length: int, long_text: str,
            chunk_stride: Optional[int], pooling: str, normalize: bool,
            precision: str, engine: str, batch_size: int,
            max_tokens_per_batch: int = DEFAULT_MAX_TOKENS_PER_BATCH,
            int8_model: Optional[str] = None,
            intra_op_threads: Optional[int] = None,
            inter_op_threads: Optional[int] = None
            ) -> tuple[TokenizeSettings, InferSettings, BatchSettings]:
    """The tokenize, infer and batch settings of a few texts embedded in
    this process (each checked once, by its class)."""
    tokenize = TokenizeSettings(max_seq_length, long_text, chunk_stride)
    infer = InferSettings(model_dir, ("pooled",), precision, engine,
                          int8_model, pooling, normalize,
                          intra_op_threads=intra_op_threads,
                          inter_op_threads=inter_op_threads)
    batch = BatchSettings(batch_size, max_tokens_per_batch,
                          max_seq_length=tokenize.max_seq_length)
    return tokenize, infer, batch


def model_settings(model: Optional[str] = None,
                   max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH,
                   pooling: str = DEFAULT_POOLING, normalize: bool = False,
                   batch_size: int = DEFAULT_BATCH_SIZE,
                   vocab_file: Optional[str] = None,
                   do_lower_case: Optional[bool] = None,
                   long_text: str = "truncate",
                   chunk_stride: Optional[int] = None,
                   precision: str = "float32") -> EmbedSettings:
    """Settings for ``model`` (None: the demo model, random weights), its
    tokenizer read as the launcher reads it; raises ``UsageError`` or
    ``ModelFormatError`` (one line) for settings the model cannot take."""
    if model is None:
        from model.demo import ensure_demo_model
        model = ensure_demo_model()
    try:
        tokenize, infer, batch = _stages(
            model, max_seq_length, long_text, chunk_stride, pooling,
            normalize, precision, "auto", batch_size)
    except ValueError as err:
        raise UsageError(str(err)) from err
    check_max_seq_length(model, tokenize.max_seq_length, "max_seq_length")
    check_model_pooling(model, infer.pooling, "pooling")
    tokenizer = tokenizer_settings_with_overrides(model, vocab_file,
                                                  do_lower_case)
    return EmbedSettings(tokenizer.vocab_path, tokenizer.do_lower_case,
                         tokenize, infer, batch)


def read_index_manifest(index: str) -> tuple[str, dict[str, Any]]:
    """``(path, manifest)`` of a successful run; ``ManifestError`` (one
    line) when there is none or the run did not succeed."""
    from pipeline.manifest import (SUCCEEDED, ManifestError, read_manifest)
    path = manifest_of(index)
    manifest = read_manifest(path)
    if manifest.get("status") != SUCCEEDED or not manifest.get("index"):
        raise ManifestError(f"{path}: that run did not succeed "
                            f"({manifest.get('failure')}); it has no index")
    return path, manifest


def index_settings(manifest: dict[str, Any], model: Optional[str] = None,
                   batch_size: Optional[int] = None) -> EmbedSettings:
    """The settings of the run that wrote ``manifest`` (``model`` in place
    of its model when given; ``batch_size`` changes speed only).

    Runs written before ``--pooling`` existed read as ``cls``, not
    normalized; before the vocabulary's path was recorded, as the model's
    own vocabulary.
    """
    options = manifest["options"]
    model_dir = model or options["model_dir"]
    vocab_file = options.get("vocab_file") or None
    if model is not None and model != options["model_dir"]:
        vocab_file = None  # the given model's own vocabulary
    tokenizer = tokenizer_settings_with_overrides(
        model_dir, vocab_file, bool(options["do_lower_case"]))
    return EmbedSettings(
        tokenizer.vocab_path, tokenizer.do_lower_case, *_stages(
            model_dir, int(options["max_seq_length"]),
            options.get("long_text", "truncate"),
            options.get("chunk_stride"),
            options.get("pooling", DEFAULT_POOLING),
            bool(options.get("normalize", False)),
            options.get("precision", "float32"),
            options.get("engine", "tensorflow"),
            batch_size or int(options.get("batch_size", DEFAULT_BATCH_SIZE)),
            int(options.get("max_tokens_per_batch",
                            DEFAULT_MAX_TOKENS_PER_BATCH)),
            options.get("int8_model"), options.get("intra_op_threads"),
            options.get("inter_op_threads")))


def check_same_vectors(settings: EmbedSettings, manifest: dict[str, Any],
                       path: str) -> None:
    """Raises ``IndexMismatch`` (one line) unless ``settings`` make the
    vectors the index holds: same pooling and normalization, and the same
    model fingerprint (model weights, vocabulary and token settings)."""
    options = manifest["options"]
    stored = (options.get("pooling", DEFAULT_POOLING),
              bool(options.get("normalize", False)))
    pooling, normalize = settings.infer.pooling, settings.infer.normalize
    if (pooling, normalize) != stored:
        raise IndexMismatch(
            f"the index {path} holds pooling {stored[0]}"
            f"{' normalized' if stored[1] else ''} vectors, not "
            f"{pooling}{' normalized' if normalize else ''}"
            ": its vectors and the query's would not be comparable")
    expected = manifest.get("model_fingerprint")
    actual = settings.fingerprint()
    if actual != expected:
        raise IndexMismatch(
            f"model fingerprint {actual} of {settings.infer.model_dir} differs "
            f"from the index's {expected} ({path}): another model, "
            "vocabulary or token settings, or the model's files changed "
            "since the index was built")


class Embedder:
    """A loaded model with its tokenizer and pooling: ``embed(texts)``."""

    def __init__(self, settings: EmbedSettings) -> None:
        self.settings = settings
        vocab = load_vocab(settings.vocab_file)
        self.hidden_size = infer_hidden_size(
            resolve_model_path(settings.infer.model_dir), len(vocab))
        self._tokenize = TokenizeDocuments(vocab, settings.do_lower_case,
                                           settings.tokenize)
        self._tokenize.setup()
        self._handler = BertModelHandler(settings.infer, settings.batch)
        self._model = self._handler.load_model()

    def _tokens(self, index: int, text: str) -> list[TokenizedDocument]:
        """The text's model inputs (one per chunk); ``ValueError`` for a
        text without tokens or one the tokenizer refuses."""
        if not isinstance(text, str):
            raise TypeError(f"text {index} is a {type(text).__name__}, "
                            "not a str")
        out = list(self._tokenize.process(Document(str(index), text)))
        if not out:
            raise ValueError(f"text {index} has no tokens (empty or only "
                             "whitespace/control characters)")
        if isinstance(out[0], TaggedOutput):  # a dead letter
            raise ValueError(f"text {index}: {out[0].value.reason}")
        return out

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """``[len(texts), hidden]`` float32, row i the vector of texts[i]."""
        if isinstance(texts, str):
            raise TypeError("texts must be a list of str, not one str")
        settings = self.settings
        docs = [doc for i, text in enumerate(texts)
                for doc in self._tokens(i, text)]
        vectors: dict[str, list[tuple[int, np.ndarray]]] = {}
        batching = settings.batch
        for batch in cut_batches(docs, batching.batch_size,
                                 batching.max_tokens_per_batch,
                                 pad_to_steps=batching.pad_to_steps):
            for result in self._handler.run_inference(batch, self._model):
                row = result.inference
                vectors.setdefault(row.document_id, []).append(
                    (row.chunk_index, row.pooled_output))
        out = np.zeros((len(texts), self.hidden_size), dtype=np.float32)
        for i in range(len(texts)):
            chunks = [v for _, v in sorted(vectors[str(i)],
                                           key=lambda c: c[0])]
            out[i] = (chunks[0] if len(chunks) == 1
                      else mean_of_vectors(np.stack(chunks),
                                           settings.infer.normalize))
        return out


@functools.lru_cache(maxsize=_KEPT_EMBEDDERS)
def embedder(settings: EmbedSettings) -> Embedder:
    """The ``Embedder`` for ``settings``, loaded once per process (the last
    few settings are kept)."""
    return Embedder(settings)


def embed_texts(texts: Sequence[str], model: Optional[str] = None,
                max_seq_length: Optional[int] = None,
                pooling: Optional[str] = None,
                normalize: Optional[bool] = None,
                batch_size: Optional[int] = None,
                index: Optional[str] = None,
                **model_options: Any) -> np.ndarray:
    """The vectors of ``texts`` as ``[n, hidden]`` float32 (row i for
    texts[i]), made as a run with these settings makes ``pooled_output``.

    Without ``index``: ``model`` (None: the demo model, random weights),
    ``max_seq_length`` (128), ``pooling`` (``cls``), ``normalize`` (False),
    ``batch_size`` (32); ``model_options`` may add ``vocab_file``,
    ``do_lower_case``, ``long_text``, ``chunk_stride`` and ``precision``
    (see ``model_settings``).

    With ``index`` (a run's manifest or output prefix) every setting is
    that run's; a ``model``, ``max_seq_length``, ``pooling`` or
    ``normalize`` given as well must agree with it, else ``IndexMismatch``
    (the query's vectors would not be comparable with the index's).

    Raises ``ValueError`` for a text without tokens.
    """
    if index is None:
        settings = model_settings(
            model, max_seq_length or DEFAULT_MAX_SEQ_LENGTH,
            pooling or DEFAULT_POOLING, bool(normalize),
            batch_size or DEFAULT_BATCH_SIZE, **model_options)
    else:
        settings = settings_for_index(index, model, batch_size, pooling,
                                      normalize, max_seq_length,
                                      **model_options)
    return embedder(settings).embed(texts)


def settings_for_index(index: str, model: Optional[str] = None,
                       batch_size: Optional[int] = None,
                       pooling: Optional[str] = None,
                       normalize: Optional[bool] = None,
                       max_seq_length: Optional[int] = None,
                       **model_options: Any) -> EmbedSettings:
    """The settings of the run at ``index``, once the overrides given
    agree with them and the recomputed model fingerprint equals the
    manifest's; else ``IndexMismatch``."""
    path, manifest = read_index_manifest(index)
    settings = index_settings(manifest, model, batch_size)
    asked = dict(model_options, pooling=pooling, normalize=normalize,
                 max_seq_length=max_seq_length)
    for name, value in asked.items():
        if value is not None:
            settings = settings.replaced(name, value)
    check_same_vectors(settings, manifest, path)
    return settings
