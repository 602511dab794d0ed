"""The stores tvixfs can talk to: memory, local (SQLite + chunk files), a gRPC daemon, S3."""
