"""Register a store's servicers under both the tvix and the snix method names.

The two names share one handler per method: the messages are the same bytes, so only the path
the client asks for differs.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Executor
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from tvixfs.server.guard import GrpcHandler, Handler, guard
from tvixfs.server.limits import ReadAheadSlots, StreamGate
from tvixfs.server.servicers import (
    READ_MESSAGE_SIZE,
    BlobServicer,
    DirectoryServicer,
    Handlers,
    PathInfoServicer,
)
from tvixfs.services.base import Store
from tvixfs.services.errors import InvalidArgumentError
from tvixfs.services.wire.grpc_methods import METHODS, PREFIXES, Method, service_name


def add_store_services(
    server: grpc.Server,
    store: Store,
    read_message_size: int = READ_MESSAGE_SIZE,
    prefixes: Sequence[str] = PREFIXES,
    read_ahead: Executor | None = None,
    *,
    gate: StreamGate | None = None,
) -> list[str]:
    """Add the three services of ``store`` under ``prefixes``, and tvixfs's BlobBatchService;
    returns the service names served.

    ``read_ahead`` runs the chunk reads of Read streams ahead of them (servicers.read_ahead);
    ``gate`` admits and watches every streaming call, and says how many may read ahead.
    """
    slots = None if gate is None else ReadAheadSlots(gate.limits.read_ahead_streams)
    handlers: Handlers = {
        **BlobServicer(store.blobs, read_message_size, read_ahead, slots).handlers(),
        **DirectoryServicer(store.directories).handlers(),
        **PathInfoServicer(store.pathinfos).handlers(),
    }
    routes: dict[str, dict[str, grpc.RpcMethodHandler[Any, Any]]] = {}
    for m in METHODS:
        # tvixfs's own extension is served under its own package only.
        for prefix in prefixes if m.prefixes == PREFIXES else m.prefixes:
            behaviour = guard(m.path(prefix), _decoding(m, handlers[m]), m.server_streaming)
            routes.setdefault(service_name(m.service, prefix), {})[m.name] = _method_handler(
                m, _limited(gate, m, prefix, behaviour), gate, m.path(prefix)
            )
    for name, methods in routes.items():
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, methods),))
    return list(routes)


def _limited(gate: StreamGate | None, method: Method, prefix: str, behaviour: GrpcHandler) -> GrpcHandler:
    """``behaviour`` admitted by ``gate`` if it is a streaming call; unary calls pass freely."""
    if gate is None or not (method.client_streaming or method.server_streaming):
        return behaviour
    return gate.wrap(method.path(prefix), behaviour, method.client_streaming, method.server_streaming)


def _decoding(method: Method, handler: Handler) -> Handler:
    """``handler`` fed with requests decoded from raw bytes.

    Decoding inside the guard makes an undecodable request INVALID_ARGUMENT; grpcio's own
    deserializer would log a traceback and answer INTERNAL.
    """

    def decode(data: bytes) -> Message:
        try:
            return method.request.FromString(data)
        except DecodeError as e:
            raise InvalidArgumentError(f"undecodable {method.request.__name__}: {e}") from None

    if method.client_streaming:
        return lambda requests: handler(decode(data) for data in requests)
    return lambda request: handler(decode(request))


def _method_handler(
    method: Method, behaviour: GrpcHandler, gate: StreamGate | None, path: str
) -> grpc.RpcMethodHandler[Any, Any]:
    serialize = method.encode_response or method.response.SerializeToString
    if method.client_streaming:
        return grpc.stream_unary_rpc_method_handler(behaviour, response_serializer=serialize)
    if gate is not None:
        # Served as a request stream whose one request the gate reads under watch
        # (StreamGate.first_request); on the wire a unary request is the same bytes.
        one = gate.one_request(path, behaviour)
        if method.server_streaming:
            return grpc.stream_stream_rpc_method_handler(one, response_serializer=serialize)
        return grpc.stream_unary_rpc_method_handler(one, response_serializer=serialize)
    if method.server_streaming:
        return grpc.unary_stream_rpc_method_handler(behaviour, response_serializer=serialize)
    return grpc.unary_unary_rpc_method_handler(behaviour, response_serializer=serialize)
