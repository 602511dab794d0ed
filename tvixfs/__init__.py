"""tvixfs: mount a Nix store read-only over FUSE from a tvix-protocol content-addressed store."""

__version__ = "0.1.0"
