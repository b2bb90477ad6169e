"""The bundle format, numpy only: what :mod:`gnaq_dist.export` writes and :mod:`gnaq_dist.serving` reads.

Why a package of its own: the writer (which runs beside training), the edge reader and
:mod:`gnaq_dist.quant.packing` share one definition of the layout and of the packed-code
decoding, and none of them should pull in the others' dependencies. It imports only the
standard library and numpy.

Internal: the bundle's files are documented in docs/export.md; ``gnaq_dist.Bundle`` reads them.

Modules:

* :mod:`.layout`: file names, columns, format constants, bundle.json fields;
* :mod:`.codes`: the bit-packed code layout and its decoder.
"""

from gnaq_dist.bundle.codes import SUPPORTED_BITS, dequantize_codes, packed_row_bytes, unpack_bits
from gnaq_dist.bundle.layout import (
    BUNDLE_FORMAT,
    BUNDLE_JSON,
    BUNDLE_VERSION,
    FILE_COLUMNS,
    KINDS,
    KIND_FILES,
    LEVEL_DTYPES,
    OPTIONAL_FILES,
    SHARED_FILES,
    TABLE_FIELDS,
    body_digest,
    file_name,
)

__all__ = [
    "BUNDLE_FORMAT", "BUNDLE_JSON", "BUNDLE_VERSION", "FILE_COLUMNS", "KINDS", "KIND_FILES", "LEVEL_DTYPES",
    "OPTIONAL_FILES", "SHARED_FILES", "SUPPORTED_BITS", "TABLE_FIELDS", "body_digest", "dequantize_codes", "file_name",
    "packed_row_bytes", "unpack_bits",
]
