"""A man in the middle for the store protocol: forwards every call to an upstream gRPC store,
byte for byte, except path infos, which a test may rewrite on their way to the client.

It speaks both package prefixes and every method of the method table; messages other than
PathInfo are never parsed, so what the client sees is exactly what the upstream sent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from tvixfs.protos import pathinfo_pb2
from tvixfs.services.grpc_methods import METHODS, PATHINFO_SERVICE, PREFIXES

Rewrite = Callable[[pathinfo_pb2.PathInfo], pathinfo_pb2.PathInfo]


class _Forward(grpc.GenericRpcHandler):
    def __init__(self, upstream: grpc.Channel, rewrite: Rewrite) -> None:
        self._upstream = upstream
        self._rewrite = rewrite
        self._methods = {m.path(p): m for m in METHODS for p in PREFIXES}

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:  # type: ignore[type-arg]
        method = self._methods.get(details.method)  # type: ignore[attr-defined]
        if method is None:
            return None
        path: str = details.method  # type: ignore[attr-defined]
        rewrites = method.service == PATHINFO_SERVICE and method.response is pathinfo_pb2.PathInfo
        if method.client_streaming:
            return grpc.stream_unary_rpc_method_handler(self._stream_unary(path))
        if method.server_streaming:
            return grpc.unary_stream_rpc_method_handler(self._unary_stream(path, rewrites))
        return grpc.unary_unary_rpc_method_handler(self._unary_unary(path, rewrites))

    def _edit(self, data: bytes) -> bytes:
        info = pathinfo_pb2.PathInfo.FromString(data)
        return self._rewrite(info).SerializeToString()

    def _unary_unary(self, path: str, rewrites: bool) -> Callable[[bytes, grpc.ServicerContext], bytes]:
        def call(request: bytes, context: grpc.ServicerContext) -> bytes:
            try:
                reply: bytes = self._upstream.unary_unary(path)(request, timeout=context.time_remaining())
            except grpc.RpcError as e:
                context.abort(e.code(), e.details() or "")
            return self._edit(reply) if rewrites else reply

        return call

    def _unary_stream(
        self, path: str, rewrites: bool
    ) -> Callable[[bytes, grpc.ServicerContext], Iterator[bytes]]:
        def call(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
            try:
                for reply in self._upstream.unary_stream(path)(request, timeout=context.time_remaining()):
                    yield self._edit(reply) if rewrites else reply
            except grpc.RpcError as e:
                context.abort(e.code(), e.details() or "")

        return call

    def _stream_unary(self, path: str) -> Callable[[Iterator[bytes], grpc.ServicerContext], bytes]:
        def call(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
            try:
                reply: bytes = self._upstream.stream_unary(path)(requests, timeout=context.time_remaining())
            except grpc.RpcError as e:
                context.abort(e.code(), e.details() or "")
            return reply

        return call


class MitmProxy:
    """``with MitmProxy(upstream_target, rewrite) as proxy:`` serves on ``proxy.url``."""

    def __init__(self, upstream: str, rewrite: Rewrite, address: str = "127.0.0.1:0") -> None:
        self._channel = grpc.insecure_channel(upstream)
        self._server = grpc.server(ThreadPoolExecutor(max_workers=16, thread_name_prefix="mitm"))
        self._server.add_generic_rpc_handlers((_Forward(self._channel, rewrite),))
        port = self._server.add_insecure_port(address)
        self.url = f"grpc+http://{address.rsplit(':', 1)[0]}:{port}"

    def __enter__(self) -> MitmProxy:
        self._server.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.stop(grace=None).wait()
        self._channel.close()
