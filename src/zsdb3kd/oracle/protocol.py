"""The wire format of ``zsdb3kd-labels/1``: images as base64 float32 in JSON."""

from __future__ import annotations

import base64
import math

import torch

PROTOCOL = "zsdb3kd-labels/1"


def encode_images(x: torch.Tensor) -> dict:
    """The JSON body of a ``POST /predict``: shape, dtype and base64 of little-endian float32 bytes."""
    arr = x.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False)
    return {"shape": list(arr.shape), "dtype": "float32", "data": base64.b64encode(arr.tobytes()).decode("ascii")}


def decode_images(body: dict) -> torch.Tensor:
    """Inverse of :func:`encode_images`; raises ``ValueError`` on a malformed body."""
    import numpy as np

    if not isinstance(body, dict) or not {"shape", "data"} <= body.keys():
        raise ValueError('body must be a JSON object with "shape" and "data" (base64 float32)')
    if body.get("dtype", "float32") != "float32":
        raise ValueError(f'dtype must be "float32", got {body.get("dtype")!r}')
    shape = body["shape"]
    if not (isinstance(shape, list) and len(shape) == 4 and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise ValueError(f'"shape" must be [B, C, H, W] of non-negative ints, got {shape!r}')
    try:
        raw = base64.b64decode(body["data"], validate=True)
    except (ValueError, TypeError) as e:
        raise ValueError(f'"data" is not valid base64: {e}') from None
    if len(raw) != 4 * math.prod(shape):
        raise ValueError(f'"data" holds {len(raw)} bytes; shape {shape} in float32 needs {4 * math.prod(shape)}')
    return torch.from_numpy(np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(shape))


