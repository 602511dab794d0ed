"""Message size limits both ends of the gRPC wire agree on (client channel and server)."""

# Far above the 4 MiB default: one Directory of a huge store path (100k entries) is ~10 MiB.
MAX_MESSAGE = 64 << 20

# What one ReadMany (tvixfs's BlobBatchService) may ask for: digests, and bytes per blob (each is
# sent whole in one message, under the 4 MiB a default gRPC client accepts). The client asks
# for the small chunks of a program start this way and reads anything larger with Read.
READ_MANY_DIGESTS = 256
READ_MANY_BLOB_MAX = 3 << 20
