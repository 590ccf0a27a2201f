"""The wire format of ``zsdb3kd-labels/1``: images as base64 float32 in JSON.

Both ends share these definitions: :func:`encode_images` (client), :func:`decode_images`
(server, which treats every body as hostile), the request-id header that makes a retried
``POST /predict`` free (:data:`IDEMPOTENCY_HEADER`) and the largest body a batch of
``max_batch`` images can need (:func:`max_body_bytes`). See ``docs/server.md``.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re

import torch

PROTOCOL = "zsdb3kd-labels/1"

#: request header naming one logical ``POST /predict``: a retry carries the same value, and
#: the server answers a value it has already answered from its cache without billing again
IDEMPOTENCY_HEADER = "Idempotency-Key"

#: what a request id may look like (a uuid4 hex from :class:`~zsdb3kd.oracle.HttpOracle`)
REQUEST_ID = re.compile(r"[A-Za-z0-9_.:-]{8,128}")


def encode_images(x: torch.Tensor) -> dict:
    """The JSON body of a ``POST /predict``: shape, dtype and base64 of little-endian float32 bytes."""
    arr = x.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False)
    return {"shape": list(arr.shape), "dtype": "float32", "data": base64.b64encode(arr.tobytes()).decode("ascii")}


def encode_body(x: torch.Tensor) -> bytes:
    """``json.dumps(encode_images(x)).encode()``, byte for byte, without the JSON encoder scanning
    the base64 text (which needs no escaping): most of the client's work per request."""
    arr = x.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False)
    head = json.dumps({"shape": list(arr.shape), "dtype": "float32"})[:-1].encode()
    return head + b', "data": "' + base64.b64encode(arr.tobytes()) + b'"}'


def max_body_bytes(max_batch: int, input_shape: tuple[int, ...]) -> int:
    """The largest ``POST /predict`` body that can hold ``max_batch`` images of ``input_shape``
    (base64 of float32 plus a little JSON); the server refuses longer bodies unread."""
    return 4 * -(-4 * max_batch * math.prod(input_shape) // 3) + 1024


def _is_dim(d: object) -> bool:
    return type(d) is int and 0 <= d < 2**31  # bool is an int subclass: ``true`` is not a dimension


def decode_shape(body: object) -> list[int]:
    """The ``[B, C, H, W]`` of a ``POST /predict`` body, checked before its data is decoded."""
    if not isinstance(body, dict) or not {"shape", "data"} <= body.keys():
        raise ValueError('body must be a JSON object with "shape" and "data" (base64 float32)')
    if body.get("dtype", "float32") != "float32":
        raise ValueError(f'dtype must be "float32", got {str(body.get("dtype"))[:40]!r}')
    shape = body["shape"]
    if not (isinstance(shape, list) and len(shape) == 4 and all(map(_is_dim, shape))):
        raise ValueError(f'"shape" must be [B, C, H, W] of non-negative ints, got {str(shape)[:80]}')
    return shape


def decode_images(body: dict) -> torch.Tensor:
    """Inverse of :func:`encode_images`; raises ``ValueError`` on a malformed body."""
    import numpy as np

    shape = decode_shape(body)
    data = body["data"]
    if not isinstance(data, str):
        raise ValueError(f'"data" must be a base64 string, got {type(data).__name__}')
    needed = 4 * math.prod(shape)
    if len(data) != 4 * -(-needed // 3):  # checked before decoding: no work for a wrong length
        raise ValueError(f'"data" holds {len(data) * 3 // 4} bytes; shape {shape} in float32 needs {needed}')
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f'"data" is not valid base64: {e}') from None
    if len(raw) != needed:
        raise ValueError(f'"data" holds {len(raw)} bytes; shape {shape} in float32 needs {needed}')
    return torch.from_numpy(np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(shape))
