"""The ``pacs-bridge`` command.

::

    pacs-bridge serve     [--config FILE] [--port N] [--data-dir DIR] ...
    pacs-bridge results   [--config FILE] [--json] [--limit N]
    pacs-bridge config    [--config FILE] --show
    pacs-bridge infer     [--model DIR] [--json] PATH...
    pacs-bridge reanalyse [--config FILE] STUDY_UID
    pacs-bridge resend    [--config FILE] STUDY_UID
    pacs-bridge web-hash-password [--new-token]
    pacs-bridge train | evaluate | export ...   (needs the train extra)

Only this module configures logging handlers. TensorFlow is imported only by
``train``, ``evaluate`` and ``export``, through the trainer (``trainer/`` in
the repository, installed as the package ``pacs_bridge_trainer``).

Exit status: 0 done, 1 the command found nothing to do (no such study),
2 the settings, the installation or the data folder cannot work; the reason
is one line on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from pacs_bridge.config import Settings, load_settings
from pacs_bridge.errors import ConfigError
from pacs_bridge.logsafe import install as install_log_hygiene
from pacs_bridge.store.spool import private_umask

if TYPE_CHECKING:
    from pacs_bridge.store.db import Database

__all__ = ["main"]

LOGGER = logging.getLogger(__name__)


def setup_logging(level: str) -> None:
    """One handler on stderr; pynetdicom's own chatter only at DEBUG."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    if level.upper() != "DEBUG":
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    install_log_hygiene(level)


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    for flag, section, key in (
        ("port", "dicom", "port"),
        ("host", "dicom", "host"),
        ("ae_title", "dicom", "ae_title"),
        ("data_dir", "storage", "data_dir"),
        ("database_url", "storage", "database_url"),
        ("inbox", "watch", "inbox"),
        ("settle_seconds", "study", "settle_seconds"),
        ("model", "analysis", "model_dir"),
        ("log_level", "log", "level"),
        ("roles", "queue", "roles"),
        ("node_name", "queue", "node_name"),
    ):
        value = getattr(args, flag, None)
        if value is not None:
            overrides.setdefault(section, {})[key] = value
    return load_settings(args.config, overrides=overrides)


_ONNX_RUNTIME_HINT = (
    "install the cpu extra (pip install 'pacs-bridge[cpu]'), or the gpu extra on a machine with an NVIDIA GPU "
    "(pip install 'pacs-bridge[gpu]'), never both"
)

# Top-level modules of the optional extras, and the extra that installs each.
_EXTRA_OF_MODULE = {
    "onnxruntime": "cpu",
    "tensorflow": "train",
    "keras": "train",
    "tf2onnx": "train",
    "matplotlib": "train",
    "sklearn": "train",
    "psycopg": "postgres",
}


def _missing_extra_message(exc: ImportError) -> str | None:
    """What to install for an ImportError of an extra's module; None for any other ImportError."""
    missing = (exc.name or "").split(".")[0]
    extra = _EXTRA_OF_MODULE.get(missing)
    if extra is None:
        return None
    if extra == "cpu":
        return f"ONNX Runtime is not installed: {_ONNX_RUNTIME_HINT}"
    return f"{missing} is not installed: this command needs the {extra} extra (pip install 'pacs-bridge[{extra}]')"


def _check_analysis(settings: Settings) -> None:
    """With analysis on in this node's roles, ONNX Runtime must import and the model folder must hold a valid model."""
    if not settings.analysis.enabled or "analyse" not in settings.queue.roles:
        return
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"ONNX Runtime is not installed, so studies cannot be analysed: {_ONNX_RUNTIME_HINT}; "
            "or set [analysis] enabled = false to store studies without analysing them"
        ) from exc
    from pacs_bridge.inference.manifest import ManifestError, ModelManifest
    from pacs_bridge.inference.model import default_model_dir

    folder = settings.analysis.model_dir or default_model_dir()
    try:
        ModelManifest.load(folder)
    except ManifestError as exc:
        raise ConfigError(
            f"no usable model: {exc}; set [analysis] model_dir (or --model) to a model folder "
            "(model.onnx + model.json), or [analysis] enabled = false"
        ) from exc


