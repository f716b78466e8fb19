"""`python -m build`: a wheel and an sdist, without a warning, with one version and the licence."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from ciphertextfs import __version__

ROOT = Path(__file__).resolve().parent.parent


def test_build_makes_wheel_and_sdist_without_warnings(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("ciphertextfs", "docs"):
        shutil.copytree(
            ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    # No isolation: the build backend (setuptools>=77, a test extra) is already
    # installed, so the test needs no download.
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", tmp_path / "dist", src],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    warnings = [ln for ln in out.splitlines() if "warn" in ln.lower()]
    assert warnings == [], "\n".join(warnings)

    wheel = tmp_path / "dist" / f"ciphertextfs-{__version__}-py3-none-any.whl"
    sdist = tmp_path / "dist" / f"ciphertextfs-{__version__}.tar.gz"
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(f"ciphertextfs-{__version__}.dist-info/METADATA").decode()
        entry_points = z.read(f"ciphertextfs-{__version__}.dist-info/entry_points.txt").decode()
    assert "ciphertextfs/manpage.py" in names
    assert "ciphertextfs/commands/mount.py" in names
    assert f"ciphertextfs-{__version__}.dist-info/licenses/LICENSE" in names
    assert f"Version: {__version__}\n" in meta
    assert "License-Expression: Apache-2.0\n" in meta
    assert "ciphertextfs = ciphertextfs.cli:main" in entry_points
    with tarfile.open(sdist) as t:
        members = {m.name.split("/", 1)[1] for m in t.getmembers() if "/" in m.name}
    assert {"LICENSE", "pyproject.toml", "README.md", "ciphertextfs/cli.py"} <= members


def test_version_is_defined_once() -> None:
    """pyproject takes the version from the package, and the CLI reports that one."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject
    assert 'version = {attr = "ciphertextfs.__version__"}' in pyproject
    proc = subprocess.run(
        [sys.executable, "-m", "ciphertextfs", "--version"], capture_output=True, text=True
    )
    assert proc.stdout.strip() == f"ciphertextfs {__version__}"


def test_readme_install_is_what_ci_runs() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    command = "bash .ci/install && .venv/bin/python -m pytest"
    assert command in ci
    assert command in readme
    install = (ROOT / ".ci" / "install").read_text()
    assert "/usr/local/bin/ciphertextfs" in install
