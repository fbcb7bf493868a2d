"""The one settings object: TOML file, then environment variables, then flags.

Every key is documented in ``docs/configuration.md`` and shown by
``pacs-bridge config --show``. Environment variables are named
``PACS_BRIDGE_<SECTION>_<KEY>`` (for example ``PACS_BRIDGE_DICOM_PORT=11113``);
list values are given as JSON (``'["MODALITY1", "PACS@10.0.0.5"]'``) or comma
separated.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from pacs_bridge.errors import ConfigError

__all__ = [
    "DICOM_KINDS",
    "RESULT_KINDS",
    "ROLES",
    "AnalysisSettings",
    "DestinationSettings",
    "DestinationType",
    "DicomSettings",
    "LogSettings",
    "QueueSettings",
    "ReportSettings",
    "SendSettings",
    "Settings",
    "StorageSettings",
    "StudySettings",
    "WatchSettings",
    "WebSettings",
    "WebUser",
    "deep_merge",
    "default_object_kinds",
    "load_settings",
    "routes",
]

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


def _check_ae(value: str) -> str:
    """AE titles are 1-16 characters of the default repertoire, no backslash (PS3.5 §6.2, AE VR)."""
    stripped = value.strip()
    if not stripped or not _AE_RE.match(stripped):
        raise ValueError(f"{value!r} is not a valid AE title (1-16 printable characters, no backslash)")
    return stripped


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DicomSettings(_Section):
    """``[dicom]``: the DICOM listener (C-STORE SCP, C-ECHO SCP)."""

    ae_title: str = Field("PACS_BRIDGE", description="Our AE title; called AE titles must match it.")
    host: str = Field("0.0.0.0", description="Address to listen on.")
    port: int = Field(11112, ge=1, le=65535, description="TCP port to listen on.")
    allowed_calling_aets: list[str] = Field(
        default_factory=list,
        description="Calling AE titles allowed to connect, each 'AET' or 'AET@host'. Empty: any (logged as a warning).",
    )
    require_called_aet: bool = Field(True, description="Refuse associations whose called AE title is not ae_title.")
    max_associations: int = Field(16, ge=1, le=1000, description="Concurrent associations accepted.")
    max_associations_per_host: int = Field(
        8,
        ge=1,
        le=1000,
        description="Connections one peer address may hold at once; more are closed at once (floods, slow clients).",
    )
    reuse_port: bool = Field(
        False,
        description=(
            "Open the listener with SO_REUSEPORT, so that several `serve --roles receive` processes on this "
            "machine share one port and the kernel spreads new associations over them (Linux): every core "
            "receives. Each process keeps its own max_associations and per-host limit."
        ),
    )
    max_pdu_size: int = Field(
        4 * 1024 * 1024,
        ge=4096,
        le=64 * 1024 * 1024,
        description="Maximum PDU length we announce and accept, bytes (PS3.8 D.1); a longer PDU is aborted.",
    )
    max_instance_mb: float = Field(
        1024, gt=0, description="Largest instance accepted, MiB; refused (0xA700) as soon as it grows past this."
    )
    network_timeout: float = Field(
        60, gt=0, description="Seconds of silence before an association is aborted; also the longest one PDU may take."
    )
    acse_timeout: float = Field(
        30,
        gt=0,
        description="Seconds to wait for association messages; a new connection must finish its TLS handshake "
        "and association request within it.",
    )
    dimse_timeout: float = Field(60, gt=0, description="Seconds to wait for DIMSE messages.")
    tls_cert: Path | None = Field(None, description="PEM server certificate; enables DICOM TLS (PS3.15 B.1).")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert.")
    tls_ca: Path | None = Field(None, description="PEM CA bundle used to verify client certificates.")
    tls_require_client_cert: bool = Field(False, description="Refuse TLS clients without a certificate from tls_ca.")

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return _check_ae(value)

    @field_validator("allowed_calling_aets")
    @classmethod
    def _allowed(cls, values: list[str]) -> list[str]:
        out = []
        for item in values:
            aet, _, host = item.partition("@")
            _check_ae(aet)
            out.append(f"{aet.strip()}@{host.strip()}" if host else aet.strip())
        return out


class StorageSettings(_Section):
    """``[storage]``: where received instances and the database live."""

    data_dir: Path = Field(Path("pacs-bridge-data"), description="Data folder: spool, outputs, heatmaps, SQLite file.")
    database_url: str = Field(
        "", description="SQLAlchemy URL; empty = SQLite file <data_dir>/pacs-bridge.db. PostgreSQL to scale out."
    )
    min_free_mb: float = Field(
        500, ge=0, description="Free disk below which stores are refused with 0xA700 (out of resources)."
    )
    fsync: bool = Field(True, description="fsync each file and its folder before acknowledging (keep on).")

    def resolved_database_url(self) -> str:
        """The database URL, with the SQLite default filled in."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'pacs-bridge.db').resolve()}"

    def display_database_url(self) -> str:
        """:meth:`resolved_database_url` with any password masked, for messages and ``config --show``."""
        return _mask_url_password(self.resolved_database_url())


