"""The model handler the job uses: BERT inference that keeps row metadata.

``transforms.infer.BertModelHandler`` builds each ``DocumentEmbedding`` from
the model's outputs and the document's id and chunk fields.  The output rows
also need the document's content hash (always) and its text (with
``--write_text``), which ride along on the ``TokenizedDocument``; this
subclass copies them onto each result, so no join of the (large) embedding
rows with the documents is needed after inference.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Optional, Sequence

from apache_beam.ml.inference.base import PredictionResult

from model.load import BertSavedModel
from transforms.infer import BertModelHandler
from transforms.records import TokenizedDocument


class RowMetadataModelHandler(BertModelHandler):
    """``BertModelHandler`` whose results carry ``content_hash`` and
    ``text`` from the tokenized document they came from."""

    def run_inference(self, batch: Sequence[TokenizedDocument],
                      model: BertSavedModel,
                      inference_args: Optional[dict[str, Any]] = None
                      ) -> Iterable[PredictionResult]:
        for result in super().run_inference(batch, model, inference_args):
            doc: TokenizedDocument = result.example
            yield PredictionResult(doc, dataclasses.replace(
                result.inference, content_hash=doc.content_hash,
                text=doc.text), result.model_id)
