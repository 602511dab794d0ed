"""Pure model of Nix's side: nixbase32, store paths, PathInfo, NAR.

Like ``castore``, nothing here performs I/O beyond the streams a caller hands in.
"""
