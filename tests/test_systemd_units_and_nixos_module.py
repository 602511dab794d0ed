"""The systemd units and the NixOS module: what systemd and Nix themselves say about them.

``systemd-analyze verify`` exits 0 after many errors ("... ignoring"), so any output fails.
The NixOS module is evaluated with Debian's Nix against ``tests/nix/lib.nix``, a stand-in for the
parts of nixpkgs' lib it uses (nixpkgs cannot be fetched here).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
MODULE = ROOT / "nixos-module" / "default.nix"
EVAL = ROOT / "tests" / "nix" / "eval.nix"
BINARY = "/usr/local/bin/tvixfs"
MOUNT_UNITS = ("tvixfs.service", "tvixfs@.service")
ALL_UNITS = (*MOUNT_UNITS, "tvixfs-daemon.service", "tvixfs-nar-bridge.service")

# Each gives the service a mount namespace of its own, which would hide the FUSE mount.
NAMESPACING = {
    "PrivateTmp", "PrivateDevices", "PrivateMounts", "PrivateNetwork", "PrivateIPC",
    "PrivateUsers", "ProtectSystem", "ProtectHome", "ProtectKernelTunables",
    "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups", "ProtectProc",
    "ProcSubset", "ReadWritePaths", "ReadOnlyPaths", "InaccessiblePaths", "BindPaths",
    "BindReadOnlyPaths", "TemporaryFileSystem", "RootDirectory", "RootImage", "MountAPIVFS",
    "DynamicUser", "StateDirectory", "MountFlags",
}  # fmt: skip

Unit = dict[str, dict[str, list[str]]]


def parse_unit(text: str) -> Unit:
    """Sections -> key -> every value in order (systemd keys may repeat)."""
    sections: Unit = {}
    current: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


def unit(name: str) -> Unit:
    return parse_unit((UNITS / name).read_text())


def systemd_argv(command: str) -> list[str]:
    """An Exec*= line as systemd splits it; ``$$``/``%%`` are the escapes of ``$``/``%``."""
    return [w.replace("$$", "$").replace("%%", "%") for w in shlex.split(command.lstrip("-"))]


# --- systemd-analyze ---------------------------------------------------------------------------


def verify(paths: list[Path]) -> str:
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return (
        f"exit {done.returncode}\n{done.stdout}{done.stderr}"
        if done.returncode or (done.stdout + done.stderr).strip()
        else ""
    )


@pytest.fixture
def installed_units(tmp_path: Path, tvixfs_cmd: list[str]) -> list[Path]:
    """The units with ExecStart= pointing at the real console script: verify checks it exists."""
    out = []
    for name in ALL_UNITS:
        text = (UNITS / name).read_text()
        assert BINARY in text
        (tmp_path / name).write_text(text.replace(BINARY, tvixfs_cmd[0]))
        out.append(tmp_path / name)
    return out


def test_systemd_analyze_verify_is_silent(installed_units: list[Path]) -> None:
    assert verify(installed_units) == ""


def test_systemd_analyze_verify_reports_a_bad_unit(installed_units: list[Path]) -> None:
    """The check above is live: an unknown key or a missing binary does produce output."""
    bad = installed_units[0].with_name("bad.service")
    text = installed_units[0].read_text().replace("KillMode=mixed", "KillMode=mixed\nKilMode=all")
    bad.write_text(text)
    assert "Unknown key" in verify([bad])
    missing = installed_units[0].with_name("missing.service")
    missing.write_text((UNITS / "tvixfs.service").read_text().replace(BINARY, "/nonexistent/tvixfs"))
    assert "not executable" in verify([missing])


# Stand-ins for Nix's own units, shaped like the real ones (a socket-activated daemon).
NIX_DAEMON_STUBS = {
    "nix-daemon.socket": "[Socket]\nListenStream=/nix/var/nix/daemon-socket/socket\n",
    "nix-daemon.service": "[Unit]\nRequires=nix-daemon.socket\nAfter=nix-daemon.socket\n"
    "[Service]\nExecStart=/bin/true\n",
}


def test_boot_transaction_has_no_ordering_cycle(installed_units: list[Path]) -> None:
    """Everything a boot starts together, Nix's daemon and socket included: systemd would
    otherwise break a cycle by dropping a job (possibly the mount) and say so."""
    directory = installed_units[0].parent
    for name, text in NIX_DAEMON_STUBS.items():
        (directory / name).write_text(text)
    wanted = "basic.target sockets.target network-online.target tvixfs.service tvixfs@srv-store.service"
    boot = directory / "boot.target"
    boot.write_text(f"[Unit]\nWants={wanted} tvixfs-daemon.service {' '.join(NIX_DAEMON_STUBS)}\n")
    assert verify([boot]) == ""
    # The check is live: the mount ordered before Nix's socket is such a cycle.
    mount = directory / "tvixfs.service"
    mount.write_text(mount.read_text().replace("Before=nix-daemon.service", "Before=nix-daemon.socket"))
    assert "ordering cycle" in verify([boot])


def test_sysusers_entry_creates_the_daemon_user(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", str(UNITS / "tvixfs.sysusers")],
        capture_output=True,
        timeout=60,
        check=True,
    )
    daemon = unit("tvixfs-daemon.service")["Service"]
    passwd = (tmp_path / "etc" / "passwd").read_text()
    assert re.search(rf"^{daemon['User'][0]}:x:\d+:\d+:[^:]*:/var/lib/tvixfs:", passwd, re.M)


# --- what the unit files promise -------------------------------------------------------------


@pytest.mark.parametrize("name", MOUNT_UNITS)
def test_mount_units_keep_the_mount_visible_to_the_host(name: str) -> None:
    service = unit(name)["Service"]
    assert not NAMESPACING & service.keys()
    assert "CAP_SYS_ADMIN" in service["CapabilityBoundingSet"][0].split()
    assert service["DeviceAllow"] == ["/dev/fuse rw"]


@pytest.mark.parametrize("name", ALL_UNITS)
def test_units_are_notify_services_run_by_the_installed_binary(name: str) -> None:
    service = unit(name)["Service"]
    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]
    assert systemd_argv(service["ExecStart"][0])[0] == BINARY


def test_nix_store_mount_is_ordered_for_nix_and_a_remote_store() -> None:
    u = unit("tvixfs.service")
    assert u["Unit"]["Before"] == ["nix-daemon.service"]
    assert "network-online.target" in u["Unit"]["Wants"]
    assert {"network-online.target", "tvixfs-daemon.service"} <= set(u["Unit"]["After"])
    argv = systemd_argv(u["Service"]["ExecStart"][0])
    assert argv[1] == "mount"
    assert argv[-1] == "/nix/store"
    assert "--allow-other" in argv
    assert "$TVIXFS_MOUNT_ARGS" in argv
    assert u["Service"]["EnvironmentFile"] == ["-/etc/tvixfs/tvixfs.env"]


def test_template_matches_the_nix_store_unit() -> None:
    """The template differs only where the mount point or instance must appear."""
    main, template = unit("tvixfs.service")["Service"], unit("tvixfs@.service")["Service"]
    per_mount_point = {"ExecStartPre", "ExecStart", "ExecStopPost", "EnvironmentFile"}
    assert {k: v for k, v in main.items() if k not in per_mount_point} == {
        k: v for k, v in template.items() if k not in per_mount_point
    }
    assert systemd_argv(template["ExecStart"][0])[-1] == "%f"
    assert template["EnvironmentFile"] == ["-/etc/tvixfs/tvixfs.env", "-/etc/tvixfs/%i.env"]


def test_daemon_unit_serves_the_state_directory() -> None:
    service = unit("tvixfs-daemon.service")["Service"]
    argv = systemd_argv(service["ExecStart"][0])
    assert argv[1:4] == ["daemon", "--listen", "unix:/run/tvixfs/daemon.sock"]
    # The store comes from $TVIXFS_STORE, which the environment file may change (s3://...).
    assert "TVIXFS_STORE=local:///var/lib/tvixfs" in service["Environment"]
    assert argv[4:6] == ["--listen", "[::1]:8000"]
    assert service["StateDirectory"] == ["tvixfs"]
    assert service["RuntimeDirectory"] == ["tvixfs"]
    assert service["ProtectSystem"] == ["strict"]


@pytest.mark.nix
def test_unit_and_module_flags_exist_in_the_cli(tvixfs_cmd: list[str]) -> None:
    """Every option the units and the module pass is one the installed CLI accepts."""
    generated = evaluate(**EVERY_OPTION)["config"]["systemd"]["services"]
    commands = [systemd_argv(unit(n)["Service"]["ExecStart"][0]) for n in ALL_UNITS] + [
        systemd_argv(s["serviceConfig"]["ExecStart"]) for s in generated.values()
    ]
    for command in ("mount", "daemon", "nar-bridge"):
        helptext = subprocess.run(
            [*tvixfs_cmd, command, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
            env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
        ).stdout
        flags = {a for argv in commands if argv[1] == command for a in argv if a.startswith("--")}
        assert flags
        for flag in flags:
            assert re.search(rf"{flag}\b", helptext), f"tvixfs {command} has no {flag}"


# --- the NixOS module --------------------------------------------------------------------------


def nix(*args: str) -> str:
    if shutil.which("nix-instantiate") is None:
        pytest.fail("nix-instantiate is not installed: run scripts/install.sh")
    done = subprocess.run(
        ["nix-instantiate", *args], capture_output=True, text=True, timeout=120, check=False
    )
    if done.returncode:
        raise AssertionError(done.stderr)
    return done.stdout


def evaluate(**settings: Any) -> dict[str, Any]:
    """services.tvixfs = settings, evaluated; returns config, failedAssertions and options."""
    out = nix("--eval", "--strict", "--json", str(EVAL), "--argstr", "settings", json.dumps(settings))
    result: dict[str, Any] = json.loads(out)
    return result


@pytest.mark.parametrize("path", [MODULE, *sorted((ROOT / "tests" / "nix").glob("*.nix"))])
def test_nix_files_parse(path: Path) -> None:
    nix("--parse", str(path))


@pytest.mark.nix
def test_module_defaults_mount_nix_store_from_the_embedded_store() -> None:
    result = evaluate(enable=True)
    assert result["failedAssertions"] == []
    services = result["config"]["systemd"]["services"]
    assert set(services) == {"tvixfs"}
    mount = services["tvixfs"]
    argv = systemd_argv(mount["serviceConfig"]["ExecStart"])
    assert argv[0].endswith("-tvixfs-0.1.0/bin/tvixfs")
    assert argv[1:] == ["mount", "--store", "local:///var/lib/tvixfs", "--allow-other", "/nix/store"]
    assert mount["before"] == ["nix-daemon.service"]
    assert mount["wants"] == ["network-online.target"]
    assert mount["after"] == ["network-online.target", "tvixfs-daemon.service"]
    assert mount["wantedBy"] == ["multi-user.target"]
    assert "users" not in result["config"]


# Every option that adds an argument, on a remote store mounted elsewhere.
EVERY_OPTION: dict[str, Any] = {
    "enable": True,
    "mountPoint": "/mnt/tvix store",
    "store": "grpc+http://cache.example:8000",
    "blobServiceAddr": "grpc+unix:///run/blobs.sock",
    "directoryServiceAddr": "grpc+http://dirs:1",
    "pathInfoServiceAddr": "grpc+http://infos:2",
    "listRoot": True,
    "cacheSize": "1G",
    "diskCache": {"size": "2G"},
    "daemon": {"enable": True, "listen": ["unix:/run/t.sock", "[::]:8000"], "store": "memory://"},
    "narBridge": {
        "enable": True,
        "listen": "unix:/run/tvixfs-nar-bridge/http.sock",
        "store": "grpc+unix:///run/t.sock",
        "allowUpload": True,
        "signKeyFile": "/etc/tvixfs/cache.sec",
        "trustedPublicKeys": ["a:AAAA", "b:BBBB"],
        "priority": 30,
    },
}


@pytest.mark.nix
def test_module_remote_store_elsewhere_with_every_option() -> None:
    result = evaluate(**EVERY_OPTION, extraArgs=["--verbose", "--label=100% $HOME"])
    assert result["failedAssertions"] == []
    mount = result["config"]["systemd"]["services"]["tvixfs"]
    assert systemd_argv(mount["serviceConfig"]["ExecStart"])[1:] == [
        "mount", "--store", "grpc+http://cache.example:8000",
        "--blob-service-addr", "grpc+unix:///run/blobs.sock",
        "--directory-service-addr", "grpc+http://dirs:1",
        "--path-info-service-addr", "grpc+http://infos:2",
        "--list-root", "--cache-size", "1G", "--disk-cache", "/var/cache/tvixfs", "--disk-cache-size", "2G",
        "--verbose", "--label=100% $HOME", "/mnt/tvix store",
    ]  # fmt: skip
    # Not /nix/store: no ordering against Nix, and only root may look inside by default.
    assert mount["before"] == []
    assert mount["unitConfig"]["RequiresMountsFor"] == ["/mnt"]
    assert systemd_argv(mount["serviceConfig"]["ExecStopPost"])[-1] == "/mnt/tvix store"


@pytest.mark.nix
def test_module_disk_cache_for_remote_stores_only() -> None:
    """On by default, in the service's CacheDirectory; flags only when the store is remote."""
    local = evaluate(enable=True)["config"]["systemd"]["services"]["tvixfs"]["serviceConfig"]
    assert "--disk-cache" not in systemd_argv(local["ExecStart"])
    remote = evaluate(enable=True, store="grpc+http://cache.example:8000")["config"]["systemd"]
    service = remote["services"]["tvixfs"]["serviceConfig"]
    argv = systemd_argv(service["ExecStart"])
    assert argv[argv.index("--disk-cache") + 1 :][:3] == ["/var/cache/tvixfs", "--disk-cache-size", "10G"]
    assert (service["CacheDirectory"], service["CacheDirectoryMode"]) == ("tvixfs", "0700")
    off = evaluate(enable=True, store="grpc+http://c:1", diskCache={"enable": False})["config"]["systemd"]
    assert "--disk-cache" not in systemd_argv(off["services"]["tvixfs"]["serviceConfig"]["ExecStart"])
    assert "CacheDirectory" not in off["services"]["tvixfs"]["serviceConfig"]
    elsewhere = evaluate(enable=True, store="grpc+http://c:1", diskCache={"directory": "/srv/c"})["config"]
    service = elsewhere["systemd"]["services"]["tvixfs"]["serviceConfig"]
    assert "/srv/c" in systemd_argv(service["ExecStart"])
    assert "CacheDirectory" not in service


