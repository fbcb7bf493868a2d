"""A real Orthanc PACS for tests: the Debian ``orthanc`` package, started on free localhost ports.

Orthanc plays the hospital PACS: it receives C-STORE requests (PS3.4 Annex B)
from pacs-bridge, can push studies to pacs-bridge through its REST API
(``POST /modalities/{name}/store``), and shows what it holds through
``/studies`` and ``/tools/find``.

Use it as a context manager::

    with OrthancServer(tmp_path, {"bridge": ("PACS_BRIDGE", "127.0.0.1", 11112)}) as pacs:
        pacs.upload(path)
        pacs.rest("POST", "/modalities/bridge/store", json=[study_id])
        pacs.instances_of_study(study_uid)

``stop()`` then ``start()`` restarts it on the same ports and the same storage
(an outage that loses nothing).

``dicomweb=True`` loads the DICOMweb plugin (Debian package ``orthanc-dicomweb``)
at ``{url}/dicom-web`` (PS3.18: STOW-RS, QIDO-RS, WADO-RS); ``users`` turns on
HTTP basic authentication for the REST API and DICOMweb alike (this class's own
REST calls then log in as the first user).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

__all__ = [
    "DICOMWEB_PLUGIN",
    "ORTHANC_BINARY",
    "OrthancServer",
    "dicomweb_available",
    "free_port",
    "orthanc_available",
]

ORTHANC_BINARY = os.environ.get("ORTHANC_BINARY", "/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path(os.environ.get("ORTHANC_DICOMWEB_PLUGIN", "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"))


def orthanc_available() -> bool:
    """True when the Orthanc binary can be run (for ``pytest.mark.skipif``)."""
    return Path(ORTHANC_BINARY).is_file() or shutil.which(ORTHANC_BINARY) is not None


def dicomweb_available() -> bool:
    """True when Orthanc and its DICOMweb plugin are installed."""
    return orthanc_available() and DICOMWEB_PLUGIN.is_file()


def free_port() -> int:
    """A TCP port that was free on localhost a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class OrthancServer:
    """An Orthanc process with a temporary configuration and storage under ``tmp_path``.

    ``modalities`` maps a modality name (used in Orthanc's REST paths) to
    ``(AE title, host, port)`` of DICOM nodes Orthanc may send to.
    """

    def __init__(
        self,
        tmp_path: Path,
        modalities: dict[str, tuple[str, str, int]] | None = None,
        *,
        aet: str = "ORTHANC",
        dicom_port: int | None = None,
        http_port: int | None = None,
        start_timeout: float = 30.0,
        extra_config: dict[str, Any] | None = None,
        dicomweb: bool = False,
        users: dict[str, str] | None = None,
    ) -> None:
        self.root = Path(tmp_path) / "orthanc"
        self.aet = aet
        self.modalities = dict(modalities or {})
        self.dicom_port = dicom_port or free_port()
        self.http_port = http_port or free_port()
        self.start_timeout = start_timeout
        self.extra_config = dict(extra_config or {})
        self.dicomweb = dicomweb
        self.users = dict(users or {})
        self.host = "127.0.0.1"
        self._process: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL of the REST API."""
        return f"http://{self.host}:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """Base URL of the DICOMweb plugin (with ``dicomweb=True``)."""
        return f"{self.url}/dicom-web"

    @property
    def _auth(self) -> tuple[str, str] | None:
        return next(iter(self.users.items())) if self.users else None

    @property
    def config_path(self) -> Path:
        """The JSON configuration Orthanc is started with."""
        return self.root / "orthanc.json"

    @property
    def log_path(self) -> Path:
        """Orthanc's stdout and stderr."""
        return self.root / "orthanc.log"

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self._process is not None and self._process.poll() is None

    def _write_config(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "storage").mkdir(exist_ok=True)
        config: dict[str, Any] = {
            "Name": "pacs-bridge-test",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "storage"),
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "DicomServerEnabled": True,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "SslEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "DicomCheckModalityHost": False,
            "DicomModalities": {name: list(node) for name, node in self.modalities.items()},
            "DicomAssociationCloseDelay": 0,
            "Plugins": [],
            "SaveJobs": False,
            "StableAge": 1,
            "HttpTimeout": 30,
            "DicomScuTimeout": 10,
            "DicomScpTimeout": 30,
        }
        if self.dicomweb:
            config["Plugins"] = [str(DICOMWEB_PLUGIN)]
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "StudiesMetadata": "Full"}
        if self.users:
            config["AuthenticationEnabled"] = True
            config["RegisteredUsers"] = dict(self.users)
        config.update(self.extra_config)
        self.config_path.write_text(json.dumps(config, indent=2))

    def start(self) -> OrthancServer:
        """Start Orthanc (again, on the same ports and storage) and wait until ``GET /system`` answers."""
        if self.running:
            return self
        self._write_config()
        self._log = open(self.log_path, "ab")
        self._process = subprocess.Popen(
            [ORTHANC_BINARY, str(self.config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.root,
        )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self._process.returncode}: {self.log_tail()}")
            try:
                response = httpx.get(f"{self.url}/system", timeout=1.0, auth=self._auth)
                if response.status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {self.start_timeout} s: {self.log_tail()}")

    def stop(self) -> None:
        """Stop Orthanc gracefully (kill after 15 s); the storage is kept."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, chars: int = 3000) -> str:
        """The end of Orthanc's log, for failure messages."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- REST ----------------------------------------------------------------------------------

    def rest(self, method: str, path: str, *, timeout: float = 60.0, **kwargs: Any) -> Any:
        """Call the REST API; returns the decoded JSON (or the bytes) and raises on an HTTP error."""
        kwargs.setdefault("auth", self._auth)
        response = httpx.request(method, f"{self.url}{path}", timeout=timeout, **kwargs)
        response.raise_for_status()
        if not response.content:
            return None
        if response.headers.get("content-type", "").startswith("application/json"):
            return response.json()
        return response.content

    def upload(self, path: Path | str) -> dict[str, Any]:
        """Store one DICOM file (``POST /instances``); returns Orthanc's answer (ID, ParentStudy, ...)."""
        answer: dict[str, Any] = self.rest("POST", "/instances", content=Path(path).read_bytes())
        return answer

    def find_study(self, study_uid: str) -> str | None:
        """Orthanc's ID of the study with this Study Instance UID, or None."""
        ids: list[str] = self.rest(
            "POST", "/tools/find", json={"Level": "Study", "Query": {"StudyInstanceUID": study_uid}}
        )
        return ids[0] if ids else None

    def instances_of_study(self, study_uid: str, *, tags: bool = False) -> list[dict[str, Any]]:
        """The instances Orthanc holds for a study (``GET /studies/{id}/instances``).

        Each entry has ``ID``, ``MainDicomTags`` (SOPInstanceUID, InstanceNumber, ...),
        ``ParentSeries``; with ``tags=True`` also ``Tags`` (``/instances/{id}/simplified-tags``)
        and ``SOPClassUID``.
        """
        study_id = self.find_study(study_uid)
        if study_id is None:
            return []
        instances: list[dict[str, Any]] = self.rest("GET", f"/studies/{study_id}/instances")
        if tags:
            for item in instances:
                simplified = self.rest("GET", f"/instances/{item['ID']}/simplified-tags")
                item["Tags"] = simplified
                item["SOPClassUID"] = simplified.get("SOPClassUID")
        return instances

    def instance_file(self, orthanc_id: str) -> bytes:
        """The stored DICOM file of an instance."""
        data: bytes = self.rest("GET", f"/instances/{orthanc_id}/file")
        return data

    def echo(self, modality: str) -> bool:
        """C-ECHO from Orthanc to one of its modalities."""
        try:
            self.rest("POST", f"/modalities/{modality}/echo", content=b"{}")
        except httpx.HTTPStatusError:
            return False
        return True
