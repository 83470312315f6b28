"""The status page's files are package data: what setuptools builds for a wheel (build_py)
carries every file the page serves, and the installed package reads them from itself."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from vacfactory.view.page import STATIC, static_file

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_a_built_package_carries_every_file_the_page_serves(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, name), source / name)
    shutil.copytree(os.path.join(REPO, "vacfactory"), source / "vacfactory",
                    ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run([sys.executable, "-c", "import setuptools; setuptools.setup()", "-q", "build_py",
                             "--build-lib", str(tmp_path / "lib")], cwd=source, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    built = tmp_path / "lib" / "vacfactory" / "view" / "static"
    for name, _ in set(STATIC.values()):
        assert (built / name).read_bytes() == static_file(name), name