@pytest.mark.parametrize("name", MOUNT_UNITS)
def test_mount_units_keep_a_disk_cache_without_a_mount_namespace(name: str) -> None:
    """CacheDirectory= sets up a namespace only with DynamicUser= or RootDirectory=."""
    service = unit(name)["Service"]
    assert service["CacheDirectory"] == ["tvixfs"]
    assert not {"DynamicUser", "RootDirectory", "RootImage"} & service.keys()
    environment = dict(e.split("=", 1) for e in service["Environment"])
    assert environment["TVIXFS_DISK_CACHE"] == "/var/cache/tvixfs"
    assert environment["TVIXFS_DISK_CACHE_SIZE"] == "10G"


@pytest.mark.nix
def test_module_daemon_with_firewall() -> None:
    result = evaluate(
        daemon={
            "enable": True,
            "listen": ["unix:/run/tvixfs/daemon.sock", "[::]:8000", "127.0.0.1:9000", "10.1.2.3:8000"],
            "openFirewall": True,
        }
    )
    assert result["failedAssertions"] == []
    config = result["config"]
    daemon = config["systemd"]["services"]["tvixfs-daemon"]
    assert systemd_argv(daemon["serviceConfig"]["ExecStart"])[1:] == [
        "daemon", "--store", "local:///var/lib/tvixfs",
        "--listen", "unix:/run/tvixfs/daemon.sock", "--listen", "[::]:8000",
        "--listen", "127.0.0.1:9000", "--listen", "10.1.2.3:8000",
    ]  # fmt: skip
    assert config["networking"]["firewall"]["allowedTCPPorts"] == [8000]
    assert config["users"]["users"]["tvixfs"]["isSystemUser"] is True
    assert "tvixfs" not in config["systemd"]["services"]
    assert "ReadWritePaths" not in daemon["serviceConfig"]


