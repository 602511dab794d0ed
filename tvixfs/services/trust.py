"""PathInfoService wrappers that sign what is put, or refuse what no trusted key signed.

Wrapping the service, not the importers, gives every writer the same behaviour: ``import``,
``import-nar``, ``import-nix`` and the paths a ``tvixfs daemon`` receives from its clients.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

from tvixfs.castore.errors import ValidationError
from tvixfs.castore.nodes import Node
from tvixfs.protos import pathinfo_pb2
from tvixfs.services.base import PathInfoService, Store
from tvixfs.services.errors import StoreError
from tvixfs.store.nixsig import PublicKey, SecretKey, parse_public_keys, parse_secret_key
from tvixfs.store.pathinfo import validate_pathinfo
from tvixfs.store.signing import check_nix_signature, sign_pathinfo


class UntrustedPathError(StoreError):
    """A path info without a valid signature of a trusted key, where one is required."""


class _Wrapper(PathInfoService):
    def __init__(self, inner: PathInfoService) -> None:
        self._inner = inner

    def get(self, output_hash: bytes) -> pathinfo_pb2.PathInfo | None:
        return self._inner.get(output_hash)

    def put(self, info: pathinfo_pb2.PathInfo) -> pathinfo_pb2.PathInfo:
        return self._inner.put(info)

    def list(self) -> Iterator[pathinfo_pb2.PathInfo]:
        return self._inner.list()

    def calculate_nar(self, node: Node) -> tuple[int, bytes]:
        return self._inner.calculate_nar(node)

    def close(self) -> None:
        self._inner.close()


class SigningPathInfoService(_Wrapper):
    """Adds Nix's and the tvixfs root signature of ``key`` to every path info put."""

    def __init__(self, inner: PathInfoService, key: SecretKey) -> None:
        super().__init__(inner)
        self._key = key

    def put(self, info: pathinfo_pb2.PathInfo) -> pathinfo_pb2.PathInfo:
        return self._inner.put(sign_pathinfo(info, self._key))


class RequireSignaturesPathInfoService(_Wrapper):
    """Refuses to put a path info that carries no valid Nix signature of a trusted key.

    Except a content-addressed one, as Nix's ``require-sigs`` does: its name follows from its
    content (``validate_pathinfo`` checks the address against the name and the NAR hash, and the
    importers hash the NAR they store), so no key needs to vouch for it.
    """

    def __init__(self, inner: PathInfoService, keys: Mapping[str, PublicKey]) -> None:
        super().__init__(inner)
        self._keys = keys

    def put(self, info: pathinfo_pb2.PathInfo) -> pathinfo_pb2.PathInfo:
        if info.narinfo.HasField("ca"):  # the inner put validates the address first
            return self._inner.put(info)
        why = check_nix_signature(info, self._keys)
        if why is not None:
            store_path, _ = validate_pathinfo(info)
            raise UntrustedPathError(f"{store_path}: {why}; not imported")
        return self._inner.put(info)


def load_secret_key(path: str | Path) -> SecretKey:
    """A secret key file as ``nix-store --generate-binary-cache-key`` writes it."""
    try:
        text = Path(path).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as e:
        raise ValidationError(f"cannot read secret key {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        return parse_secret_key(text)
    except ValidationError as e:
        raise ValidationError(f"{path}: {e}") from None


def load_public_keys(keys: list[str] | None, files: list[str] | None = None) -> dict[str, PublicKey]:
    """Trusted keys from ``NAME:BASE64`` arguments and files of them (whitespace-separated)."""
    lines = list(keys or [])
    for file in files or []:
        try:
            lines.extend(Path(file).read_text(encoding="ascii").splitlines())
        except (OSError, UnicodeDecodeError) as e:
            raise ValidationError(
                f"cannot read public keys {file}: {getattr(e, 'strerror', None) or e}"
            ) from None
    return parse_public_keys(lines)


def with_trust(
    store: Store, sign_key: SecretKey | None = None, require: Mapping[str, PublicKey] | None = None
) -> Store:
    """``store`` whose path info puts are checked against ``require`` (if given), then signed."""
    pathinfos = store.pathinfos
    if sign_key is not None:
        pathinfos = SigningPathInfoService(pathinfos, sign_key)
    if require:
        pathinfos = RequireSignaturesPathInfoService(pathinfos, require)
    return Store(store.blobs, store.directories, pathinfos)
