"""The daemon unit and the NixOS module run a daemon on an S3 bucket with credentials from a file."""

from __future__ import annotations

import json

from test_systemd_units_and_nixos_module import evaluate, systemd_argv, unit


def test_module_daemon_on_s3_takes_credentials_from_an_environment_file() -> None:
    url = "s3://nix-cache/tvix?endpoint=https://minio.example:9000"
    result = evaluate(daemon={"enable": True, "store": url, "environmentFile": "/run/secrets/tvixfs-s3.env"})
    assert result["failedAssertions"] == []
    service = result["config"]["systemd"]["services"]["tvixfs-daemon"]
    assert service["serviceConfig"]["EnvironmentFile"] == "/run/secrets/tvixfs-s3.env"
    argv = systemd_argv(service["serviceConfig"]["ExecStart"])
    assert argv[1:4] == ["daemon", "--store", url]
    assert "AWS_" not in json.dumps(service)  # nothing secret in the unit (or the Nix store)


def test_module_daemon_without_environment_file_sets_none() -> None:
    service = evaluate(daemon={"enable": True})["config"]["systemd"]["services"]["tvixfs-daemon"]
    assert "EnvironmentFile" not in service["serviceConfig"]


def test_shipped_daemon_unit_reads_the_store_from_its_environment_file() -> None:
    service = unit("tvixfs-daemon.service")["Service"]
    assert service["EnvironmentFile"] == ["-/etc/tvixfs/tvixfs-daemon.env"]
    assert "--store" not in systemd_argv(service["ExecStart"][0])  # $TVIXFS_STORE, overridable
