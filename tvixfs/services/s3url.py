"""The two URL forms of an S3 store and the environment they draw on.

``s3://BUCKET[/PREFIX]?endpoint=URL&region=R`` is tvixfs's own: credentials come only from the
environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``), so that
they never appear on a command line ``ps`` shows; ``AWS_ENDPOINT_URL`` and ``AWS_REGION`` stand
in for missing options. ``objectstore+s3://BUCKET/PREFIX?aws_endpoint=…&aws_access_key_id=…``
is tvix-store's, accepted so that a tvix configuration carries over: its ``aws_*`` pairs are
options of the Rust ``object_store`` crate, and unknown ones are ignored as tvix ignores them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from tvixfs.services.errors import StoreError

SCHEMES = ("s3", "objectstore+s3")
_OWN_OPTIONS = ("endpoint", "region")
# tvix's option keys (object_store's AmazonS3ConfigKey names) that name a setting used here.
_TVIX_OPTIONS = {
    "aws_endpoint": "endpoint",
    "aws_endpoint_url": "endpoint",
    "endpoint": "endpoint",
    "aws_region": "region",
    "region": "region",
    "aws_default_region": "region",
    "aws_access_key_id": "access_key_id",
    "access_key_id": "access_key_id",
    "aws_secret_access_key": "secret_access_key",
    "secret_access_key": "secret_access_key",
    "aws_session_token": "session_token",
    "aws_token": "session_token",
    "session_token": "session_token",
    "aws_allow_http": "allow_http",
    "allow_http": "allow_http",
    "aws_virtual_hosted_style_request": "virtual_hosted_style_request",
}


_SECRETS = ("access_key_id", "secret_access_key", "session_token")


class S3URLError(StoreError, ValueError):
    """An S3 store URL that cannot be used; the message says why."""


@dataclass(frozen=True)
class S3Location:
    """Where an S3 store lives and how to reach it; ``settings`` hold what the URL or the
    environment gave (``endpoint``, ``region``, credentials, ``allow_http``)."""

    bucket: str
    prefix: str
    settings: tuple[tuple[str, str], ...]

    def setting(self, name: str) -> str | None:
        return dict(self.settings).get(name)

    def describe(self) -> str:
        """For messages: never shows credentials."""
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")


def parse_s3_url(url: str, environ: Mapping[str, str] | None = None) -> S3Location:
    env = os.environ if environ is None else environ
    parts = urlsplit(url)
    bucket = parts.netloc
    if not 3 <= len(bucket) <= 63 or "@" in bucket or ":" in bucket:
        raise S3URLError(
            f"S3 store URL needs a bucket name (3-63 characters): {parts.scheme}://BUCKET[/PREFIX]"
        )
    settings: dict[str, str] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if parts.scheme == "s3":
            if key not in _OWN_OPTIONS:
                raise S3URLError(
                    f"unknown s3:// option {key!r}: accepted are endpoint= and region= "
                    "(credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
                )
            settings[key] = value
        elif key.lower() in _TVIX_OPTIONS:
            settings[_TVIX_OPTIONS[key.lower()]] = value
    for name, variable in (
        ("endpoint", "AWS_ENDPOINT_URL"),
        ("region", "AWS_REGION"),
        ("region", "AWS_DEFAULT_REGION"),
        ("access_key_id", "AWS_ACCESS_KEY_ID"),
        ("secret_access_key", "AWS_SECRET_ACCESS_KEY"),
        ("session_token", "AWS_SESSION_TOKEN"),
    ):
        if name not in settings and env.get(variable):
            settings[name] = env[variable]
    endpoint = settings.get("endpoint", "")
    if endpoint and not endpoint.startswith(("http://", "https://")):
        raise S3URLError(f"S3 endpoint must be an http:// or https:// URL, not {endpoint!r}")
    if endpoint.startswith("http://"):
        settings.setdefault("allow_http", "true")
    return S3Location(bucket, parts.path.strip("/"), tuple(sorted(settings.items())))


def redacted(url: str) -> str:
    """``url`` for logs and status lines: the values of credential options replaced by ``***``
    (tvix's form carries them in the URL)."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES or not parts.query:
        return url
    pairs = [
        f"{key}={'***' if _TVIX_OPTIONS.get(key.lower()) in _SECRETS else value}"
        for key, value in parse_qsl(parts.query, keep_blank_values=True)
    ]
    return parts._replace(query="&".join(pairs)).geturl()
