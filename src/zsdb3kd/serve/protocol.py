"""The label server's HTTP/1.1 connections: uvicorn's h11 protocol with the limits a trust boundary needs.

Four additions to uvicorn's ``H11Protocol`` (:func:`protocol_class`):

* a header timeout: a connection that has not sent a whole request line and headers within
  ``header_timeout`` of opening, or of its previous answer, is closed (no slowloris);
* a connection cap: beyond ``max_connections`` a new connection is answered 503 with
  ``Retry-After: 1`` and closed (beyond twice the cap, closed at once);
* JSON for malformed requests (uvicorn answers plain text);
* a lingering close: the server half-closes and reads what the client is still sending for
  up to 2 s, so a client sending a body that was refused unread can read its 401 or 413
  instead of a connection reset.
"""

from __future__ import annotations

import json

from .settings import ServeSettings

_LINGER_S = 2.0


def _json_response(status: int, reason: str, message: str, extra: str = "") -> bytes:
    body = json.dumps({"error": message}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"{extra}connection: close\r\n\r\n")
    return head.encode() + body


class _Transport:
    """The connection's transport, whose ``close`` lingers (see the module docstring)."""

    def __init__(self, real, protocol) -> None:
        self._real, self._protocol = real, protocol

    def __getattr__(self, name):
        return getattr(self._real, name)

    def close(self) -> None:
        self._protocol._linger()

    def is_closing(self) -> bool:
        return self._protocol._closing or self._real.is_closing()


def protocol_class(settings: ServeSettings):
    """uvicorn's h11 protocol with the limits of ``settings`` (see the module docstring)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    refused = _json_response(503, "Service Unavailable", "too many connections; retry shortly", "retry-after: 1\r\n")
    malformed = _json_response(400, "Bad Request", "malformed HTTP request (request line or headers unreadable, or "
                                                   f"longer than {settings.max_header_bytes} bytes)")

    class GuardedH11(H11Protocol):
        def connection_made(self, transport) -> None:
            self._real = transport
            self._closing = self._force = False
            self._header_timer = self._linger_timer = None
            super().connection_made(_Transport(transport, self))
            open_now = len(self.connections)
            if open_now > settings.max_connections:
                self._force = open_now > 2 * settings.max_connections  # a flood: no lingering
                transport.write(refused)
                self._linger()
                return
            self._arm()

        # -- header timeout -------------------------------------------------------------
        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(settings.header_timeout, self._header_timeout)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timeout(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE:
                self._force = True
                self._linger()

        def data_received(self, data: bytes) -> None:
            if self._closing:  # lingering: what the client still sends is read and dropped
                return
            super().data_received(data)
            if self._header_timer is not None and self.conn.their_state is not h11.IDLE:
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self._closing and self.conn.their_state is h11.IDLE:
                self._arm()

        # -- closing ----------------------------------------------------------------------
        def _linger(self) -> None:
            if self._closing:
                return
            self._closing = True
            self._disarm()
            self._unset_keepalive_if_required()
            real = self._real
            if self._force or real.is_closing() or not real.can_write_eof():
                real.close()
                return
            real.write_eof()
            real.resume_reading()
            self._linger_timer = self.loop.call_later(_LINGER_S, real.close)

        def eof_received(self) -> None:
            self._real.close()

        def connection_lost(self, exc) -> None:
            self._disarm()
            if self._linger_timer is not None:
                self._linger_timer.cancel()
            self._closing = True
            super().connection_lost(exc)

        def shutdown(self) -> None:
            self._force = True
            super().shutdown()

        def send_400_response(self, msg: str) -> None:
            if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE) and not self._closing:
                self._real.write(malformed)
            self._linger()

    return GuardedH11
