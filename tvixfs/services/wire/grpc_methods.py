"""The wire names of the store protocol's methods, under both package prefixes.

tvix and snix send identical message bytes; only the package in a method path differs
(``/tvix.castore.v1.BlobService/Read`` or ``/snix.castore.v1.BlobService/Read``). The client and
the server both build their calls and handlers from this one table, so the two prefixes cannot
drift apart.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message

from tvixfs.protos import (
    blobbatch_pb2,
    castore_pb2,
    pathinfo_pb2,
    rpc_blobstore_pb2,
    rpc_directory_pb2,
    rpc_pathinfo_pb2,
)

# tvix first: it is what the .proto files under protos/ declare and what a client tries first.
PREFIXES = ("tvix", "snix")

BLOB_SERVICE = "castore.v1.BlobService"
DIRECTORY_SERVICE = "castore.v1.DirectoryService"
PATHINFO_SERVICE = "store.v1.PathInfoService"
SERVICES = (BLOB_SERVICE, DIRECTORY_SERVICE, PATHINFO_SERVICE)

# tvixfs's own extension (protos/tvixfs/protos/blobbatch.proto), under its own package only.
EXTENSION_PREFIXES = ("tvixfs",)
BLOB_BATCH_SERVICE = "ext.v1.BlobBatchService"


@dataclass(frozen=True)
class Method:
    service: str  # without the prefix, e.g. "castore.v1.BlobService"
    name: str
    request: type[Message]
    response: type[Message]
    client_streaming: bool = False
    server_streaming: bool = False
    # The wire form of requests and responses, where it is not the message class's own.
    encode_request: Callable[[Any], bytes] | None = None
    encode_response: Callable[[Any], bytes] | None = None
    decode_response: Callable[[bytes], Any] | None = None
    # The package prefixes the method is served under, tried in this order.
    prefixes: tuple[str, ...] = PREFIXES

    def path(self, prefix: str) -> str:
        return f"/{service_name(self.service, prefix)}/{self.name}"


def service_name(service: str, prefix: str) -> str:
    return f"{prefix}.{service}"


# A BlobChunk is one field: tag 1, length-delimited (``data``).
_DATA_TAG = 0x0A

# Field 1 with wire type 7, which does not exist: no protobuf parser accepts this message. A client
# whose source fails sends it in place of the rest of a Put's stream, so that the server fails the
# call. Ending the stream would store the truncated blob, and cancelling the call does not always
# prevent that: grpcio's sync server can take a cancel for the end of the stream when it handles
# the empty receive before the cancel.
UNDECODABLE = b"\x0f"


def encode_blob_chunk(parts: Sequence[bytes | memoryview]) -> bytes:
    """A serialized BlobChunk whose ``data`` is ``parts`` joined.

    Read sends most of a store's bytes: built straight from the pieces read, each byte is
    copied once, where a BlobChunk message would take three copies (join, message, serialize).
    """
    size = sum(len(p) for p in parts)
    header = bytearray([_DATA_TAG])
    while size > 0x7F:
        header.append(0x80 | (size & 0x7F))
        size >>= 7
    header.append(size)
    return b"".join([header, *parts])


def decode_blob_chunk(message: bytes) -> bytes | memoryview:
    """The ``data`` of a serialized BlobChunk, without copying it when it is the whole message
    (what any server sends: the field is the only one); anything else is parsed as usual."""
    if message and message[0] == _DATA_TAG:
        size = shift = 0
        for end in range(1, min(len(message), 11)):
            byte = message[end]
            size |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                if end + 1 + size == len(message):
                    return memoryview(message)[end + 1 :]
                break
    data: bytes = rpc_blobstore_pb2.BlobChunk.FromString(message).data
    return data


def encode_message_or_bytes(message: Message | bytes) -> bytes:
    """A message's wire form; bytes are taken as that form already (a store's own encoding)."""
    return message if isinstance(message, bytes) else message.SerializeToString()


BLOB_STAT = Method(
    BLOB_SERVICE, "Stat", rpc_blobstore_pb2.StatBlobRequest, rpc_blobstore_pb2.StatBlobResponse
)
BLOB_READ = Method(
    BLOB_SERVICE,
    "Read",
    rpc_blobstore_pb2.ReadBlobRequest,
    rpc_blobstore_pb2.BlobChunk,
    server_streaming=True,
    # Responses are the bytes of their ``data``: a sequence of pieces to send, a view received.
    encode_response=encode_blob_chunk,
    decode_response=decode_blob_chunk,
)
BLOB_PUT = Method(
    BLOB_SERVICE,
    "Put",
    rpc_blobstore_pb2.BlobChunk,
    rpc_blobstore_pb2.PutBlobResponse,
    client_streaming=True,
    # Requests may be sent encoded (encode_blob_chunk, UNDECODABLE).
    encode_request=encode_message_or_bytes,
)


def received_bytes(message: bytes) -> bytes:
    """A response as it came: the client parses it, and hashes the very bytes it got."""
    return message


DIRECTORY_GET = Method(
    DIRECTORY_SERVICE,
    "Get",
    rpc_directory_pb2.GetDirectoryRequest,
    castore_pb2.Directory,
    server_streaming=True,
    # A recursive Get sends the stored encodings where the store has them (encodedclosure.py);
    # the client checks a directory by the hash of the bytes it received where it can
    # (Directory.from_named_bytes), not by encoding it again.
    encode_response=encode_message_or_bytes,
    decode_response=received_bytes,
)
DIRECTORY_PUT = Method(
    DIRECTORY_SERVICE,
    "Put",
    castore_pb2.Directory,
    rpc_directory_pb2.PutDirectoryResponse,
    client_streaming=True,
)
PATHINFO_GET = Method(PATHINFO_SERVICE, "Get", rpc_pathinfo_pb2.GetPathInfoRequest, pathinfo_pb2.PathInfo)
PATHINFO_PUT = Method(PATHINFO_SERVICE, "Put", pathinfo_pb2.PathInfo, pathinfo_pb2.PathInfo)
PATHINFO_CALCULATE_NAR = Method(
    PATHINFO_SERVICE, "CalculateNAR", castore_pb2.Node, rpc_pathinfo_pb2.CalculateNARResponse
)
PATHINFO_LIST = Method(
    PATHINFO_SERVICE,
    "List",
    rpc_pathinfo_pb2.ListPathInfoRequest,
    pathinfo_pb2.PathInfo,
    server_streaming=True,
)

BLOB_READ_MANY = Method(
    BLOB_BATCH_SERVICE,
    "ReadMany",
    blobbatch_pb2.ReadManyRequest,
    blobbatch_pb2.ReadManyResponse,
    server_streaming=True,
    # A blob's data is field 1, as in BlobChunk: sent the way Read sends it, from its pieces.
    encode_response=lambda r: encode_blob_chunk(r) if isinstance(r, list) else r.SerializeToString(),
    prefixes=EXTENSION_PREFIXES,
)

METHODS = (
    BLOB_STAT,
    BLOB_READ,
    BLOB_PUT,
    DIRECTORY_GET,
    DIRECTORY_PUT,
    PATHINFO_GET,
    PATHINFO_PUT,
    PATHINFO_CALCULATE_NAR,
    PATHINFO_LIST,
    BLOB_READ_MANY,
)
