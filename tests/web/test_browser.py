"""The console in a real headless Chromium (Selenium): log in, upload, report, a study received over DICOM, resend.

Screenshots go to ``test-artifacts/console/``; the ones in ``docs/console/``
were taken by this test.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation

from pacs_bridge.inference.model import default_model_dir
from pacs_bridge.web.auth import hash_password, hash_token
from tests.support.paths import FRACATLAS, REPO_ROOT
from tests.support.serve import ServeProcess, free_port
from tests.web.conftest import PASSWORD, TOKEN, stored_radiograph

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("chromium") is None or shutil.which("chromedriver") is None,
        reason="chromium and chromium-driver (scripts/system-packages.sh) are needed",
    ),
]

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service as ChromeService  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

ARTIFACTS = REPO_ROOT / "test-artifacts" / "console"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


class StorageSCP:
    """A PACS stand-in that accepts every C-STORE and counts what it got."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[str] = []
        self._lock = threading.Lock()
        self.ae = AE(ae_title="MAINPACS")
        self.ae.supported_contexts = AllStoragePresentationContexts
        self.server: Any = None

    def _store(self, event: Any) -> int:
        with self._lock:
            self.received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def __enter__(self) -> StorageSCP:
        self.server = self.ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()


@pytest.fixture(scope="module")
def pacs() -> Iterator[StorageSCP]:
    with StorageSCP() as scp:
        yield scp


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, pacs: StorageSCP) -> Iterator[ServeProcess]:
    tmp_path = tmp_path_factory.mktemp("browser")
    config = {
        "analysis": {"enabled": True, "model_dir": str(default_model_dir()), "intra_op_threads": 1},
        "web": {
            "enabled": True,
            "port": free_port(),
            "users": [{"name": "alice", "password_hash": hash_password(PASSWORD)}],
            "api_tokens": [hash_token(TOKEN)],
        },
        "send": {"retry_for_hours": 1e-6, "timeout": 5},
        "destinations": [
            {"name": "main-pacs", "ae_title": "MAINPACS", "host": "127.0.0.1", "port": pacs.port},
            {"name": "ai-archive", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": free_port()},
        ],
    }
    with ServeProcess(tmp_path / "srv", config) as srv:
        yield srv


@pytest.fixture(scope="module")
def downloads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory, downloads: Path) -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for argument in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(argument)
    options.add_experimental_option(
        "prefs",
        {"download.default_directory": str(downloads), "download.prompt_for_download": False},
    )
    driver = webdriver.Chrome(options=options, service=ChromeService(shutil.which("chromedriver")))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def shot(driver: WebDriver, name: str, height: int | None = None) -> Path:
    """Save a screenshot of the whole page (at most ``height`` CSS pixels tall), 1400 pixels wide."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    full = int(driver.execute_script("return document.documentElement.scrollHeight"))
    tall = min(max(full, 700), height or 2400)
    metrics = {"width": 1400, "height": tall, "deviceScaleFactor": 1, "mobile": False}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)  # type: ignore[attr-defined]
    time.sleep(0.3)
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})  # type: ignore[attr-defined]
    return path


def wait(driver: WebDriver, seconds: float = 60) -> WebDriverWait[WebDriver]:
    return WebDriverWait(driver, seconds)


def store_study(server: ServeProcess, images: list[str], **attributes: Any) -> str:
    """C-STORE a study made of FracAtlas pictures (fictional patients); its Study Instance UID."""
    study_uid = generate_uid()
    series_uid = generate_uid()
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="PACS_BRIDGE")
    assert assoc.is_established
    for number, image in enumerate(images, start=1):
        ds, _ = stored_radiograph(image, study_uid, series_uid=series_uid, instance_number=number, **attributes)
        assert int(assoc.send_c_store(ds).Status) == 0
    assoc.release()
    return study_uid


def api(server: ServeProcess, path: str) -> Any:
    response = httpx.get(f"http://127.0.0.1:{server.config['web']['port']}{path}", headers=BEARER, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def wait_until(condition: Any, timeout: float = 90, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise TimeoutError(what)


def test_console_in_a_real_browser(server: ServeProcess, pacs: StorageSCP, browser: WebDriver, downloads: Path) -> None:
    url = f"http://127.0.0.1:{server.config['web']['port']}"
    store_study(
        server,
        ["images/Non_fractured/IMG0000001.jpg"],
        patient_name="Sample^Samuel",
        patient_id="DEMO-0017",
        accession_number="ACC-20240115",
        study_description="XR WRIST 1 VIEW",
        body_part="WRIST",
    )
    study_uid = store_study(
        server,
        ["images/Fractured/IMG0000019.jpg", "images/Fractured/IMG0000025.jpg"],
        patient_name="Example^Erika",
        patient_id="DEMO-0042",
        accession_number="ACC-20240117",
        study_description="XR HAND 2 VIEWS",
    )

    # Log in (a wrong password first: refused, with a message).
    browser.get(f"{url}/studies")
    assert "/login" in browser.current_url
    shot(browser, "login", 700)
    browser.find_element(By.ID, "username").send_keys("alice")
    browser.find_element(By.ID, "password").send_keys("not the password")
    browser.find_element(By.ID, "login").click()
    refusal = wait(browser).until(ec.presence_of_element_located((By.CSS_SELECTOR, ".error")))
    assert "Wrong user name or password" in refusal.text
    browser.find_element(By.ID, "username").send_keys("alice")
    browser.find_element(By.ID, "password").send_keys(PASSWORD)
    browser.find_element(By.ID, "login").click()
    wait(browser).until(lambda driver: "/login" not in driver.current_url)

    # Upload a radiograph: probability, body region, heatmap; then the PDF report.
    browser.get(f"{url}/upload")
    picture = FRACATLAS / "images/Fractured/IMG0000044.jpg"
    browser.find_element(By.ID, "files").send_keys(str(picture))
    browser.find_element(By.ID, "analyse").click()
    card = wait(browser).until(ec.presence_of_element_located((By.CSS_SELECTOR, ".upload-result")))
    probability = float(card.find_element(By.CSS_SELECTOR, ".prob").text)
    assert 0 <= probability <= 1
    assert "body region:" in card.find_element(By.CSS_SELECTOR, ".body-region").text
    heatmap = card.find_element(By.CSS_SELECTOR, "image.heatmap")
    status = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0].getAttribute('href')).then(r => done(r.status + ' ' + r.headers.get('content-type')));",
        heatmap,
    )
    assert status == "200 image/png"
    slider = browser.find_element(By.ID, "opacity")
    browser.execute_script("arguments[0].value = 70; arguments[0].dispatchEvent(new Event('input'));", slider)
    assert heatmap.get_attribute("opacity") == "0.7"
    time.sleep(0.5)  # let the pictures paint before the screenshot
    shot(browser, "upload", 1100)
    card.find_element(By.CSS_SELECTOR, "a.report").click()
    report = wait_until(lambda: [p for p in downloads.glob("*.pdf")], 30, "report download")[0]
    assert report.read_bytes().startswith(b"%PDF") and b"AI result, not a diagnosis" in report.read_bytes()

    # The study received over DICOM: analysed, delivered, shown with its heatmaps.
    wait_until(lambda: api(server, f"/api/studies/{study_uid}")["state"] in ("done", "failed"), 120, "analysis")

    def delivered() -> bool:
        to_pacs = [d for d in api(server, f"/api/studies/{study_uid}")["deliveries"] if d["destination"] == "main-pacs"]
        return len(to_pacs) >= 3 and all(d["state"] == "sent" for d in to_pacs)  # the SR and two captures

    wait_until(delivered, 60, "first delivery to the PACS")
    browser.get(f"{url}/studies")
    link = browser.find_element(By.CSS_SELECTOR, f'a[href="/studies/{study_uid}"]')
    assert "Example Erika" in link.text
    shot(browser, "studies", 900)
    link.click()
    wait(browser).until(ec.presence_of_element_located((By.CSS_SELECTOR, "svg.radiograph")))
    assert len(browser.find_elements(By.CSS_SELECTOR, "article.instance")) == 2
    assert len(browser.find_elements(By.CSS_SELECTOR, "image.heatmap")) >= 1
    probabilities = [float(e.text) for e in browser.find_elements(By.CSS_SELECTOR, ".prob")]
    assert len(probabilities) == 2 and all(0 <= p <= 1 for p in probabilities)
    time.sleep(0.5)
    shot(browser, "study", 2000)

    # Resend: new deliveries, the PACS receives the result objects again.
    deliveries = api(server, f"/api/studies/{study_uid}")["deliveries"]
    objects = {d["sop_instance_uid"] for d in deliveries if d["destination"] == "main-pacs"}
    before = {uid: pacs.received.count(uid) for uid in objects}
    assert objects and all(count == 1 for count in before.values())
    browser.find_element(By.ID, "action-resend").click()
    flash = wait(browser).until(ec.presence_of_element_located((By.CSS_SELECTOR, ".flash")))
    assert "queued for delivery again" in flash.text
    wait_until(lambda: all(pacs.received.count(uid) == 2 for uid in objects), 60, "resent objects at the PACS")

    browser.get(f"{url}/failures")
    assert "ai-archive" in browser.page_source  # the archive never answers: dead letters with a retry button
    assert browser.find_elements(By.CSS_SELECTOR, "table.jobs button")
    shot(browser, "failures", 1200)
    browser.get(f"{url}/model")
    assert "ROC AUC" in browser.page_source
    time.sleep(0.5)
    shot(browser, "model", 2400)
