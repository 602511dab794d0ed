"""Server reflection and health: what grpcurl and load balancers ask a daemon first.

Reflection answers from a descriptor pool of its own that holds the tvix files and renamed snix
copies of them, so a client browsing either package finds every service, method and message.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from tvixfs.protos import (
    blobbatch_pb2,
    castore_pb2,
    pathinfo_pb2,
    rpc_blobstore_pb2,
    rpc_directory_pb2,
    rpc_pathinfo_pb2,
)
from tvixfs.server.limits import StreamGate
from tvixfs.services.wire.grpc_methods import PREFIXES

# Dependencies before dependents: a pool accepts a file only once its imports are in.
_STORE_FILES = (castore_pb2, rpc_blobstore_pb2, rpc_directory_pb2, pathinfo_pb2, rpc_pathinfo_pb2)
_OWN_FILES = (health_pb2, reflection_pb2, blobbatch_pb2)


def add_health(server: grpc.Server, service_names: Iterable[str], gate: StreamGate) -> health.HealthServicer:
    """Serve grpc.health.v1 with every service (and the server as a whole, "") SERVING.

    Check and List take their one request through ``gate`` (StreamGate.first_request), as the
    store's unary methods do. Watch stays grpcio-health's own: it is answered without holding
    a thread, which a wrapper would lose (its request is still read before it runs).
    """
    servicer = health.HealthServicer()
    methods: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for name, request, response, behaviour in (
        ("Check", health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse, servicer.Check),
        ("List", health_pb2.HealthListRequest, health_pb2.HealthListResponse, servicer.List),
    ):
        methods[name] = grpc.stream_unary_rpc_method_handler(
            gate.one_request(f"/{health.SERVICE_NAME}/{name}", behaviour),
            request_deserializer=request.FromString,
            response_serializer=response.SerializeToString,
        )
    methods["Watch"] = grpc.unary_stream_rpc_method_handler(
        servicer.Watch,
        request_deserializer=health_pb2.HealthCheckRequest.FromString,
        response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(health.SERVICE_NAME, methods),))
    for name in ("", *service_names):
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return servicer


# grpcio-reflection serves v1alpha only; v1 has the same messages under another package, and
# newer clients (grpcurl since 1.8.8) ask for it first.
_REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def add_reflection(server: grpc.Server, service_names: Iterable[str], gate: StreamGate) -> None:
    """Serve reflection, v1alpha and v1, its streams admitted by ``gate``: a reflection stream
    holds a worker thread while its client keeps it open, as a store stream does."""
    names = [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME, _REFLECTION_V1]
    servicer = reflection.ReflectionServicer(names, pool=_pool())
    for service in (reflection.SERVICE_NAME, _REFLECTION_V1):
        path = f"/{service}/ServerReflectionInfo"
        info = grpc.stream_stream_rpc_method_handler(
            gate.wrap(path, servicer.ServerReflectionInfo, client_streaming=True),
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        )
        handler = grpc.method_handlers_generic_handler(service, {"ServerReflectionInfo": info})
        server.add_generic_rpc_handlers((handler,))


def _pool() -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.DescriptorPool()
    for module in _OWN_FILES:
        pool.Add(_file_proto(module))
    protos = [_file_proto(module) for module in _STORE_FILES]
    original = PREFIXES[0]
    for prefix in PREFIXES:
        for proto in protos:
            pool.Add(proto if prefix == original else _renamed(proto, original, prefix))
    return pool


def _file_proto(module: object) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(proto)  # type: ignore[attr-defined]
    return proto


def _renamed(
    proto: descriptor_pb2.FileDescriptorProto, old: str, new: str
) -> descriptor_pb2.FileDescriptorProto:
    """The same file under package prefix ``new``: file path, package, imports, type names."""
    copy = descriptor_pb2.FileDescriptorProto()
    copy.CopyFrom(proto)

    def path(name: str) -> str:
        return (new + name.removeprefix(old)) if name.startswith(f"{old}/") else name

    def type_name(name: str) -> str:
        return (f".{new}." + name.removeprefix(f".{old}.")) if name.startswith(f".{old}.") else name

    copy.name = path(copy.name)
    copy.package = new + copy.package.removeprefix(old)
    copy.dependency[:] = [path(d) for d in copy.dependency]
    messages = list(copy.message_type)
    while messages:
        message = messages.pop()
        messages.extend(message.nested_type)
        for field in message.field:
            if field.HasField("type_name"):  # proto2: assigning "" would mark it present
                field.type_name = type_name(field.type_name)
    for service in copy.service:
        for method in service.method:
            method.input_type = type_name(method.input_type)
            method.output_type = type_name(method.output_type)
    return copy
