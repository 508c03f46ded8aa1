"""The BERT model.

Runtime (what workers and launchers run): ``handles`` (where a model is),
``signature`` (its saved_model.pb and call interface), ``variables`` (its
table sizes and flags), ``vocab`` (its vocabulary), ``load`` (loading and
calling it with checked inputs), ``engines`` with ``openvino_engine`` and
``bf16_graph``, ``self_check``, ``runtime`` (threads, hardware, caches),
``files``, ``errors``, ``bert`` (the encoder), ``native_log`` and
``console``.  Tooling (commands that build, convert, quantize or measure
models): ``export``, ``demo``, ``convert``, ``quantize``, ``accuracy``.
Tooling imports runtime, never the reverse (tests/test_model_layers.py).
"""

# A local worker process of a quiet run hides TensorFlow's native start-up
# lines too (see model.native_log); standard library only, nothing else.
from model import native_log as _native_log

_native_log.install_from_environment()