class WatchSettings(_Section):
    """``[watch]``: the folder watcher, a second way in."""

    enabled: bool = Field(True, description="Watch the inbox folder.")
    inbox: Path | None = Field(None, description="Folder to watch; empty = <data_dir>/inbox.")
    stable_seconds: float = Field(2.0, ge=0, description="A file is read once its size is unchanged this long.")
    poll_seconds: float = Field(1.0, gt=0, description="Also rescan the inbox this often (missed events, NFS).")


class StudySettings(_Section):
    """``[study]``: when a study is complete, and which studies are analysed."""

    settle_seconds: float = Field(
        10.0, ge=0, description="Quiet period after the last instance before a study settles."
    )
    modalities: list[str] = Field(
        default_factory=lambda: ["CR", "DX", "DR"], description="Modalities routed to analysis; others are skipped."
    )
    sop_classes: list[str] = Field(
        default_factory=lambda: [
            "1.2.840.10008.5.1.4.1.1.1",
            "1.2.840.10008.5.1.4.1.1.1.1",
            "1.2.840.10008.5.1.4.1.1.1.1.1",
            "1.2.840.10008.5.1.4.1.1.7",
        ],
        description="SOP classes analysed within a routed study (CR, DX, SC).",
    )


class AnalysisSettings(_Section):
    """``[analysis]``: the inference worker."""

    enabled: bool = Field(True, description="Run the analysis worker inside serve.")
    model_dir: Path | None = Field(None, description="Model folder; empty = the bundled models/fracatlas-cnn.")
    providers: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'tensorrt'.")
    intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads; 0 = runtime default.")
    batch_size: int = Field(8, ge=1, le=256, description="Images per inference batch.")
    max_attempts: int = Field(5, ge=1, description="Attempts for transient failures before a study is failed.")
    retry_seconds: float = Field(30, gt=0, description="First retry delay; doubles each attempt.")
    max_pixels: int = Field(100_000_000, gt=0, description="Largest image analysed (decompression-bomb cap).")
    box_threshold: float = Field(
        0.7, gt=0, lt=1, description="The box outlines the heatmap region above this share of its peak."
    )


class ReportSettings(_Section):
    """``[report]``: the objects sent back to the PACS."""

    structured_report: bool = Field(True, description="Produce a TID 1500 Comprehensive 3D SR per study.")
    annotated_image: bool = Field(True, description="Produce an annotated secondary capture per analysed image.")
    annotate_negatives: bool = Field(True, description="Also produce annotated images for negative findings.")
    presentation_state: bool = Field(
        True, description="Produce a presentation state (GSPS) per analysed image: the finding drawn on the original."
    )
    study_summary: bool = Field(True, description="Produce one summary image per study listing every image.")
    heatmap_opacity: float = Field(0.35, ge=0, le=1, description="Opacity of the heatmap blended over the image.")
    heatmap_min: float = Field(
        0.5, ge=0, le=1, description="Heatmap values below this share of the peak are not drawn (positives only)."
    )
    banner_disclaimer: str = Field("AI result, not a diagnosis", description="Banner text on annotated images.")
    manufacturer: str = Field("pacs-bridge", description="Manufacturer written in the objects.")
    institution_name: str | None = Field(None, description="Institution Name written in the objects, if set.")