def _cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    setup_logging(settings.log.level)
    private_umask()
    from pacs_bridge.store.folders import check_data_dir

    check_data_dir(settings)
    _check_analysis(settings)
    from pacs_bridge.service import Service

    return Service(settings).run()


def _roles(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _cmd_worker(args: argparse.Namespace) -> int:
    if getattr(args, "roles", None) is None:
        args.roles = ["settle", "analyse", "publish", "send"]
    return _cmd_serve(args)


def _sqlite_tables(path: Path, hint: str) -> set[str]:
    """The tables of the SQLite file ``path``, read through a read-only connection; ConfigError if it is missing."""
    import sqlite3
    from urllib.parse import quote

    if not path.is_file():
        raise ConfigError(f"no database at {path}: {hint}")
    try:
        connection = sqlite3.connect(f"file:{quote(str(path.resolve()))}?mode=ro", uri=True)
        try:
            rows = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        finally:
            connection.close()
    except sqlite3.Error as exc:
        raise ConfigError(f"cannot read the database at {path}: {exc}") from exc
    return {str(row[0]) for row in rows}


def _existing_database(settings: Settings) -> Database:
    """The database that ``serve`` created, opened as it is: never created here, never migrated.

    A SQLite file that does not exist is not created (a wrong ``--data-dir``
    or ``--config`` would otherwise leave an empty database behind), and a
    database without pacs-bridge's tables is refused; both raise ConfigError.
    """
    from sqlalchemy import inspect
    from sqlalchemy.exc import SQLAlchemyError

    from pacs_bridge.store.db import open_database
    from pacs_bridge.store.folders import sqlite_database_path

    url = settings.storage.resolved_database_url()
    shown = settings.storage.display_database_url()
    hint = "check --config, --data-dir or [storage] data_dir; pacs-bridge serve creates the database"
    path = sqlite_database_path(url)
    if path is not None:
        # Looked at read-only first: opening a stray file would convert it to WAL.
        tables = _sqlite_tables(path, hint)
    db = open_database(url, upgrade=False)
    if path is None:
        try:
            tables = set(inspect(db.engine).get_table_names())
        except SQLAlchemyError as exc:
            db.dispose()
            reason = getattr(exc, "orig", None) or exc
            raise ConfigError(f"cannot open the database at {shown}: {reason}") from exc
    if not {"alembic_version", "studies"} <= tables:
        db.dispose()
        raise ConfigError(f"no pacs-bridge database at {shown} (its tables are missing): {hint}")
    return db


def _study_rows(settings: Settings, limit: int) -> list[dict[str, Any]]:
    from sqlalchemy import select

    from pacs_bridge.pipeline.actions import study_deliveries, study_jobs
    from pacs_bridge.store.models import Instance, InstanceResult, JobState, Study

    db = _existing_database(settings)
    rows: list[dict[str, Any]] = []
    try:
        with db.sessions() as session:
            studies = session.scalars(
                select(Study).order_by(Study.last_received_at.desc(), Study.id.desc()).limit(limit)
            ).all()
            for study in studies:
                results = session.execute(
                    select(Instance.sop_instance_uid, InstanceResult)
                    .join(InstanceResult, InstanceResult.instance_id == Instance.id)
                    .where(Instance.study_id == study.id)
                    .order_by(Instance.instance_number, Instance.id)
                ).all()
                deliveries = study_deliveries(session, study.id)
                jobs = study_jobs(session, study.id)
                rows.append(
                    {
                        "study_instance_uid": study.study_instance_uid,
                        "state": study.state.value,
                        "reason": study.state_reason,
                        "instances": study.instance_count,
                        "bytes": study.total_bytes,
                        "modalities": study.modalities,
                        "calling_aet": study.calling_aet,
                        "accession_number": study.accession_number,
                        "study_date": study.study_date,
                        "received_at": study.last_received_at.isoformat() if study.last_received_at else None,
                        "analysed_at": study.analysed_at.isoformat() if study.analysed_at else None,
                        "model": {"name": study.model_name, "version": study.model_version}
                        if study.model_name
                        else None,
                        "max_probability": study.max_probability,
                        "fracture": study.fracture,
                        "positive_instances": study.positive_instances,
                        "findings": [
                            {
                                "sop_instance_uid": sop_uid,
                                "probability": r.probability,
                                "fracture": r.fracture,
                                "threshold": r.threshold,
                                "body_part": r.body_part,
                                "box": r.box,
                                "boxes": r.boxes,
                                "error": r.error,
                                "model": {"name": r.model_name, "version": r.model_version},
                            }
                            for sop_uid, r in results
                        ],
                        "deliveries": {
                            state: sum(1 for d in deliveries if d["state"] == state)
                            for state in ("pending", "sent", "dead")
                        }
                        if deliveries
                        else {},
                        "delivery_details": deliveries,
                        "jobs": [
                            {
                                "id": job.id,
                                "kind": job.kind.value,
                                "state": job.state.value,
                                "attempts": job.attempts,
                                "lease_owner": job.lease_owner,
                                "destination": job.destination,
                                "last_error": job.last_error,
                            }
                            for job in jobs
                            if job.state != JobState.DONE or job.last_error
                        ],
                    }
                )
    finally:
        db.dispose()
    return rows


def _health_problems(settings: Settings) -> list[str]:
    """Roles of running nodes that are dead or stalled, and dead-letter counts, for ``results``."""
    from pacs_bridge.health import read_node_roles
    from pacs_bridge.pipeline.actions import queue_stats

    db = _existing_database(settings)
    problems: list[str] = []
    try:
        for role in read_node_roles(db):
            if not role["healthy"]:
                detail = f": {role['error']}" if role["error"] else f" (last heartbeat {role['heartbeat_at']})"
                problems.append(f"UNHEALTHY: {role['role']} stage on {role['node']} is {role['status']}{detail}")
        with db.sessions() as session:
            for kind, stats in queue_stats(session).items():
                if stats["dead"]:
                    problems.append(f"{stats['dead']} {kind} job(s) failed for good (dead letters)")
    finally:
        db.dispose()
    return problems


def _cmd_results(args: argparse.Namespace) -> int:
    settings = _settings(args)
    setup_logging("WARNING")
    rows = _study_rows(settings, args.limit)
    for problem in _health_problems(settings):
        print(problem, file=sys.stderr)
    if args.json:
        for row in rows:
            print(json.dumps(row, sort_keys=True))
        return 0
    header = f"{'study instance UID':<64}  {'state':<9}  {'inst':>4}  {'max p':>6}  {'finding':<10}  received"
    print(header)
    print("-" * len(header))
    for row in rows:
        prob = "" if row["max_probability"] is None else f"{row['max_probability']:.3f}"
        finding = "" if row["fracture"] is None else ("FRACTURE" if row["fracture"] else "none")
        print(
            f"{row['study_instance_uid']:<64}  {row['state']:<9}  {row['instances']:>4}  {prob:>6}  "
            f"{finding:<10}  {row['received_at'] or ''}"
        )
        if row["reason"]:
            print(f"{'':<66}{row['reason']}")
        dead = row["deliveries"].get("dead", 0)
        if dead:
            print(f"{'':<66}{dead} result objects undeliverable (dead letters): pacs-bridge resend")
        for job in row["jobs"]:
            if job["state"] in ("pending", "running", "dead") and job["last_error"]:
                where = f" to {job['destination']}" if job["destination"] else ""
                print(
                    f"{'':<66}{job['kind']}{where}: {job['state']} after {job['attempts']} attempt(s): "
                    f"{job['last_error']}"
                )
    return 0


def _cmd_migrate(args: argparse.Namespace) -> int:
    settings = _settings(args)
    setup_logging(settings.log.level)
    from pacs_bridge.store.db import open_database
    from pacs_bridge.store.folders import check_data_dir

    if not settings.storage.database_url:
        check_data_dir(settings)
    db = open_database(settings.storage.resolved_database_url(), upgrade=True)
    db.dispose()
    print(f"database {settings.storage.display_database_url()} is at the newest schema")
    return 0


def _cmd_purge(args: argparse.Namespace) -> int:
    settings = _settings(args)
    setup_logging(settings.log.level)
    from pacs_bridge.pipeline.retention import purge

    db = _existing_database(settings)
    try:
        counts = purge(db, settings, older_than_days=args.older_than, dry_run=args.dry_run)
    finally:
        db.dispose()
    verb = "would remove" if args.dry_run else "removed"
    print(
        f"{verb} {counts['studies']} studies, {counts['files']} files ({counts['bytes']} bytes) "
        f"and {counts['jobs']} finished jobs older than {args.older_than:g} days"
    )
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    if args.reference:
        from pacs_bridge.config import settings_reference

        print(settings_reference())
        return 0
    settings = _settings(args)
    if args.show:
        import tomli_w

        data = settings.to_toml_dict()
        print(tomli_w.dumps(_drop_none(data)))
    else:
        print("configuration is valid")
    return 0


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def _cmd_reanalyse(args: argparse.Namespace) -> int:
    settings = _settings(args)
    setup_logging(settings.log.level)
    from pacs_bridge.pipeline.actions import reanalyse

    db = _existing_database(settings)
    try:
        found = reanalyse(db, args.study_uid)
    finally:
        db.dispose()
    if not found:
        print(f"no study {args.study_uid}", file=sys.stderr)
        return 1
    print(f"study {args.study_uid} queued for re-analysis")
    return 0


def _cmd_resend(args: argparse.Namespace) -> int:
    settings = _settings(args)
    setup_logging(settings.log.level)
    from pacs_bridge.pipeline.actions import resend

    db = _existing_database(settings)
    try:
        count = resend(db, settings, args.study_uid)
    except LookupError:
        print(f"no study {args.study_uid}", file=sys.stderr)
        return 1
    finally:
        db.dispose()
    if not count:
        print(f"no result objects for study {args.study_uid}", file=sys.stderr)
        return 1
    print(f"{count} deliveries of study {args.study_uid} queued again")
    return 0


def _cmd_web_hash_password(args: argparse.Namespace) -> int:
    """Print an argon2 hash for [[web.users]] (password from stdin or a prompt), or a new API token."""
    from pacs_bridge.web.auth import hash_password, hash_token, new_token

    if args.new_token:
        token = new_token()
        print(f"token (give it to the script; it is not stored): {token}")
        print(f'api_tokens entry for [web]: "{hash_token(token)}"')
        return 0
    if sys.stdin.isatty():
        import getpass

        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print("pacs-bridge: the two passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < 8:
        print("pacs-bridge: a console password needs at least 8 characters", file=sys.stderr)
        return 1
    print(hash_password(password))
    return 0


_TRAINER_PACKAGE = "pacs_bridge_trainer"


def _import_command_module(module: str) -> ModuleType:
    """``module``; a ``trainer.*`` name is found in the installed ``pacs_bridge_trainer`` package.

    The repository keeps the trainer in ``trainer/`` and its modules import
    one another as ``trainer.*``; installed, it is ``pacs_bridge_trainer``
    (no top-level ``trainer`` in site-packages), so that name is bound to the
    installed package before its modules load. From a checkout without an
    install, ``trainer`` is imported as it is.
    """
    if module.split(".", maxsplit=1)[0] == "trainer" and "trainer" not in sys.modules:
        try:
            sys.modules["trainer"] = importlib.import_module(_TRAINER_PACKAGE)
        except ModuleNotFoundError as exc:
            if exc.name != _TRAINER_PACKAGE:
                raise
    return importlib.import_module(module)


def _delegate(module: str, function: str, argv: list[str]) -> int:
    try:
        target = getattr(_import_command_module(module), function)
        return int(target(argv))
    except ImportError as exc:
        message = _missing_extra_message(exc)
        if message is None:
            if module.split(".", maxsplit=1)[0] != "trainer":
                raise
            message = f"this command needs the train extra (pip install 'pacs-bridge[train]'): {exc}"
        print(f"pacs-bridge: {message}", file=sys.stderr)
        return 2


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML configuration file (default: $PACS_BRIDGE_CONFIG)")
    parser.add_argument("--data-dir", type=Path, help="override [storage] data_dir")
    parser.add_argument("--database-url", help="override [storage] database_url")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``pacs-bridge``."""
    parser = argparse.ArgumentParser(prog="pacs-bridge", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="receive studies, analyse them, send results back")
    _add_common(serve)
    serve.add_argument("--port", type=int, help="override [dicom] port")
    serve.add_argument("--host", help="override [dicom] host")
    serve.add_argument("--ae-title", help="override [dicom] ae_title")
    serve.add_argument("--inbox", type=Path, help="override [watch] inbox")
    serve.add_argument("--settle-seconds", type=float, help="override [study] settle_seconds")
    serve.add_argument("--model", type=Path, help="override [analysis] model_dir")
    serve.add_argument("--log-level", help="override [log] level")
    serve.add_argument(
        "--roles",
        type=_roles,
        help="comma-separated roles of this node: receive,settle,analyse,publish,send,web (default: all)",
    )
    serve.add_argument("--node-name", help="override [queue] node_name")
    serve.set_defaults(func=_cmd_serve)

    worker = sub.add_parser(
        "worker", help="run the pipeline stages only (settle, analyse, publish, send) against a shared database"
    )
    _add_common(worker)
    worker.add_argument("--model", type=Path, help="override [analysis] model_dir")
    worker.add_argument("--log-level", help="override [log] level")
    worker.add_argument("--roles", type=_roles, help="default: settle,analyse,publish,send")
    worker.add_argument("--node-name", help="override [queue] node_name")
    worker.set_defaults(func=_cmd_worker)

    migrate = sub.add_parser("migrate", help="create or upgrade the database schema (once, before split nodes start)")
    _add_common(migrate)
    migrate.set_defaults(func=_cmd_migrate)

    purge = sub.add_parser("purge", help="delete studies, their files and finished jobs older than a retention period")
    _add_common(purge)
    purge.add_argument("--older-than", type=float, required=True, metavar="DAYS", help="retention in days")
    purge.add_argument("--dry-run", action="store_true", help="only count what would be removed")
    purge.set_defaults(func=_cmd_purge)

    results = sub.add_parser("results", help="list studies, newest first, with state and findings")
    _add_common(results)
    results.add_argument("--json", action="store_true", help="one JSON object per study per line")
    results.add_argument("--limit", type=int, default=100, help="at most this many studies (default 100)")
    results.set_defaults(func=_cmd_results)

    config = sub.add_parser("config", help="check the configuration; --show prints the effective settings")
    _add_common(config)
    config.add_argument("--show", action="store_true", help="print the effective settings as TOML")
    config.add_argument("--reference", action="store_true", help="print the Markdown reference of every key")
    config.set_defaults(func=_cmd_config)

    reanalyse = sub.add_parser("reanalyse", help="analyse a study again")
    _add_common(reanalyse)
    reanalyse.add_argument("study_uid")
    reanalyse.set_defaults(func=_cmd_reanalyse)

    resend = sub.add_parser("resend", help="send a study's result objects again to every destination")
    _add_common(resend)
    resend.add_argument("study_uid")
    resend.set_defaults(func=_cmd_resend)

    web_hash = sub.add_parser(
        "web-hash-password", help="print the password hash of a [[web.users]] entry (or --new-token for scripts)"
    )
    web_hash.add_argument("--new-token", action="store_true", help="make an API token and print it with its hash")
    web_hash.set_defaults(func=_cmd_web_hash_password)

    for name, module, function, text in (
        ("infer", "pacs_bridge.inference.infer_cli", "infer_main", "analyse DICOM, PNG or JPEG files"),
        ("train", "trainer.cli", "train_main", "train a model (train extra)"),
        ("evaluate", "trainer.cli", "evaluate_main", "evaluate an exported model (train extra)"),
        ("export", "trainer.cli", "export_main", "export a Keras model to ONNX (train extra)"),
    ):
        passthrough = sub.add_parser(name, help=text, add_help=False)
        passthrough.set_defaults(func=None, delegate=(module, function))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pacs-bridge`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] in ("infer", "train", "evaluate", "export"):
        args, rest = parser.parse_known_args(argv[:1])
        module, function = args.delegate
        return _delegate(module, function, argv[1:] + rest)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"pacs-bridge: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
