"""Importers that turn a directory, a NAR or a Nix store path into blobs, directories and path infos."""
