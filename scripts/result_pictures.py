"""Render what the radiologist sees, from a real run of the shipped model, for docs/img/.

Starts ``pacs-bridge serve`` with the bundled model, sends it a DX study made from
FracAtlas radiographs (one fractured, one not), waits for the analysis, and writes
the annotated secondary captures and the study summary as PNG, each presentation
state as DCMTK applies it (``dcmp2pgm``: the image through the presentation state,
and the overlay plane of its "AI" layer, composed in yellow with the text object at
its bounding box, as a viewer draws them), and the TID 1500 SR as rendered by
DCMTK's ``dsr2html`` in headless Chromium::

    python scripts/result_pictures.py [--out docs/img]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.dicom_files import make_radiograph  # noqa: E402
from tests.support.paths import FRACATLAS  # noqa: E402
from tests.support.render import render_sr_png  # noqa: E402
from tests.support.serve import ServeProcess  # noqa: E402

IMAGES = {"positive": "images/Fractured/IMG0000019.jpg", "negative": "images/Non_fractured/IMG0000001.jpg"}
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
GSPS_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"
YELLOW = (0, 235, 255)  # BGR


def _pgm(path: Path) -> npt.NDArray[np.uint8]:
    data = path.read_bytes()
    match = re.match(rb"P5\s+(\d+)\s+(\d+)\s+(\d+)\s", data)
    if match is None:
        raise ValueError(f"{path} is not a binary PGM")
    width, height, _ = (int(v) for v in match.groups())
    return np.frombuffer(data[match.end() :], dtype=np.uint8).reshape(height, width)


def render_gsps(gsps_path: Path, source_path: Path, target: Path, work: Path) -> None:
    """The source through the presentation state, as DCMTK renders it, with the AI layer drawn on top."""
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["dcmp2pgm", "-d", "-p", str(gsps_path), str(source_path), str(work / "image.pgm")],
        check=True,
        cwd=work,
        capture_output=True,
    )
    image = cv2.cvtColor(_pgm(work / "image.pgm"), cv2.COLOR_GRAY2BGR)
    for overlay_path in work.glob("ovl_*.pgm"):
        overlay = _pgm(overlay_path) > 0
        image[cv2.dilate(overlay.astype(np.uint8), np.ones((2, 2), np.uint8)) > 0] = YELLOW
    gsps = pydicom.dcmread(gsps_path)
    scale = 2 if max(image.shape[:2]) < 1024 else 1
    image = cv2.resize(image, (image.shape[1] * scale, image.shape[0] * scale), interpolation=cv2.INTER_NEAREST)
    for annotation in gsps.GraphicAnnotationSequence:
        for text in annotation.get("TextObjectSequence", []):
            x, y = (float(v) * scale for v in text.BoundingBoxTopLeftHandCorner)
            for number, line in enumerate(str(text.UnformattedTextValue).splitlines()):
                position = (round(x), round(y) + 22 * (number + 1))
                cv2.putText(image, line, position, cv2.FONT_HERSHEY_DUPLEX, 0.6, (0, 0, 0), 3, cv2.LINE_AA)
                cv2.putText(image, line, position, cv2.FONT_HERSHEY_DUPLEX, 0.6, YELLOW, 1, cv2.LINE_AA)
    cv2.imwrite(str(target), image)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pictures-") as tmp_name:
        tmp = Path(tmp_name)
        study_uid, series_uid = generate_uid(), generate_uid()
        sources = {
            kind: make_radiograph(
                FRACATLAS / name, study_uid, series_uid=series_uid, instance_number=n, body_part="WRIST"
            )
            for n, (kind, name) in enumerate(IMAGES.items(), start=1)
        }
        with ServeProcess(tmp / "srv", {"analysis": {"enabled": True}}) as server:
            ae = AE(ae_title="MODALITY")
            ae.add_requested_context(DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)
            assoc = ae.associate("127.0.0.1", server.port, ae_title="PACS_BRIDGE")
            source_files = {}
            for kind, ds in sources.items():
                assoc.send_c_store(ds)
                source_files[str(ds.SOPInstanceUID)] = tmp / f"{kind}.dcm"
                ds.save_as(source_files[str(ds.SOPInstanceUID)], enforce_file_format=True)
            assoc.release()
            row = server.wait_for_state(study_uid, {"done"}, timeout=120)
            outputs = sorted((server.data_dir / "outputs" / study_uid).glob("*.dcm"))
            by_source = {f["sop_instance_uid"]: f for f in row["findings"]}
            for path in outputs:
                ds = pydicom.dcmread(path)
                if ds.SOPClassUID == SR_CLASS:
                    render_sr_png(path, args.out / "result-sr.png", tmp, window=(900, 1500))
                    continue
                suffix = ""
                if ds.SOPClassUID == GSPS_CLASS:
                    source_uid = ds.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID
                else:
                    if len(ds.SourceImageSequence) > 1:  # the study summary names every image
                        target = args.out / "result-summary.png"
                        cv2.imwrite(str(target), cv2.cvtColor(ds.pixel_array, cv2.COLOR_RGB2BGR))
                        print(f"summary -> {target}")
                        continue
                    source_uid = ds.SourceImageSequence[0].ReferencedSOPInstanceUID
                kind = next(k for k, s in sources.items() if s.SOPInstanceUID == source_uid)
                suffix = "" if kind == "positive" else "-negative"
                if ds.SOPClassUID == GSPS_CLASS:
                    target = args.out / f"result-gsps{suffix}.png"
                    render_gsps(path, source_files[str(source_uid)], target, tmp / f"gsps-{kind}")
                else:
                    target = args.out / f"result-capture{suffix}.png"
                    cv2.imwrite(str(target), cv2.cvtColor(ds.pixel_array, cv2.COLOR_RGB2BGR))
                finding = by_source[source_uid]
                print(f"{kind}: probability {finding['probability']:.3f} fracture {finding['fracture']} -> {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
