"""The wheel an administrator installs: it carries the bundled model, every package, and no top-level ``trainer``.

The wheel is built from a copy of the repository's packaging inputs with the
project's own setuptools (no network), inspected, then installed without
dependencies into a fresh virtual environment that borrows the project
environment's dependencies; the installed ``pacs-bridge`` then runs from a
folder outside the checkout.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.paths import REPO_ROOT

pytestmark = pytest.mark.slow

MODEL = "fracatlas-cnn"
BUNDLED = f"pacs_bridge/_bundled_models/{MODEL}"


def _run(*cmd: str | Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, env=env, timeout=300, check=False
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip wheel --no-deps .`` on a copy of what the build reads (the checkout is left untouched)."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO_ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pacs_bridge", "trainer", "models"):
        shutil.copytree(REPO_ROOT / name, src / name, ignore=ignore)
    dist = work / "dist"
    proc = _run(
        sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", ".", "-w", dist,
        cwd=src,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wheels = list(dist.glob("pacs_bridge-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def wheel_names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def test_wheel_carries_the_bundled_model(wheel: Path, wheel_names: set[str]) -> None:
    for name in ("model.onnx", "model.json", "LICENSE-AND-CITATION.txt"):
        assert f"{BUNDLED}/{name}" in wheel_names, name
    with zipfile.ZipFile(wheel) as archive:
        manifest = json.loads(archive.read(f"{BUNDLED}/model.json"))
        onnx = archive.read(f"{BUNDLED}/model.onnx")
    assert hashlib.sha256(onnx).hexdigest() == manifest["sha256"]
    assert onnx == (REPO_ROOT / "models" / MODEL / "model.onnx").read_bytes()


def test_wheel_has_no_top_level_trainer(wheel_names: set[str]) -> None:
    top_level = {name.split("/", 1)[0] for name in wheel_names}
    assert "trainer" not in top_level
    assert "models" not in top_level
    assert {"pacs_bridge", "pacs_bridge_trainer"} <= top_level
    assert "pacs_bridge_trainer/cli.py" in wheel_names


def test_wheel_holds_every_file_of_the_checkout(wheel_names: set[str]) -> None:
    """Modules, migrations, templates: a new subpackage or data folder must also be named in pyproject.toml."""
    expected: set[str] = set()
    for folder, installed in (("pacs_bridge", "pacs_bridge"), ("trainer", "pacs_bridge_trainer")):
        for path in (REPO_ROOT / folder).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                expected.add(f"{installed}/{path.relative_to(REPO_ROOT / folder).as_posix()}")
    missing = sorted(expected - wheel_names)
    assert not missing, f"not in the wheel (name the package or its data in pyproject.toml): {missing}"


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh virtual environment with the wheel installed (--no-deps); dependencies come from the project's."""
    venv = tmp_path_factory.mktemp("venv") / "env"
    base = getattr(sys, "_base_executable", sys.executable)
    proc = _run(base, "-m", "venv", "--without-pip", venv, cwd=venv.parent)
    assert proc.returncode == 0, proc.stderr
    python = venv / "bin" / "python"
    site = _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=venv.parent)
    # The project's site-packages as a plain path: its dependencies import, its editable finder does not load.
    Path(site.stdout.strip(), "project-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    proc = _run(
        sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "--ignore-installed",
        wheel, cwd=venv.parent,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    yield venv


def _outside_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PACS_BRIDGE_", "PYTHON"))}
    env["HOME"] = str(tmp)
    return env


def test_installed_wheel_finds_its_model_outside_the_checkout(installed: Path, tmp_path: Path) -> None:
    script = (
        "import json, pacs_bridge\n"
        "from pacs_bridge.inference.model import default_model_dir, load_model\n"
        "model = load_model(default_model_dir(), providers='cpu')\n"
        "print(json.dumps({'package': pacs_bridge.__file__, 'model_dir': str(default_model_dir()),\n"
        "                  'name': model.manifest.name}))\n"
    )
    proc = _run(installed / "bin" / "python", "-c", script, cwd=tmp_path, env=_outside_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(found["package"]).is_relative_to(installed)
    assert Path(found["model_dir"]).is_relative_to(installed)
    assert Path(found["model_dir"]).parts[-2:] == ("_bundled_models", MODEL)
    assert found["name"] == json.loads((REPO_ROOT / "models" / MODEL / "model.json").read_text())["name"]


def test_installed_command_runs_outside_the_checkout(installed: Path, tmp_path: Path) -> None:
    command = installed / "bin" / "pacs-bridge"
    env = _outside_env(tmp_path)
    proc = _run(command, "config", "--show", "--data-dir", tmp_path / "data", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r'^data_dir = ".*data"$', proc.stdout, re.MULTILINE), proc.stdout
    # The trainer loads from pacs_bridge_trainer (argument parsing needs no TensorFlow) ...
    proc = _run(command, "train", "--help", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("usage: pacs-bridge train")
    # ... and no top-level "trainer" was installed.
    proc = _run(installed / "bin" / "python", "-c", "import trainer", cwd=tmp_path, env=env)
    assert proc.returncode != 0
    assert "No module named 'trainer'" in proc.stderr


def _install_blocks(readme: str) -> list[str]:
    section = readme.split("### Installing without make", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, re.DOTALL)


def test_readme_install_blocks_never_install_cpu_and_gpu_together() -> None:
    """Each block can be pasted as it is: onnxruntime and onnxruntime-gpu must not end up side by side."""
    blocks = _install_blocks((REPO_ROOT / "README.md").read_text(encoding="utf-8"))
    assert blocks
    runtimes: set[str] = set()
    for block in blocks:
        extras: set[str] = set()
        for line in block.splitlines():
            command = line.split("#", 1)[0]
            if "pip install" in command:
                for group in re.findall(r"\[([a-z0-9_,\s-]+)\]", command):
                    extras |= {extra.strip() for extra in group.split(",")}
        assert not {"cpu", "gpu"} <= extras, block
        runtimes |= extras & {"cpu", "gpu"}
    assert runtimes == {"cpu", "gpu"}, "the README shows how to install either runtime"
