"""Issue 18: `tvixfs import` starts without the modules only other commands need.

A command asked for by name loads only the module that registers it (tvixfs/cli/__init__.py);
these tests keep that table true and check, in a fresh interpreter, what `import` loads.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from tvixfs import cli
from tvixfs.cli.app import app

# Modules the serving, maintenance and signing commands, TLS, the chunk workers (an import of
# more than a few files) and FastCDC (a file bigger than one chunk) need, and an import of a
# small tree must not load.
NOT_FOR_IMPORT = (
    "grpc", "trio", "pyfuse3", "cryptography", "prometheus_client", "obstore", "tvixfs.maintenance",
    "ssl", "multiprocessing", "fastcdc",
)  # fmt: skip


def _commands(group: typer.Typer) -> dict[str, str]:
    """Every command and group of the app, by name, with the module that registers it."""
    found = {}
    for command in group.registered_commands:
        assert command.callback is not None
        name = command.name or command.callback.__name__.replace("_", "-")
        found[name] = command.callback.__module__
    for sub in group.registered_groups:
        assert sub.name is not None and sub.typer_instance is not None
        found[sub.name] = next(iter(_commands(sub.typer_instance).values()))
    return found


def test_every_command_is_in_the_table() -> None:
    cli.register(None)
    registered = _commands(app)
    assert {name: f"tvixfs.cli.{module}" for name, module in cli.COMMAND_MODULES.items()} == registered
    assert set(cli.MODULES) == set(cli.COMMAND_MODULES.values())


def _loaded_by(args: list[str]) -> tuple[int, list[str]]:
    """Run the CLI with ``args`` in a fresh interpreter: its exit status and the modules it loaded."""
    program = (
        "import json, sys\n"
        f"sys.argv = ['tvixfs', *{args!r}]\n"
        "from tvixfs.cli import main\n"
        "code = 0\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as e:\n"
        "    code = e.code or 0\n"
        "print(json.dumps([code, sorted(sys.modules)]), file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=False)
    code, modules = json.loads(done.stderr.strip().splitlines()[-1])
    return code, modules


def _heavy(modules: list[str]) -> list[str]:
    return [m for m in modules if any(m == h or m.startswith(f"{h}.") for h in NOT_FOR_IMPORT)]


def test_import_loads_only_what_it_needs(tmp_path: Path) -> None:
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "file").write_bytes(b"contents\n")
    store = f"local://{tmp_path / 'store'}"
    code, modules = _loaded_by(["--quiet", "import", "--store", store, "--name", "t", str(tmp_path / "tree")])
    assert code == 0
    assert _heavy(modules) == []
    assert "tvixfs.cli.mount_cmd" not in modules and "tvixfs.cli.fsck_cmd" not in modules
    # The same store, read back by another store command: the import committed it.
    shown = subprocess.run(
        [sys.executable, "-c", "from tvixfs.cli import main; main()", "ls", "--store", store],
        capture_output=True,
        text=True,
        check=True,
    )
    assert shown.stdout.strip().endswith("-t")


@pytest.mark.nix
def test_signing_and_help_still_load_what_they_need(tmp_path: Path) -> None:
    """A key given to import loads the signing code; no command loads every command."""
    key = tmp_path / "key.sec"
    subprocess.run(
        ["nix-store", "--generate-binary-cache-key", "test-1", str(key), str(tmp_path / "key.pub")],
        check=True,
    )
    (tmp_path / "tree").mkdir()
    store = f"local://{tmp_path / 'store'}"
    code, modules = _loaded_by(["import", "--store", store, "--sign-key", str(key), str(tmp_path / "tree")])
    assert code == 0 and "cryptography" in modules
    code, modules = _loaded_by(["--help"])
    assert code == 0 and all(f"tvixfs.cli.{m}" in modules for m in cli.MODULES)
