"""The two S3 store URL forms: tvixfs's ``s3://`` and tvix-store's ``objectstore+s3://``."""

from __future__ import annotations

import pytest

from tvixfs.services.s3url import S3Location, S3URLError, parse_s3_url, redacted
from tvixfs.services.url import StoreURL


def test_own_form_takes_credentials_from_the_environment() -> None:
    env = {"AWS_ACCESS_KEY_ID": "AK", "AWS_SECRET_ACCESS_KEY": "SK", "AWS_REGION": "eu-west-1"}
    location = parse_s3_url("s3://my-bucket/some/prefix?endpoint=http://127.0.0.1:9000", env)
    assert location == S3Location(
        "my-bucket",
        "some/prefix",
        (
            ("access_key_id", "AK"),
            ("allow_http", "true"),
            ("endpoint", "http://127.0.0.1:9000"),
            ("region", "eu-west-1"),
            ("secret_access_key", "SK"),
        ),
    )
    assert location.describe() == "s3://my-bucket/some/prefix"


def test_url_options_win_over_the_environment() -> None:
    env = {"AWS_ENDPOINT_URL": "https://env.example", "AWS_REGION": "env-region"}
    location = parse_s3_url("s3://bucket?region=url-region", env)
    assert location.setting("region") == "url-region"
    assert location.setting("endpoint") == "https://env.example"
    assert location.setting("allow_http") is None  # https: nothing plain allowed
    assert location.prefix == ""


def test_tvix_form_carries_over_and_ignores_unknown_keys() -> None:
    url = (
        "objectstore+s3://bucket/tvix?aws_endpoint=http://[::1]:9000&aws_allow_http=true"
        "&aws_access_key_id=AK&aws_secret_access_key=SK&aws_region=r1&aws_unknown_thing=1"
    )
    location = parse_s3_url(url, {})
    assert (location.bucket, location.prefix) == ("bucket", "tvix")
    assert dict(location.settings) == {
        "endpoint": "http://[::1]:9000",
        "allow_http": "true",
        "access_key_id": "AK",
        "secret_access_key": "SK",
        "region": "r1",
    }
    assert "AK" not in location.describe()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("s3://", "bucket name"),
        ("s3://user@bucket", "bucket name"),
        ("s3://bucket?secret=1", "unknown s3:// option"),
        ("s3://bucket?endpoint=127.0.0.1:9000", "http:// or https://"),
    ],
)
def test_rejected(url: str, message: str) -> None:
    with pytest.raises(S3URLError, match=message):
        parse_s3_url(url, {})


def test_store_url_keeps_the_whole_url() -> None:
    assert StoreURL.parse("s3://bucket/p?region=x") == StoreURL("s3", path="s3://bucket/p?region=x")


def test_logs_see_no_credentials_of_the_tvix_form() -> None:
    url = "objectstore+s3://b/p?aws_endpoint=http://h:9000&aws_access_key_id=AK&aws_secret_access_key=SK"
    assert redacted(url) == (
        "objectstore+s3://b/p?aws_endpoint=http://h:9000&aws_access_key_id=***&aws_secret_access_key=***"
    )
    assert redacted("s3://b?endpoint=http://h:9000") == "s3://b?endpoint=http://h:9000"
