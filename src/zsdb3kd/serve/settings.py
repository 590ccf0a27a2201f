"""The label server's settings (``zsdb3kd serve --help`` is generated from them)."""

from __future__ import annotations

from pydantic import Field

from ..settings import Settings


class ServeSettings(Settings):
    """Label server: where it listens, whom it answers, how much, and its limits."""

    host: str = Field("127.0.0.1", description="address to bind (0.0.0.0: every interface; put a TLS reverse "
                                               "proxy in front, see docs/server.md)")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on (0 picks a free one)")
    max_queries: int | None = Field(None, ge=0, description="quota of every key that the keys file gives none: "
                                                            "images answered, kept in --state; a request that would "
                                                            "pass it is refused whole")
    max_batch: int = Field(1024, ge=1, description="most images in one request")
    log: bool = Field(False, description="log every request to stderr")
    keys: str | None = Field(None, description="TOML file of API keys ([keys.NAME] token_sha256 = ..., "
                                               "max_queries = ...), besides ZSDB3KD_SERVE_TOKEN")
    state: str | None = Field(None, description="SQLite file keeping each key's usage and the replay cache across "
                                                "restarts (required with a quota; ':memory:' keeps them in memory "
                                                "only)")
    header_timeout: float = Field(10.0, gt=0, description="seconds a connection has to send a request's line and "
                                                          "headers; silent or half-sent connections are closed")
    read_timeout: float = Field(30.0, gt=0, description="seconds a request's body may take to arrive once its "
                                                        "headers are in (408 after)")
    keep_alive_timeout: float = Field(5.0, gt=0, description="seconds an idle kept-alive connection stays open")
    max_connections: int = Field(256, ge=1, description="open connections at once; more are answered 503 and "
                                                        "closed (this also bounds memory: one body each)")
    backlog: int = Field(2048, ge=1, description="connections the kernel queues before they are accepted "
                                                 "(capped by net.core.somaxconn)")
    max_header_bytes: int = Field(16384, ge=1024, description="largest request line plus headers (431 beyond)")
    idempotency_cache: int = Field(50_000, ge=0, description="answered requests remembered by their "
                                                             "Idempotency-Key, so a retry is answered again "
                                                             "without billing (0: none)")
    shutdown_timeout: float = Field(5.0, ge=0, description="seconds requests in progress get to finish after "
                                                           "SIGINT or SIGTERM")
