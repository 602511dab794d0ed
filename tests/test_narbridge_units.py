"""The nar-bridge's systemd unit and NixOS options (the shared checks are in tests/test_units.py)."""

from __future__ import annotations

from test_systemd_units_and_nixos_module import EVERY_OPTION, evaluate, systemd_argv, unit


def test_unit_serves_the_state_directory_read_only_on_loopback() -> None:
    service = unit("tvixfs-nar-bridge.service")["Service"]
    argv = systemd_argv(service["ExecStart"][0])
    assert argv[1:6] == ["nar-bridge", "--store", "local:///var/lib/tvixfs", "--listen", "127.0.0.1:9000"]
    assert "--allow-upload" not in argv
    assert argv[-1] == "$TVIXFS_NAR_BRIDGE_ARGS"
    # The same user and store as the gRPC daemon, with its hardening.
    daemon = unit("tvixfs-daemon.service")["Service"]
    for key in ("User", "Group", "StateDirectory", "UMask", "ProtectSystem", "SystemCallFilter"):
        assert service[key] == daemon[key], key


def test_module_defaults() -> None:
    result = evaluate(narBridge={"enable": True})
    assert result["failedAssertions"] == []
    services = result["config"]["systemd"]["services"]
    assert set(services) == {"tvixfs-nar-bridge"}
    config = services["tvixfs-nar-bridge"]["serviceConfig"]
    assert systemd_argv(config["ExecStart"])[1:] == [
        "nar-bridge", "--store", "local:///var/lib/tvixfs", "--listen", "127.0.0.1:9000", "--priority", "40",
    ]  # fmt: skip
    assert config["User"] == "tvixfs"
    assert "ReadWritePaths" not in config
    assert result["config"]["users"]["users"]["tvixfs"]["isSystemUser"] is True


def test_module_every_option() -> None:
    result = evaluate(**EVERY_OPTION)
    assert result["failedAssertions"] == []
    bridge = result["config"]["systemd"]["services"]["tvixfs-nar-bridge"]
    assert systemd_argv(bridge["serviceConfig"]["ExecStart"])[1:] == [
        "nar-bridge", "--store", "grpc+unix:///run/t.sock",
        "--listen", "unix:/run/tvixfs-nar-bridge/http.sock", "--priority", "30", "--allow-upload",
        "--sign-key", "/etc/tvixfs/cache.sec",
        "--trusted-public-key", "a:AAAA", "--trusted-public-key", "b:BBBB",
    ]  # fmt: skip


def test_module_store_outside_the_state_directory_is_writable() -> None:
    result = evaluate(narBridge={"enable": True, "store": "local:///srv/cache"})
    config = result["config"]["systemd"]["services"]["tvixfs-nar-bridge"]["serviceConfig"]
    assert config["ReadWritePaths"] == ["/srv/cache"]
