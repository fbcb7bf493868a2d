"""A throw-away PostgreSQL server for tests: initdb and pg_ctl in a temporary folder, on a free port.

Debian's ``postgresql`` package provides the binaries under
``/usr/lib/postgresql/<version>/bin``. PostgreSQL refuses to run as root, so
when the tests run as root the server runs as the ``postgres`` (or
``nobody``) user, in a folder handed over to it.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import time
from pathlib import Path
from types import TracebackType

from tests.support.serve import free_port

__all__ = ["PostgresServer", "postgres_available"]


def _bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def postgres_available() -> bool:
    """True if the PostgreSQL server binaries and the psycopg driver are installed."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return False
    return _bin_dir() is not None


def _server_user() -> str | None:
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    raise RuntimeError("running as root and no postgres or nobody user to run PostgreSQL as")


class PostgresServer:
    """``with PostgresServer(folder) as pg: pg.url`` gives an empty database."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.user = _server_user()
        bin_dir = _bin_dir()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL server binaries not found (Debian package postgresql)")
        self.bin = bin_dir
        self.data = folder / "pgdata"
        self.sockets = folder / "sock"

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the test database."""
        return f"postgresql+psycopg://bridge@127.0.0.1:{self.port}/bridge"

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin / args[0]), *args[1:]]
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        return subprocess.run(command, capture_output=True, text=True, check=True, timeout=120, cwd="/")

    def start(self) -> PostgresServer:
        """initdb, start, create the database."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.sockets.mkdir(exist_ok=True)
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            for path in (self.folder, self.sockets):
                os.chown(path, entry.pw_uid, entry.pw_gid)
            # The server user must reach the folder through the temporary tree.
            parent = self.folder
            while parent != parent.parent and parent != Path("/tmp"):
                parent.chmod(parent.stat().st_mode | 0o011)
                parent = parent.parent
        self._run("initdb", "-D", str(self.data), "-U", "bridge", "-A", "trust", "--no-sync", "-E", "UTF8")
        options = (
            f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.folder / "pg.log"), "-w", "start")
        deadline = time.monotonic() + 30
        while True:
            try:
                self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "bridge", "bridge")
                break
            except subprocess.CalledProcessError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        return self

    def stop(self) -> None:
        """Stop the server and remove its files."""
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            pass
        shutil.rmtree(self.data, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
