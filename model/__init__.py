"""The BERT model: loading, conversion, export and TensorFlow settings."""

# A local worker process of a quiet run hides TensorFlow's native start-up
# lines too (see model.native_log); standard library only, nothing else.
from model import native_log as _native_log

_native_log.install_from_environment()
