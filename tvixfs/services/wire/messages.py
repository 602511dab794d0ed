"""Message size limits both ends of the gRPC wire agree on (client channel and server)."""

# Far above the 4 MiB default: one Directory of a huge store path (100k entries) is ~10 MiB.
MAX_MESSAGE = 64 << 20

# What one ReadMany (tvixfs's BlobBatchService) may ask for: digests, and bytes per blob (each is
# sent whole in one message, under the 4 MiB a default gRPC client accepts). The client asks
# for the small chunks of a program start this way and reads anything larger with Read.
READ_MANY_DIGESTS = 256
READ_MANY_BLOB_MAX = 3 << 20

# What one DirectoryService/Put stream may carry. The server holds the whole stream until its
# end (the store takes it in one transaction), ~4x its wire size parsed and ~500 bytes per
# directory however small: a client must not be able to grow it without end. A closure of a
# million entries in 40k directories (a browser's source tree) is ~60 MiB on the wire.
PUT_DIRECTORIES_MAX = 1 << 18
PUT_DIRECTORY_BYTES_MAX = 128 << 20
