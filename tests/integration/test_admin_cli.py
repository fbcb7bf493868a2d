"""What a new administrator meets first: the ``pacs-bridge`` command's answers to a wrong setup.

Each case runs the real command as a subprocess: an unwritable data folder
(a read-only tmpfs mount: writes fail there for root too), a read command
pointed at a folder with no database, an installation without ONNX Runtime,
a missing model, and ``config --show`` with secrets in the settings. Each
must end in one line on stderr that says what to do, exit status 2, and no
traceback.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from pacs_bridge.store.db import open_database
from tests.support.serve import ROOT, free_port, run_cli

# Runs the command as if ONNX Runtime were not installed (a None entry makes its import fail).
WITHOUT_ONNXRUNTIME = (
    "import sys; sys.modules['onnxruntime'] = None; "
    "from pacs_bridge.cli import main; raise SystemExit(main(sys.argv[1:]))"
)


def _write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(tomli_w.dumps(config), encoding="utf-8")
    return path


def _site(tmp_path: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = {
        "dicom": {"host": "127.0.0.1", "port": free_port()},
        "storage": {"data_dir": str(tmp_path / "data"), "min_free_mb": 1},
        "watch": {"inbox": str(tmp_path / "inbox")},
        "analysis": {"enabled": False},
        "web": {"enabled": False},
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    return config


def _one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The command failed with exit 2 and said why in one ``pacs-bridge: ...`` line, with no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-4000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("pacs-bridge: ")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Iterator[Path]:
    """An existing, empty folder on a read-only tmpfs mount."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True, text=True, check=False
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_serve_refuses_a_read_only_data_folder(tmp_path: Path, read_only_folder: Path) -> None:
    config = _write_config(tmp_path / "site.toml", _site(tmp_path, storage={"data_dir": str(read_only_folder)}))
    proc = run_cli("serve", "--config", str(config), timeout=60)
    line = _one_error_line(proc)
    assert str(read_only_folder) in line
    assert "Read-only file system" in line
    assert "[storage] data_dir" in line
    assert not any(read_only_folder.iterdir())


def test_serve_refuses_a_read_only_inbox_before_it_starts(tmp_path: Path, read_only_folder: Path) -> None:
    config = _write_config(tmp_path / "site.toml", _site(tmp_path, watch={"inbox": str(read_only_folder)}))
    proc = run_cli("serve", "--config", str(config), timeout=60)
    line = _one_error_line(proc)
    assert f"[watch] inbox {read_only_folder} is not writable: Read-only file system" in line
    # Checked before anything started: no database was created.
    assert not (tmp_path / "data" / "pacs-bridge.db").exists()


