"""Offline jobs over a store: fsck (local, S3, disk cache) and garbage collection."""
