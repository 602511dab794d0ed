"""Pure model of the content-addressed store: digests, nodes, directories, chunking.

No I/O lives here, so every rule of the wire protocol can be tested on plain bytes.
"""