class SendSettings(_Section):
    """``[send]``: delivery of results to destinations."""

    retry_initial_seconds: float = Field(30, gt=0, description="First retry delay; doubles each attempt.")
    retry_max_seconds: float = Field(1800, gt=0, description="Longest delay between two attempts.")
    retry_for_hours: float = Field(24, gt=0, description="Give up (dead letter) after this long.")
    timeout: float = Field(30, gt=0, description="Association and DIMSE timeout, seconds.")


DestinationType = Literal["dicom", "dicomweb", "hl7", "fhir", "webhook"]
"""How a destination receives results: C-STORE, STOW-RS, HL7 v2 over MLLP, a FHIR transaction, a JSON POST."""

DICOM_KINDS: tuple[str, ...] = ("sr", "capture", "gsps", "summary")
"""Output object kinds that are DICOM Part 10 files (PS3.10)."""

RESULT_KINDS: tuple[str, ...] = ("result",)
"""Output object kinds that are study result documents (JSON), what RIS messages are built from."""

_DICOM_TYPES = ("dicom", "dicomweb")
_URL_TYPES = ("dicomweb", "fhir", "webhook")
_URL_RE = re.compile(r"^https?://[^\s/]+", re.IGNORECASE)


def default_object_kinds(destination_type: str) -> list[str]:
    """The object kinds a destination of ``destination_type`` receives when ``objects`` is not set."""
    return list(DICOM_KINDS if destination_type in _DICOM_TYPES else RESULT_KINDS)


