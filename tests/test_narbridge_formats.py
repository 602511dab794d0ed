"""narinfo text and signatures against what Nix 2.8 itself writes.

Nix writes the narinfos of a ``file://`` binary cache and signs with ``nix store sign``;
tvixfs must read those exactly, render them byte for byte, and sign identically (ed25519 is
deterministic, so the same key and fingerprint give Nix's very signature).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from nixchroot import NIX_COMMAND, Closure, make_closure, nix_path_info, run

from tvixfs.castore.errors import ValidationError
from tvixfs.narbridge.signatures import nix_fingerprint, parse_public_key, parse_secret_key, sign, verify
from tvixfs.store.narinfo import parse_narinfo, render_narinfo
from tvixfs.store.nixtext import parse_signature


@pytest.fixture(scope="module")
def closure(tmp_path_factory: pytest.TempPathFactory) -> Closure:
    return make_closure(tmp_path_factory.mktemp("closure"))


@pytest.fixture(scope="module")
def nix_cache(closure: Closure, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("cache")
    run("nix", *NIX_COMMAND, "copy", "--to", f"file://{cache}", "--from", closure.uri, closure.built)
    return cache


def test_nix_written_narinfos_round_trip(nix_cache: Path) -> None:
    narinfos = sorted(nix_cache.glob("*.narinfo"))
    assert len(narinfos) == 5  # the closure of `built`
    for file in narinfos:
        text = file.read_text()
        info = parse_narinfo(text)
        assert info.store_path.hash_part == file.stem
        assert render_narinfo(info) == text


def test_signature_is_nix_s_own(closure: Closure, nix_cache: Path) -> None:
    work = closure.root.parent / "work"
    secret = parse_secret_key((work / "key.sec").read_text())
    public = parse_public_key((work / "key.pub").read_text())
    entry = nix_path_info(closure.root, [closure.built])[closure.built]
    (nix_sig,) = [parse_signature(s) for s in entry["signatures"]]
    info = parse_narinfo((nix_cache / f"{closure.built[11:43]}.narinfo").read_text())
    fingerprint = nix_fingerprint(info.store_path, info.nar_sha256, info.nar_size, info.references)
    assert sign(secret, fingerprint) == nix_sig
    assert verify([public], fingerprint, [nix_sig])
    assert not verify([public], fingerprint.replace(b";1;", b";2;") + b"x", [nix_sig])
    other = run("nix-store", "--generate-binary-cache-key", "tvixfs-test-1", work / "o.sec", work / "o.pub")
    assert other == ""
    impostor = parse_public_key((work / "o.pub").read_text())  # same name, different key
    assert not verify([impostor], fingerprint, [nix_sig])


@pytest.mark.parametrize(
    "text",
    [
        "",
        "StorePath: /nix/store/x\n",
        "no colon\n",
        "StorePath: /tmp/foo\nURL: a\nNarHash: sha256:x\nNarSize: 1\n",
    ],
)
def test_malformed_narinfo(text: str) -> None:
    with pytest.raises(ValidationError):
        parse_narinfo(text)


@pytest.mark.parametrize("text", ["", "name:", "name:AAAA", ":" + "A" * 88, "no-colon"])
def test_malformed_keys(text: str) -> None:
    with pytest.raises(ValidationError):
        parse_secret_key(text)
    with pytest.raises(ValidationError):
        parse_public_key(text)
