"""``tvixfs mount``: the read-only FUSE daemon (pyfuse3 on trio) over the three store services."""