class DestinationSettings(_Section):
    """``[[destinations]]``: where results go: a DICOM node (usually the PACS that sent the study), a DICOMweb
    server (STOW-RS), a RIS (HL7 v2 ORU^R01 over MLLP), a FHIR R4 server, or a webhook. A destination receives
    every study, unless ``from_aets`` names calling AE titles (then only studies received from those) or
    ``return_to_sender`` is true (then only studies whose calling AE title equals the destination's own
    ``ae_title``: the results go back to the node that sent the study); studies dropped in the watched folder
    have no calling AE title and reach neither kind of restricted destination.
    """

    name: str = Field(..., min_length=1, max_length=64, description="Name used in logs, `results` and deliver jobs.")
    type: DestinationType = Field(
        "dicom",
        description="'dicom' (C-STORE), 'dicomweb' (STOW-RS), 'hl7' (ORU^R01 over MLLP), 'fhir' (R4), 'webhook'.",
    )
    ae_title: str | None = Field(
        None,
        validate_default=True,
        description="The destination's AE title (type dicom; also what return_to_sender compares).",
    )
    host: str | None = Field(None, validate_default=True, description="Host name or address (types dicom and hl7).")
    port: int | None = Field(None, ge=1, le=65535, validate_default=True, description="TCP port (types dicom and hl7).")
    url: str | None = Field(
        None,
        validate_default=True,
        description="Base URL (types dicomweb, fhir, webhook), e.g. http://pacs:8042/dicom-web.",
    )
    calling_ae_title: str | None = Field(
        None, description="Our AE title for this destination; default [dicom] ae_title."
    )
    objects: list[str] = Field(
        default_factory=list,
        description="Object kinds sent: sr, capture, gsps, summary (dicom, dicomweb) or result (hl7, fhir, webhook). "
        "Empty: all the kinds of the type.",
    )
    from_aets: list[str] = Field(
        default_factory=list, description="Only studies received from these calling AE titles; empty: all studies."
    )
    return_to_sender: bool = Field(
        False, description="Only studies whose calling AE title equals this destination's ae_title."
    )
    auth: Literal["none", "basic", "bearer"] = Field(
        "none", description="HTTP authentication (dicomweb, fhir, webhook): 'none', 'basic' or 'bearer'."
    )
    username: str = Field("", description="User name for basic authentication.")
    password: str = Field("", description="Password for basic authentication (masked by config --show).")
    token: str = Field("", description="Token for bearer authentication (masked by config --show).")
    verify_tls: bool = Field(True, description="Verify the server's certificate for https URLs (keep on).")
    tls: bool = Field(False, description="Use TLS (DICOM TLS for dicom, MLLP over TLS for hl7).")
    tls_ca: Path | None = Field(None, description="CA bundle that verifies the destination (TLS and https).")
    tls_cert: Path | None = Field(None, description="Our client certificate, if the destination asks for one.")
    tls_key: Path | None = Field(None, description="Key of tls_cert.")
    sending_application: str = Field("PACS_BRIDGE", description="HL7 MSH-3 Sending Application.")
    sending_facility: str = Field("", description="HL7 MSH-4 Sending Facility.")
    receiving_application: str = Field("", description="HL7 MSH-5 Receiving Application.")
    receiving_facility: str = Field("", description="HL7 MSH-6 Receiving Facility.")
    result_status: Literal["final", "preliminary"] = Field(
        "final", description="Status of HL7 and FHIR results: 'final' (F) or 'preliminary' (P)."
    )

    @model_validator(mode="before")
    @classmethod
    def _default_objects(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("objects"):
            data = {**data, "objects": default_object_kinds(str(data.get("type") or "dicom"))}
        return data

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            if info.data.get("type", "dicom") == "dicom":
                raise ValueError("required for a dicom destination")
            return None
        return _check_ae(value)

    @field_validator("calling_ae_title")
    @classmethod
    def _calling_ae(cls, value: str | None) -> str | None:
        return None if value is None else _check_ae(value)

    @field_validator("host", "port")
    @classmethod
    def _host_port(cls, value: Any, info: ValidationInfo) -> Any:
        kind = info.data.get("type", "dicom")
        if value is None and kind in ("dicom", "hl7"):
            raise ValueError(f"required for a {kind} destination")
        if isinstance(value, str) and not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None, info: ValidationInfo) -> str | None:
        kind = info.data.get("type", "dicom")
        if value is None:
            if kind in _URL_TYPES:
                raise ValueError(f"required for a {kind} destination (http:// or https://)")
            return None
        value = value.strip()
        if not _URL_RE.match(value):
            raise ValueError(f"{value!r} is not an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("from_aets")
    @classmethod
    def _from_aets(cls, values: list[str]) -> list[str]:
        return [_check_ae(value) for value in values]

    @model_validator(mode="after")
    def _consistent(self) -> DestinationSettings:
        allowed = DICOM_KINDS if self.type in _DICOM_TYPES else RESULT_KINDS
        wrong = [kind for kind in self.objects if kind not in allowed]
        if wrong:
            raise ValueError(f"objects: a {self.type} destination takes {', '.join(allowed)}, not {', '.join(wrong)}")
        if self.return_to_sender and self.ae_title is None:
            raise ValueError("return_to_sender needs ae_title: the calling AE title of the studies to send back")
        if self.auth == "basic" and not self.username:
            raise ValueError("auth = 'basic' needs username (and password)")
        if self.auth == "bearer" and not self.token:
            raise ValueError("auth = 'bearer' needs token")
        if self.tls_key is not None and self.tls_cert is None:
            raise ValueError("tls_key without tls_cert")
        return self

    @property
    def address(self) -> str:
        """Where the destination is, for logs: ``AET@host:port``, ``host:port`` or the URL without credentials."""
        if self.type == "dicom":
            return f"{self.ae_title}@{self.host}:{self.port}"
        if self.type == "hl7":
            return f"{self.host}:{self.port}"
        return _without_userinfo(self.url or "")


def _without_userinfo(url: str) -> str:
    """``url`` with any ``user:password@`` replaced by ``***@``."""
    return re.sub(r"^(https?://)[^/@\s]*@", r"\1***@", url, flags=re.IGNORECASE)


def routes(destination: DestinationSettings, calling_aet: str | None) -> bool:
    """True when a study received from ``calling_aet`` goes to ``destination``.

    ``from_aets`` (when not empty) must contain the calling AE title, and a
    ``return_to_sender`` destination takes only studies whose calling AE
    title equals its own ``ae_title``. AE titles compare without their
    insignificant leading and trailing spaces (PS3.5 §6.2, AE VR), case
    sensitively. ``calling_aet`` is ``None`` for studies that came in through
    the watched folder: those reach only unrestricted destinations.
    """
    caller = calling_aet.strip() if calling_aet else None
    if destination.from_aets and caller not in destination.from_aets:
        return False
    if destination.return_to_sender:
        return caller is not None and caller == destination.ae_title
    return True


ROLES = ("receive", "settle", "analyse", "publish", "send", "web")
"""The roles of a node; ``serve`` runs all of them unless ``[queue] roles`` names some."""


class QueueSettings(_Section):
    """``[queue]``: the job queue shared by every stage, and this node's part in it."""

    node_name: str = Field(
        "", max_length=100, description="This node's name in job leases and heartbeats; empty = the host name."
    )
    roles: list[str] = Field(
        default_factory=lambda: list(ROLES),
        description="Roles this process runs: receive, settle, analyse, publish, send, web (default: all).",
    )
    lease_seconds: float = Field(
        60, ge=1, le=3600, description="A claimed job is another node's to take if not renewed within this time."
    )
    poll_seconds: float = Field(0.5, gt=0, le=60, description="How often an idle stage looks for due jobs.")

    @field_validator("roles")
    @classmethod
    def _roles(cls, values: list[str]) -> list[str]:
        out: list[str] = []
        for value in values:
            role = value.strip().lower()
            if role not in ROLES:
                raise ValueError(f"unknown role {value!r}; roles are {', '.join(ROLES)}")
            if role not in out:
                out.append(role)
        if not out:
            raise ValueError("at least one role is needed")
        return out


class WebUser(_Section):
    """One console user: a name and the argon2 hash of the password (``pacs-bridge web-hash-password``)."""

    name: str = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._@-]+$", description="Login name.")
    password_hash: str = Field(
        ..., min_length=20, description="argon2 hash of the password, as printed by `pacs-bridge web-hash-password`."
    )

    @field_validator("password_hash")
    @classmethod
    def _argon2(cls, value: str) -> str:
        if not value.startswith("$argon2"):
            raise ValueError("must be an argon2 hash ($argon2id$...): run `pacs-bridge web-hash-password`")
        return value


