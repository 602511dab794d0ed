"""The three store services (blob, directory, path info): interfaces, URLs and backends."""