@pytest.mark.nix
def test_module_daemon_store_outside_the_state_directory_is_writable() -> None:
    result = evaluate(daemon={"enable": True, "store": "local:///srv/tvixfs"})
    assert result["config"]["systemd"]["services"]["tvixfs-daemon"]["serviceConfig"]["ReadWritePaths"] == [
        "/srv/tvixfs"
    ]


@pytest.mark.nix
def test_module_mount_through_the_local_daemon_needs_no_assertion() -> None:
    """A mount of the daemon's socket with the daemon disabled is fine: it may run elsewhere."""
    result = evaluate(enable=True, store="grpc+unix:///run/tvixfs/daemon.sock")
    assert result["failedAssertions"] == []


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"enable": True, "mountPoint": "mnt/store"}, "mountPoint must be an absolute path"),
        ({"daemon": {"enable": True, "openFirewall": True}}, "there is no port to open"),
        ({"daemon": {"enable": True, "listen": ["unix:/s.sock"], "openFirewall": True}}, "no port"),
        ({"daemon": {"enable": True, "store": "grpc+unix:///run/tvixfs/daemon.sock"}}, "loop"),
        ({"daemon": {"enable": True, "store": "grpc+http://localhost:8000"}}, "loop"),
        ({"daemon": {"enable": True, "listen": ["unix:///d.sock"], "store": "grpc+unix:///d.sock"}}, "loop"),
        ({"daemon": {"enable": True, "listen": ["[::]:7000"], "store": "grpc+http://[::1]:7000"}}, "loop"),
        ({"daemon": {"enable": True, "listen": ["8000"]}}, "not `unix:/path` or `host:port`: 8000"),
        ({"daemon": {"enable": True, "listen": []}}, "at least one address"),
    ],
)
def test_module_rejects_contradictions(settings: dict[str, Any], message: str) -> None:
    failed = evaluate(**settings)["failedAssertions"]
    assert len(failed) == 1
    assert message in failed[0]


