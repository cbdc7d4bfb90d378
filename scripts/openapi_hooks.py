"""Schemathesis hooks for scripts/check-openapi.sh (loaded through SCHEMATHESIS_HOOKS).

`POST /v1/sync/batches` takes a protobuf body, which schemathesis cannot generate from a schema:
it gets arbitrary bytes, and a few encodings of real `EdgeBatch` fields, none of which may make
the edge answer anything but a documented status.
"""

from hypothesis import strategies as st

import schemathesis


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field (wire type 2) with a one-byte length."""
    return bytes([number << 3 | 2, len(payload)]) + payload


_BATCH_ID = st.text(alphabet="abcdef0123456789-:", min_size=0, max_size=40).map(str.encode)
_TRACE = st.binary(max_size=60).map(lambda body: _field(2, body))
_EDGE_BATCH = st.tuples(_BATCH_ID, st.lists(_TRACE, max_size=3)).map(
    lambda parts: _field(1, parts[0]) + b"".join(parts[1])
)

schemathesis.openapi.media_type("application/x-protobuf", st.one_of(st.binary(max_size=2048), _EDGE_BATCH))
