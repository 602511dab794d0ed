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
# iproute2: `ip`, brings up loopback in the benchmark daemons' own network namespaces;
# patch: applies scripts/pyfuse3-*.patch.
packages=(fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv nix-bin attr systemd util-linux iproute2 patch)
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

# pyfuse3 built from its sdist with two patches (scripts/pyfuse3-*.patch, written to go
# upstream): opendir-fileinfo lets the kernel cache the listings of store paths
# (tvixfs/fs/dircache.py); no-open lets it open files without asking (tvixfs/fs/noopen.py).
# Anything failing here leaves the stock pyfuse3 to the next step: tvixfs detects each
# capability and works without it.
PYFUSE3_PATCHED=3.5.0
PYFUSE3_PATCHES=(scripts/pyfuse3-opendir-fileinfo.patch scripts/pyfuse3-no-open.patch)
apply_pyfuse3_patches() {
    local patch_file
    for patch_file in "${PYFUSE3_PATCHES[@]}"; do
        patch -d "$1" -p1 --forward --batch --quiet <"$patch_file" || return 1
    done
}
install_patched_pyfuse3() {
    local build src
    build=$(mktemp -d)
    src="$build/pyfuse3-$PYFUSE3_PATCHED"
    .venv/bin/pip download -q --no-deps --no-binary :all: -d "$build" "pyfuse3==$PYFUSE3_PATCHED" &&
        tar -xzf "$build/pyfuse3-$PYFUSE3_PATCHED.tar.gz" -C "$build" &&
        apply_pyfuse3_patches "$src" &&
        rm -f "$src/src/pyfuse3/__init__.c" && # generated from the unpatched source: Cython redoes it
        .venv/bin/pip install -q --no-deps --force-reinstall "$src"
    local status=$?
    rm -rf "$build"
    return $status
}
patched='import pyfuse3, sys; sys.exit(not (hasattr(pyfuse3.FileInfo, "cache_readdir") and hasattr(pyfuse3.Operations, "no_open")))'
if .venv/bin/python -c "$patched" 2>/dev/null; then
    echo "pyfuse3: patched already"
elif install_patched_pyfuse3; then
    echo "pyfuse3 $PYFUSE3_PATCHED: patched (listings cached by the kernel, files opened without asking)"
else
    echo "warning: cannot build the patched pyfuse3; using the stock one (listings not cached by the kernel, files opened by request)" >&2
fi

.venv/bin/pip install -q -e ".${extras}"
echo "tvixfs installed: $(.venv/bin/tvixfs --help >/dev/null && echo .venv/bin/tvixfs)"
