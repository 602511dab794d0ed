#!/usr/bin/env bash
# Install everything tvixfs needs on Debian: system packages, then tvixfs into ./.venv.
#   scripts/install.sh          runtime only
#   scripts/install.sh --test   plus the test and lint tools
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

# fuse3: fusermount3 (auto_unmount); libfuse3-dev + pkg-config: pyfuse3 builds from source;
# nix-bin: the reference Nix the tests compare against; attr: getfattr; systemd: systemd-analyze;
# iproute2: `ip`, brings up loopback in the benchmark daemons' own network namespaces.
packages=(fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv nix-bin attr systemd util-linux iproute2)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -q
    $sudo apt-get install -y -q "${missing[@]}"
fi

python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e ".${extras}"
echo "tvixfs installed: $(.venv/bin/tvixfs --help >/dev/null && echo .venv/bin/tvixfs)"
