"""Export a ``BertEncoder`` as a SavedModel with the TF Hub BERT interface.

The exported root object behaves like TF Hub's ``bert_zh_L-12_H-768_A-12``:

* ``model([input_word_ids, input_mask, segment_ids])`` -> ``[pooled_output,
  sequence_output]`` (int32 inputs of shape [batch, seq]);
* ``model.vocab_file`` is a ``tf.saved_model.Asset`` holding ``vocab.txt``;
* ``model.do_lower_case`` is a non-trainable bool ``tf.Variable``;
* a ``serving_default`` signature takes keyword inputs and returns a dict:
  ``pooled_output``, ``sequence_output`` and ``encoder_outputs``, every
  transformer layer's token outputs (first layer first, as TF Hub's
  dict-interface encoders return them; ``--pooling first_last_avg`` needs
  them), stacked into one ``[num_layers, batch, seq, hidden]`` tensor,
  since a signature's outputs are tensors, not lists.  Consumers that
  fetch outputs by name (TF Serving, OpenVINO's conversion here) compute
  only what they ask for.

The root call keeps its ``input_signature`` (one trace for every batch
shape): a call without one would be traced again, once per input shape,
after loading.

Code written against the Hub model therefore works unchanged on models
exported here, and vice versa.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from typing import Sequence

import numpy as np
import tensorflow as tf

from model.bert import CONFIG_FILENAME, BertConfig, BertEncoder
from model.signature import ENCODER_OUTPUTS, INPUT_NAMES
from model.vocab import VOCAB_FILENAME, load_vocab

_INPUT_SPECS = [tf.TensorSpec([None, None], tf.int32, name=n) for n in INPUT_NAMES]
_TRAINING_SPEC = tf.TensorSpec([], tf.bool, name="training")


class _HubBertModule(tf.Module):
    """Root object of the exported SavedModel (TF Hub BERT interface).

    Besides the call and the assets it carries what TF Hub's reusable
    SavedModel API asks of a fine-tunable model, so that
    ``hub.KerasLayer(path, trainable=True)`` trains the encoder:
    ``variables`` and ``trainable_variables`` (the encoder's weights, saved
    as plain lists because ``tf.Module``'s properties of those names are
    not saved), ``regularization_losses`` (none) and a ``training``
    argument on ``__call__``.
    """

    # Plain attributes instead of tf.Module's computed properties, so that
    # they are written into the SavedModel and exist after loading.
    variables = None
    trainable_variables = None

    def __init__(self, encoder: BertEncoder, vocab_path: str,
                 do_lower_case: bool) -> None:
        """Attach the encoder, the vocab asset and the lower-casing flag."""
        super().__init__(name="bert_model")
        self.encoder = encoder
        self.vocab_file = tf.saved_model.Asset(vocab_path)
        self.do_lower_case = tf.Variable(do_lower_case, trainable=False,
                                         dtype=tf.bool, name="do_lower_case")
        # A variable's checkpoint key is its shortest path from the root,
        # the first one found on a tie.  The lists below put every weight
        # one step from the root, so this dict (also one step, and assigned
        # first) keeps Google's names in the keys (``bert_weights/bert.S
        # embeddings.Sword_embeddings/...``) instead of ``variables/0``:
        # readers such as model.variables.infer_hidden_size look for them.
        self.bert_weights = dict(encoder.weight_variables)
        # The call reads only the encoder's weights (do_lower_case is
        # metadata for the tokenizer), and all of them are trainable.
        self.variables = list(encoder.weight_variables.values())
        self.trainable_variables = list(encoder.weight_variables.values())
        self.regularization_losses = []

    @tf.function(input_signature=[_INPUT_SPECS, _TRAINING_SPEC])
    def __call__(self, inputs: list[tf.Tensor],
                 training: bool = False) -> list[tf.Tensor]:
        """Hub-style call: list of 3 int32 tensors -> [pooled, sequence].

        ``training`` is accepted as the reusable SavedModel API requires (a
        bool tensor, so one trace serves both modes); the encoder has no
        dropout, so both modes compute the same.
        """
        del training  # same computation in both modes (no dropout)
        input_word_ids, input_mask, segment_ids = inputs
        pooled, sequence = self.encoder(input_word_ids, input_mask, segment_ids)
        return [pooled, sequence]

    @tf.function(input_signature=_INPUT_SPECS)
    def serve(self, input_word_ids: tf.Tensor, input_mask: tf.Tensor,
              segment_ids: tf.Tensor) -> dict[str, tf.Tensor]:
        """Keyword-input serving signature returning named outputs;
        ``encoder_outputs`` stacked ``[num_layers, batch, seq, hidden]``."""
        pooled, sequence, layers = self.encoder.encode(
            input_word_ids, input_mask, segment_ids)
        return {"pooled_output": pooled, "sequence_output": sequence,
                ENCODER_OUTPUTS: tf.stack(layers)}


def _write_vocab(tokens: Sequence[str], path: str) -> None:
    """Write one token per line (UTF-8), rejecting tokens that would break
    the line-based format."""
    for index, token in enumerate(tokens):
        if not isinstance(token, str) or not token or "\n" in token or "\r" in token:
            raise ValueError(f"Invalid vocab token at index {index}: {token!r}")
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(token + "\n" for token in tokens))


def _check_vocab_size(size: int, config: BertConfig) -> None:
    """Fail early if the vocab does not match the embedding table."""
    if size != config.vocab_size:
        raise ValueError(f"Vocab has {size} entries but config.vocab_size is "
                         f"{config.vocab_size}")


def _build_encoder(config: BertConfig, seed: int,
                   weights: dict[str, np.ndarray] | None) -> BertEncoder:
    """Random-initialised encoder, overwritten by ``weights`` if given."""
    encoder = BertEncoder(config, seed=seed, name="bert_encoder")
    if weights is not None:
        encoder.set_weights(weights)
    return encoder


def _save(module: _HubBertModule, config: BertConfig, target: str) -> None:
    """Write the SavedModel plus ``assets.extra/bert_config.json``."""
    signatures = {"serving_default": module.serve.get_concrete_function()}
    tf.saved_model.save(module, target, signatures=signatures)
    extra = os.path.join(target, "assets.extra")
    os.makedirs(extra, exist_ok=True)
    with open(os.path.join(extra, CONFIG_FILENAME), "w", encoding="utf-8") as f:
        f.write(config.to_json())


def _make_staging_dir(export_dir: str) -> str:
    """Create a unique hidden sibling of ``export_dir`` to build into.

    Unlike ``tempfile.mkdtemp`` (mode 0700) this honours the umask, so the
    renamed export gets normal permissions, e.g. in a shared cache.
    """
    base = os.path.basename(export_dir)
    staging = os.path.join(os.path.dirname(export_dir),
                           f".{base}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.mkdir(staging)
    return staging


def export_bert_saved_model(
    export_dir: str,
    config: BertConfig,
    vocab: Sequence[str] | str,
    do_lower_case: bool = True,
    seed: int = 0,
    weights: dict[str, np.ndarray] | None = None,
) -> str:
    """Export a BERT encoder as a TF Hub-compatible SavedModel.

    The model is written to a temporary sibling directory and renamed into
    place only when complete, so readers never observe a half-written model.

    Args:
      export_dir: destination; must not exist yet.
      config: encoder architecture.
      vocab: list of tokens (written to ``vocab.txt``) or path to an
        existing vocab file; its length must equal ``config.vocab_size``.
      do_lower_case: value stored in the ``do_lower_case`` variable.
      seed: seed of the random initialisation (ignored if ``weights``).
      weights: optional weights keyed by Google checkpoint names.

    Returns:
      ``export_dir`` as an absolute path.

    Raises:
      ValueError: vocab size mismatch, bad tokens or bad weights.
      FileExistsError: ``export_dir`` already exists (possibly created by a
        concurrent exporter).
    """
    export_dir = os.path.abspath(export_dir)
    if os.path.exists(export_dir):
        raise FileExistsError(f"Export directory already exists: {export_dir}")
    parent = os.path.dirname(export_dir)
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bert_vocab_") as vocab_dir:
        # The asset keeps its file name, so always stage it as vocab.txt.
        vocab_path = os.path.join(vocab_dir, VOCAB_FILENAME)
        if isinstance(vocab, (str, os.PathLike)):
            shutil.copyfile(vocab, vocab_path)
        else:
            _write_vocab(list(vocab), vocab_path)
        _check_vocab_size(len(load_vocab(vocab_path)), config)
        module = _HubBertModule(_build_encoder(config, seed, weights),
                                vocab_path, do_lower_case)
        staging = _make_staging_dir(export_dir)
        try:
            _save(module, config, staging)
            os.rename(staging, export_dir)
        except OSError as err:
            shutil.rmtree(staging, ignore_errors=True)
            if os.path.exists(export_dir):
                raise FileExistsError(
                    f"Export directory already exists: {export_dir}") from err
            raise
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return export_dir