@pytest.mark.nix
def test_module_rejects_unknown_and_mistyped_options() -> None:
    with pytest.raises(AssertionError, match="no such option: mountpoint"):
        evaluate(enable=True, mountpoint="/x")
    with pytest.raises(AssertionError, match="allowOther: not a bool"):
        evaluate(enable=True, allowOther="yes")


@pytest.mark.nix
def test_readme_example_evaluates() -> None:
    """The NixOS example in README.md sets real options, of the right types, consistently."""
    readme = (ROOT / "README.md").read_text()
    example = readme.split("```nix\n", 1)[1].split("```", 1)[0]
    settings = json.loads(
        nix("--eval", "--strict", "--json", "-E", f"(({example}) {{ pkgs = {{ }}; }}).services.tvixfs")
    )
    result = evaluate(**settings)
    assert result["failedAssertions"] == []
    assert result["config"]["networking"]["firewall"]["allowedTCPPorts"] == [8000]
    assert set(result["config"]["systemd"]["services"]) == {"tvixfs", "tvixfs-daemon", "tvixfs-nar-bridge"}


@pytest.mark.nix
def test_module_options_are_documented() -> None:
    options = evaluate()["options"]
    assert len(options) == 28
    for option in options:
        assert option["description"].strip(), option["name"]