class WebSettings(_Section):
    """``[web]``: the web console and HTTP API (``pacs-bridge serve``; docs/console.md)."""

    enabled: bool = Field(True, description="Serve the web console and HTTP API.")
    host: str = Field(
        "127.0.0.1",
        description="Address of the console. Any address other than loopback needs users (or api_tokens) and "
        "tls_cert/tls_key, or behind_tls_proxy = true.",
    )
    port: int = Field(8080, ge=1, le=65535, description="Port of the console.")
    users: list[WebUser] = Field(
        default_factory=list,
        description='Console users, [[web.users]] with name and password_hash; none = a one-time "admin" '
        "password is printed on stderr at each start (loopback only).",
    )
    api_tokens: list[str] = Field(
        default_factory=list,
        description="sha256 hashes (sha256:<hex>) of API tokens for scripts (Authorization: Bearer <token>); "
        "`pacs-bridge web-hash-password --new-token` makes one.",
    )
    session_minutes: float = Field(
        60, gt=0, le=7 * 24 * 60, description="A console login expires after this many minutes."
    )
    tls_cert: Path | None = Field(None, description="PEM certificate: the console is served over HTTPS.")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert.")
    behind_tls_proxy: bool = Field(
        False, description="A TLS reverse proxy is in front of the console (cookies are then marked Secure)."
    )
    max_upload_mb: float = Field(
        256, gt=0, le=4096, description="Largest upload or STOW-RS request accepted by the console, MiB."
    )

    @field_validator("api_tokens")
    @classmethod
    def _token_hashes(cls, values: list[str]) -> list[str]:
        for value in values:
            if not re.fullmatch(r"sha256:[0-9a-f]{64}", value.strip()):
                raise ValueError("an API token is given as its hash, sha256:<64 hex digits>")
        return [value.strip() for value in values]

    @model_validator(mode="after")
    def _tls_pair(self) -> WebSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        return self


