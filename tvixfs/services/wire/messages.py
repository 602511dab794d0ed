"""Message size limits both ends of the gRPC wire agree on (client channel and server)."""

# Far above the 4 MiB default: one Directory of a huge store path (100k entries) is ~10 MiB.
MAX_MESSAGE = 64 << 20