def render(value: Any) -> list[str]:
    """A serviceConfig value as NixOS writes it into the unit: lists repeat the key."""
    if isinstance(value, bool):
        return ["yes" if value else "no"]
    if isinstance(value, list):
        return [v for item in value for v in render(item)]
    return [str(value)]


@pytest.mark.nix
@pytest.mark.parametrize(
    ("unit_name", "service_name", "settings"),
    [
        ("tvixfs.service", "tvixfs", {"enable": True}),
        ("tvixfs-daemon.service", "tvixfs-daemon", {"daemon": {"enable": True}}),
        ("tvixfs-nar-bridge.service", "tvixfs-nar-bridge", {"narBridge": {"enable": True}}),
    ],
)
def test_module_services_equal_the_shipped_units(
    unit_name: str, service_name: str, settings: dict[str, Any]
) -> None:
    """Same settings and hardening; only how configuration reaches the command line differs."""
    shipped = unit(unit_name)
    generated = evaluate(**settings)["config"]["systemd"]["services"][service_name]
    by_environment = {"ExecStart", "ExecStartPre", "ExecStopPost", "Environment", "EnvironmentFile"}
    assert {k: render(v) for k, v in generated["serviceConfig"].items() if k not in by_environment} == {
        k: v for k, v in shipped["Service"].items() if k not in by_environment
    }
    for key in ("After", "Before", "Wants"):
        words = [w for line in shipped["Unit"].get(key, []) for w in line.split()]
        assert generated.get(key.lower(), []) == words, key
    mounts = [w for line in shipped["Unit"].get("RequiresMountsFor", []) for w in line.split()]
    assert generated.get("unitConfig", {}).get("RequiresMountsFor", []) == mounts
    # The unit passes the store in $TVIXFS_STORE and extra arguments in another variable.
    environment = dict(e.split("=", 1) for e in shipped["Service"].get("Environment", []))
    shipped_args = [a for a in systemd_argv(shipped["Service"]["ExecStart"][0])[1:] if a[0] != "$"]
    if "TVIXFS_STORE" in environment:
        shipped_args[1:1] = ["--store", environment["TVIXFS_STORE"]]
    assert systemd_argv(generated["serviceConfig"]["ExecStart"])[1:] == shipped_args