class LogSettings(_Section):
    """``[log]``: logging."""

    level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR. Patient data appears at DEBUG only.")

    @field_validator("level")
    @classmethod
    def _level(cls, value: str) -> str:
        value = value.upper()
        if value not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
        return value


class Settings(_Section):
    """All settings of pacs-bridge."""

    dicom: DicomSettings = Field(default_factory=DicomSettings)  # type: ignore[arg-type]
    storage: StorageSettings = Field(default_factory=StorageSettings)  # type: ignore[arg-type]
    watch: WatchSettings = Field(default_factory=WatchSettings)  # type: ignore[arg-type]
    study: StudySettings = Field(default_factory=StudySettings)  # type: ignore[arg-type]
    analysis: AnalysisSettings = Field(default_factory=AnalysisSettings)  # type: ignore[arg-type]
    report: ReportSettings = Field(default_factory=ReportSettings)  # type: ignore[arg-type]
    send: SendSettings = Field(default_factory=SendSettings)  # type: ignore[arg-type]
    destinations: list[DestinationSettings] = Field(default_factory=list)
    queue: QueueSettings = Field(default_factory=QueueSettings)  # type: ignore[arg-type]
    web: WebSettings = Field(default_factory=WebSettings)  # type: ignore[arg-type]
    log: LogSettings = Field(default_factory=LogSettings)  # type: ignore[arg-type]

    @property
    def inbox(self) -> Path:
        """The watched folder, with its default filled in."""
        return self.watch.inbox if self.watch.inbox is not None else self.storage.data_dir / "inbox"

    def to_toml_dict(self) -> dict[str, Any]:
        """Effective settings as plain data (paths as strings, secrets masked)."""
        data: dict[str, Any] = json.loads(self.model_dump_json())
        if data["web"].get("password"):
            data["web"]["password"] = "********"
        for destination in data["destinations"]:
            for secret in ("password", "token"):
                if destination.get(secret):
                    destination[secret] = "********"
            if destination.get("url"):
                destination["url"] = _without_userinfo(destination["url"])
        data["storage"]["database_url"] = self.storage.display_database_url()
        data["watch"]["inbox"] = str(self.inbox)
        masked: dict[str, Any] = _mask_secrets(data)
        return masked


_MASK = "********"
# Keys whose values are secrets (or hashes of secrets) wherever they appear: password, password_hash, token,
# api_tokens, client_secret, api_key, ...
_SECRET_KEY_RE = re.compile(r"password|passwd|passphrase|token|secret|api_?key", re.IGNORECASE)
_URL_QUERY_PASSWORD_RE = re.compile(r"([?&](?:password|passwd|pwd)=)[^&]*", re.IGNORECASE)


def _mask_url_password(url: str) -> str:
    """``scheme://user:password@host/...`` with the password (and a ``password=`` query value) masked."""
    scheme, sep, rest = url.partition("://")
    if sep:
        userinfo, at, host = rest.rpartition("@")
        user, colon, _password = userinfo.partition(":")
        if at and colon:
            url = f"{scheme}://{user}:{_MASK}@{host}"
    return _URL_QUERY_PASSWORD_RE.sub(rf"\g<1>{_MASK}", url)


