"""Serve a teacher as a label-only HTTP black box (the other end of :class:`~zsdb3kd.oracle.HttpOracle`).

Lets a team expose a model across a trust boundary without handing over weights or
logits, and lets anyone rehearse a distillation against a real network endpoint:
``zsdb3kd serve teacher.safetensors --port 8000``, then ``--teacher http://host:8000``.
The protocol ``zsdb3kd-labels/1``, the limits and running behind TLS: ``docs/server.md``.

* :mod:`.settings`: :class:`ServeSettings` (every option, with its default);
* :mod:`.usage`: API keys, per-key quotas, the persistent usage store and replay cache;
* :mod:`.app`: the endpoints (Starlette);
* :mod:`.run`: uvicorn with the connection limits, :func:`serve` and :class:`LabelServer`.

Only :mod:`.settings` is imported here; the server itself needs the ``serve`` extra
(uvicorn, starlette) and says so with an ``ImportError`` when it is missing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .settings import ServeSettings

if TYPE_CHECKING:
    from .run import LabelServer, make_server, serve, serve_forever

__all__ = ["LabelServer", "ServeSettings", "make_server", "serve", "serve_forever"]


def __getattr__(name: str):
    if name in ("LabelServer", "make_server", "serve", "serve_forever"):
        from . import run

        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
