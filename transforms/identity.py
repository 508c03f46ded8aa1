"""Document identity: content hashes and ids derived from source and content.

A document's id comes from ``--id_field`` when the record has one.  When it
has none (plain text lines, or records without the field), the id is derived
from the file's base name and the text: ``<file name>:<first 16 hex digits
of the content hash>``.  Unlike a line number, that id does not change when a
line is inserted above the document, so an incremental run recognises the
document as unchanged; identical lines in one file share an id (``--dedup``
embeds them once).

``content_hash`` is BLAKE2b-128 of the text's UTF-8 bytes (32 hex digits):
an incremental run compares it with the previous index to decide whether a
document changed, and ``--dedup`` groups by it.
"""

from __future__ import annotations

import hashlib
import posixpath

# Hex digits of the content hash that go into a derived id (64 bits: a
# collision inside one file is not a practical concern).
DERIVED_ID_HASH_CHARS = 16


def content_hash(text: str) -> str:
    """The hex BLAKE2b-128 digest of ``text``'s UTF-8 bytes.

    ``surrogatepass`` keeps the function total: a text holding unpaired
    surrogates (rejected by the reader) would otherwise raise here.
    """
    data = text.encode("utf-8", errors="surrogatepass")
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def source_name(path: str) -> str:
    """The file name of ``path`` (local or ``scheme://`` paths alike)."""
    return posixpath.basename(path.replace("\\", "/"))


def derived_id(path: str, text_hash: str) -> str:
    """``<file name>:<hash prefix>``: a stable id for a record without one."""
    return f"{source_name(path)}:{text_hash[:DERIVED_ID_HASH_CHARS]}"