def test_serve_names_a_data_folder_under_a_file(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    config = _write_config(
        tmp_path / "site.toml", _site(tmp_path, storage={"data_dir": str(tmp_path / "a-file" / "data")})
    )
    line = _one_error_line(run_cli("serve", "--config", str(config), timeout=60))
    assert f"{tmp_path / 'a-file' / 'data'} cannot be created: Not a directory" in line


@pytest.mark.parametrize("command", [["results"], ["results", "--json"], ["reanalyse", "1.2.3"], ["resend", "1.2.3"]])
def test_read_commands_never_create_a_database(tmp_path: Path, command: list[str]) -> None:
    empty = tmp_path / "wrong-folder"
    empty.mkdir()
    line = _one_error_line(run_cli(*command, "--data-dir", str(empty)))
    assert f"no database at {empty / 'pacs-bridge.db'}" in line
    assert list(empty.iterdir()) == []
    missing = tmp_path / "missing-folder"
    _one_error_line(run_cli(*command, "--data-dir", str(missing)))
    assert not missing.exists()


def test_read_commands_refuse_a_file_that_is_not_a_pacs_bridge_database(tmp_path: Path) -> None:
    (tmp_path / "pacs-bridge.db").write_bytes(b"")
    line = _one_error_line(run_cli("results", "--data-dir", str(tmp_path)))
    assert "no pacs-bridge database" in line
    assert (tmp_path / "pacs-bridge.db").stat().st_size == 0


def test_read_commands_work_on_the_database_serve_created(tmp_path: Path) -> None:
    db = open_database(f"sqlite:///{tmp_path / 'pacs-bridge.db'}")
    db.dispose()
    proc = run_cli("results", "--data-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("study instance UID")
    proc = run_cli("reanalyse", "--data-dir", str(tmp_path), "1.2.3")
    assert proc.returncode == 1
    assert "no study 1.2.3" in proc.stderr


def _without_onnxruntime(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_ONNXRUNTIME, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=60,
        check=False,
    )


def test_serve_without_onnx_runtime_names_the_cpu_extra(tmp_path: Path) -> None:
    config = _write_config(tmp_path / "site.toml", _site(tmp_path, analysis={"enabled": True}))
    line = _one_error_line(_without_onnxruntime("serve", "--config", str(config), cwd=tmp_path))
    assert "ONNX Runtime is not installed" in line
    assert "pip install 'pacs-bridge[cpu]'" in line
    assert "[analysis] enabled = false" in line


def test_infer_without_onnx_runtime_names_the_cpu_extra_not_train(tmp_path: Path) -> None:
    line = _one_error_line(_without_onnxruntime("infer", str(tmp_path / "image.png"), cwd=tmp_path))
    assert "pip install 'pacs-bridge[cpu]'" in line
    assert "train" not in line


def test_serve_refuses_to_start_without_a_model(tmp_path: Path) -> None:
    missing = tmp_path / "no-model-here"
    config = _write_config(
        tmp_path / "site.toml", _site(tmp_path, analysis={"enabled": True, "model_dir": str(missing)})
    )
    line = _one_error_line(run_cli("serve", "--config", str(config), timeout=60))
    assert str(missing) in line
    assert "[analysis] model_dir" in line


def test_config_show_masks_every_secret(tmp_path: Path) -> None:
    config = _site(
        tmp_path,
        storage={"database_url": "postgresql+psycopg://bridge:db-s3cret@db.example.org:5432/bridge"},
        web={"api_tokens": ["sha256:" + "5" * 64]},
    )
    config["destinations"] = [
        {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104},
        {
            "name": "archive",
            "type": "dicomweb",
            "url": "https://archive.example.org/dicom-web",
            "auth": "basic",
            "username": "bridge",
            "password": "dest-s3cret",
        },
        {
            "name": "hook",
            "type": "webhook",
            "url": "https://hooks.example.org/ai",
            "auth": "bearer",
            "token": "token-s3cret",
        },
    ]
    path = _write_config(tmp_path / "site.toml", config)
    proc = run_cli("config", "--show", "--config", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "s3cret" not in proc.stdout
    assert "5555" not in proc.stdout
    assert 'database_url = "postgresql+psycopg://bridge:********@db.example.org:5432/bridge"' in proc.stdout
    assert proc.stdout.count('"********"') >= 3
    assert 'username = "bridge"' in proc.stdout


def test_a_receive_only_node_needs_no_onnx_runtime(tmp_path: Path) -> None:
    """Only nodes with the analyse role check for ONNX Runtime and the model."""
    config = _write_config(tmp_path / "site.toml", _site(tmp_path, analysis={"enabled": True}))
    assert run_cli("migrate", "--config", str(config)).returncode == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", WITHOUT_ONNXRUNTIME, "serve", "--config", str(config), "--roles", "receive"],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env=env,
        )
        try:
            deadline = time.monotonic() + 60
            while "pacs-bridge ready" not in log.read_text(errors="replace"):
                assert proc.poll() is None, log.read_text(errors="replace")
                assert time.monotonic() < deadline, log.read_text(errors="replace")
                time.sleep(0.2)
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=60)
    assert code == 0, log.read_text(errors="replace")
