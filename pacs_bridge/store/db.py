"""The one place that opens the database.

SQLite by default (one file in the data folder, WAL journal; the spool file,
fsynced first, is the durable record and rebuilds a row lost to a power cut); any SQLAlchemy URL otherwise
(PostgreSQL to run several workers on several machines). The schema is
created and upgraded by the Alembic migrations in ``store/migrations``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

__all__ = ["Database", "open_database"]

LOGGER = logging.getLogger(__name__)

_MIGRATIONS = Path(__file__).with_name("migrations")
# PostgreSQL advisory lock key held while the schema is upgraded ("pacsbrdg" in ASCII).
_MIGRATION_LOCK = 0x7061637362726467


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # NORMAL in WAL mode: a commit survives a killed process (the OS holds the WAL);
    # after a power cut the newest commits may be missing, and ``Ingestor.reconcile``
    # re-indexes their spool files, which were fsynced before the commit.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


@dataclass
class Database:
    """An engine and its session factory."""

    engine: Engine
    sessions: sessionmaker[Session]

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on error."""
        with self.sessions() as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    def upgrade(self) -> None:
        """Bring the schema to the newest Alembic revision."""
        from alembic import command
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(_MIGRATIONS))
        with self.engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                # Two nodes upgrading at once wait for each other (the lock ends with the transaction).
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    def require_current(self) -> None:
        """Raise ConfigError unless the schema is at the newest revision (``pacs-bridge migrate``)."""
        from alembic.config import Config
        from alembic.runtime.migration import MigrationContext
        from alembic.script import ScriptDirectory

        from pacs_bridge.errors import ConfigError

        config = Config()
        config.set_main_option("script_location", str(_MIGRATIONS))
        head = ScriptDirectory.from_config(config).get_current_head()
        with self.engine.connect() as connection:
            current = MigrationContext.configure(connection).get_current_revision()
        if current != head:
            raise ConfigError(
                f"the database schema is at {current or 'nothing'}, this version needs {head}: "
                "run `pacs-bridge migrate` once (with every node stopped), then start the nodes"
            )

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()


def _create_private_sqlite_file(path: Path) -> None:
    """Create the SQLite file 0600 in a 0700 folder before SQLite does (it holds patient names and IDs).

    SQLite gives its -wal and -shm files the permissions of the database file,
    so they are private too. Existing files with wider permissions are tightened.
    """
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    os.close(fd)
    for item in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            if item.stat().st_mode & 0o077:
                item.chmod(0o600)
        except FileNotFoundError:
            continue
        except OSError as exc:
            LOGGER.warning("cannot make %s private: %s", item, exc.strerror or exc)


def open_database(url: str, *, upgrade: bool = True) -> Database:
    """Open ``url``; for SQLite, create the folder and set durable pragmas."""
    kwargs: dict[str, Any] = {"future": True}
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            _create_private_sqlite_file(Path(path.split("?", 1)[0]))
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    else:
        kwargs["pool_pre_ping"] = True
    engine = create_engine(url, **kwargs)
    if url.startswith("sqlite"):
        event.listen(engine, "connect", _sqlite_pragmas)
    database = Database(engine=engine, sessions=sessionmaker(engine, expire_on_commit=False))
    if upgrade:
        database.upgrade()
    return database
