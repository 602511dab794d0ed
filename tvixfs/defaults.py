"""Defaults of the mount's options, in one place: ``FsOptions``, the modules that take them,
``tvixfs mount --help`` and README's option table (tests/test_cli_defaults.py checks it) read
them from here. Change a default here and nowhere else.
"""

# Memory for file content chunks (--cache-size); CACHE_SIZE is how --help spells it.
CACHE_SIZE = "256M"
# Disk for a remote store's data (--disk-cache-size), as --help and the units spell it.
DISK_CACHE_SIZE = "10G"
CACHE_BYTES = 256 << 20
# Concurrent requests to the store, per service (--threads).
THREADS = 16
# Seconds a request may wait on the store before it fails with EIO (--deadline). A thread cannot
# be killed: the call is abandoned, its thread stays busy until the store answers.
DEADLINE = 60.0
# Live inodes before the least recently used are handed back to the kernel (--max-inodes);
# about 250 bytes each here and about 1 KiB each in the kernel.
MAX_INODES = 1 << 16
# Directory entries, of all cached directories together (--directory-cache); ~200 bytes each.
DIRECTORY_CACHE_ENTRIES = 1 << 17