def _mask_secrets(value: Any, secret: bool = False) -> Any:
    """``value`` with every non-empty string under a secret-named key (at any depth, in lists too) masked."""
    if isinstance(value, dict):
        return {
            key: _mask_secrets(item, secret or bool(_SECRET_KEY_RE.search(str(key)))) for key, item in value.items()
        }
    if isinstance(value, list):
        return [_mask_secrets(item, secret) for item in value]
    if secret and isinstance(value, str) and value:
        return _MASK
    return value


_SECTIONS = [name for name in Settings.model_fields if name != "destinations"]


def _env_value(raw: str, annotation: Any) -> Any:
    text = raw.strip()
    if "list" in str(annotation):
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return text


def _from_env(environ: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for section in _SECTIONS:
        model = Settings.model_fields[section].annotation
        assert isinstance(model, type) and issubclass(model, BaseModel)
        for key, field in model.model_fields.items():
            name = f"PACS_BRIDGE_{section}_{key}".upper()
            if name in environ:
                out.setdefault(section, {})[key] = _env_value(environ[name], field.annotation)
    if "PACS_BRIDGE_DESTINATIONS" in environ:
        out["destinations"] = json.loads(environ["PACS_BRIDGE_DESTINATIONS"])
    return out


def deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` merged in, tables merged key by key."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _format_errors(exc: ValidationError, origin: str) -> str:
    lines = [f"invalid configuration ({origin}):"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        lines.append(f"  {where}: {err['msg']}")
    return "\n".join(lines)


def load_settings(
    path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Load settings from ``path`` (TOML), then ``environ``, then ``overrides`` (flags).

    Raises :class:`~pacs_bridge.errors.ConfigError` with one line per problem.
    """
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    origin = "defaults"
    if path is None and environ.get("PACS_BRIDGE_CONFIG"):
        path = Path(environ["PACS_BRIDGE_CONFIG"])
    if path is not None:
        origin = str(path)
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError as exc:
            raise ConfigError(f"configuration file not found: {path}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    try:
        env_data = _from_env(environ)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"environment: a PACS_BRIDGE_ list value is not valid JSON: {exc}") from exc
    if env_data:
        origin += " + environment"
    data = deep_merge(data, env_data)
    if overrides:
        origin += " + flags"
        data = deep_merge(data, overrides)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, origin)) from exc


def settings_reference() -> str:
    """Markdown reference of every key, generated from the settings models (docs/configuration.md)."""
    lines = [
        "# Configuration reference",
        "",
        "pacs-bridge reads one TOML file (`--config FILE` or `$PACS_BRIDGE_CONFIG`), then environment",
        "variables `PACS_BRIDGE_<SECTION>_<KEY>` (lists as JSON or comma separated;",
        "`PACS_BRIDGE_DESTINATIONS` as a JSON list of tables), then command-line flags.",
        "Every key has a default: `pacs-bridge serve` runs with no file at all.",
        "`pacs-bridge config --show` prints the effective settings; invalid values stop the start",
        "with one line per problem.",
        "",
        "This page is generated from `pacs_bridge/config.py` (`pacs-bridge config --reference`).",
        "",
    ]
    sections: list[tuple[str, type[BaseModel]]] = []
    for name, field in Settings.model_fields.items():
        annotation = field.annotation
        if name == "destinations":
            sections.append(("[[destinations]]", DestinationSettings))
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            sections.append((f"[{name}]", annotation))
    for title, model in sections:
        doc = (model.__doc__ or "").split(":", 1)[-1].strip()
        doc = doc[:1].upper() + doc[1:]
        lines += [f"## `{title}`", "", doc, "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for key, field in model.model_fields.items():
            if field.is_required():
                default = "required"
            else:
                value = field.get_default(call_default_factory=True)
                default = "none" if value is None else f"`{json.dumps(value, default=str)}`"
            kind = str(field.annotation).replace("typing.", "").replace("pathlib.", "").replace("<class '", "")
            kind = kind.replace("'>", "").replace("|", "or")
            lines.append(f"| `{key}` | {kind} | {default} | {field.description or ''} |")
        lines.append("")
    return "\n".join(lines)
