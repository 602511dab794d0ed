"""Deadlines and retries of a gRPC client: plain values, set by whoever opens the store.

Kept apart from the client (no grpc import) so that the CLI can build one, from its options and
environment, without paying for grpc's import in commands that never go remote.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ClientConfig:
    """Deadlines and retries of one connection."""

    timeout: float = 30.0  # a unary call, or one chunk read
    stream_timeout: float = 600.0  # a whole-blob read, a Put, a List, a recursive Get
    attempts: int = 5  # tries of an idempotent call that failed UNAVAILABLE
    backoff: float = 0.1  # seconds before the first retry; doubles, with jitter (1.5 s in all)
