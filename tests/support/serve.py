"""Run a real ``pacs-bridge serve`` as a subprocess for tests.

The server gets its own data folder, a TOML configuration file written from
a dict, and a free localhost port; readiness is the listener accepting TCP
connections and the "pacs-bridge ready" log line.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import tomli_w

from pacs_bridge.config import deep_merge

__all__ = ["ServeProcess", "free_port", "run_cli"]

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``pacs-bridge ARGS`` with this interpreter; output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "pacs_bridge.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
        check=False,
    )


class ServeProcess:
    """A ``pacs-bridge serve`` subprocess with its own data folder and port."""

    def __init__(
        self,
        workdir: Path,
        config: dict[str, Any] | None = None,
        *,
        port: int | None = None,
        command: tuple[str, ...] = ("serve",),
        env: dict[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.command = command
        self.env = env
        self.port = port or free_port()
        self.data_dir = workdir / "data"
        base: dict[str, Any] = {
            "dicom": {"ae_title": "PACS_BRIDGE", "host": "127.0.0.1", "port": self.port},
            "storage": {"data_dir": str(self.data_dir), "min_free_mb": 1},
            "watch": {"inbox": str(workdir / "inbox"), "stable_seconds": 0.5, "poll_seconds": 0.25},
            "study": {"settle_seconds": 1.0},
            "analysis": {"enabled": False},
            "web": {"enabled": False},
        }
        self.config = deep_merge(base, config or {})
        self.config_path = workdir / "pacs-bridge.toml"
        self.log_path = workdir / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_handle: Any = None

    @property
    def inbox(self) -> Path:
        """The watched folder."""
        return Path(self.config["watch"]["inbox"])

    def start(self, timeout: float = 60.0) -> ServeProcess:
        """Start and wait until the listener accepts connections."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(tomli_w.dumps(self.config), encoding="utf-8")
        self._log_handle = open(self.log_path, "ab")
        offset = self.log_path.stat().st_size
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pacs_bridge.cli", *self.command, "--config", str(self.config_path)],
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            env={**os.environ, **self.env} if self.env else None,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited with {self.proc.returncode}:\n{self.log()}")
            if "pacs-bridge ready" in self.log()[offset:]:
                return self
            time.sleep(0.1)
        raise TimeoutError(f"serve not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        """Everything the server printed so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; the exit status."""
        code = 0
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                code = self.proc.wait()
        elif self.proc is not None:
            code = self.proc.returncode
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        return code

    def wait_exit(self, timeout: float = 60.0) -> int:
        """Wait for the process to end by itself; its exit status (negative: killed by that signal)."""
        assert self.proc is not None
        code = self.proc.wait(timeout=timeout)
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        return code

    def kill9(self) -> None:
        """SIGKILL, as a power cut would."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run another ``pacs-bridge`` command against this server's configuration."""
        return run_cli(args[0], "--config", str(self.config_path), *args[1:], timeout=timeout)

    def results(self) -> list[dict[str, Any]]:
        """``pacs-bridge results --json`` parsed."""
        proc = self.cli("results", "--json")
        assert proc.returncode == 0, proc.stderr
        return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]

    def wait_for_state(self, study_uid: str, states: set[str], timeout: float = 60.0) -> dict[str, Any]:
        """Poll ``results --json`` until the study reaches one of ``states``."""
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            for row in self.results():
                if row["study_instance_uid"] == study_uid:
                    last = row
                    if row["state"] in states:
                        return row
            time.sleep(0.5)
        raise TimeoutError(f"study {study_uid} not in {states} after {timeout} s: {last}\n{self.log()[-3000:]}")

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
