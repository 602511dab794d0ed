"""nar-bridge: a Nix HTTP binary cache over any tvixfs store, reading and (optionally) writing."""
