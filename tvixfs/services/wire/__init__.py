"""What the gRPC client and the server share: method tables, status mapping, message sizes.

The server imports these, never the client backend."""
