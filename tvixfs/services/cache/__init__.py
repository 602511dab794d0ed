"""The persistent disk cache: a store wrapper that keeps what it read, and its index and writer."""
