"""The architecture rules `make lint` enforces hold on this tree, and each one fails when broken.

The contracts live in setup.cfg (``[importlinter:contract:*]``). Here they are
checked twice: on the real tree (all kept) and on a small tree that breaks each
rule once (each reported broken), so a rule that silently stopped checking
anything would fail this test.
"""
from __future__ import annotations

import configparser
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _lint_imports(cwd: Path, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "lint-imports"), "--config", str(config), "--no-cache"], cwd=cwd,
                          env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=120)


def _contract_names(config: Path) -> list[str]:
    parser = configparser.ConfigParser()
    parser.read(config)
    return [parser[s]["name"] for s in parser.sections() if s.startswith("importlinter:contract:")]


def test_the_tree_keeps_every_import_contract() -> None:
    result = _lint_imports(ROOT, ROOT / "setup.cfg")
    assert result.returncode == 0, result.stdout + result.stderr
    names = _contract_names(ROOT / "setup.cfg")
    assert len(names) == 4
    for name in names:
        assert f"{name} KEPT" in " ".join(result.stdout.split()), result.stdout


def test_each_import_contract_fails_when_broken(tmp_path: Path) -> None:
    files = {
        "shared/__init__.py": "",
        # A cycle between two siblings of shared/, one through a function-level import.
        "shared/a.py": "from shared import b\n",
        "shared/b.py": "def f():\n    from shared import a\n    return a\n",
        # shared reaching up into a process package.
        "shared/c.py": "import api.routes\n",
        "api/__init__.py": "",
        "api/routes.py": "",
        # api and scheduler reaching the CLI; workers reaching api.
        "api/cli_user.py": "import steprun.cli\n",
        "workers/__init__.py": "",
        "workers/tasks.py": "import api.routes\n",
        "scheduler/__init__.py": "",
        "steprun/__init__.py": "",
        "steprun/cli.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    config = configparser.ConfigParser()
    for section in parser.sections():
        if section.startswith("importlinter"):
            config[section] = dict(parser[section])
    with open(tmp_path / "setup.cfg", "w") as f:
        config.write(f)
    result = _lint_imports(tmp_path, tmp_path / "setup.cfg")
    assert result.returncode != 0
    out = " ".join(result.stdout.split())
    for name in _contract_names(tmp_path / "setup.cfg"):
        assert f"{name} BROKEN" in out, result.stdout


def test_mypy_fails_on_a_type_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f(x: int) -> str:\n    return x\n")
    result = subprocess.run([str(BIN / "mypy"), "--no-incremental", str(bad)], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)
    assert result.returncode == 1 and "Incompatible return value type" in result.stdout, result.stdout
