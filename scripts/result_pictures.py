"""Render what the radiologist sees, from a real run of the shipped model, for docs/img/.

Starts ``pacs-bridge serve`` with the bundled model, sends it a DX study made from
FracAtlas radiographs (one fractured, one not), waits for the analysis, and writes
the annotated secondary captures as PNG and the TID 1500 SR as rendered by DCMTK's
``dsr2html`` in headless Chromium::

    python scripts/result_pictures.py [--out docs/img]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import cv2
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
            for ds in sources.values():
                assoc.send_c_store(ds)
            assoc.release()
            row = server.wait_for_state(study_uid, {"done"}, timeout=120)
            outputs = sorted((server.data_dir / "outputs" / study_uid).glob("*.dcm"))
            by_source = {f["sop_instance_uid"]: f for f in row["findings"]}
            for path in outputs:
                ds = pydicom.dcmread(path)
                if ds.SOPClassUID == SR_CLASS:
                    render_sr_png(path, args.out / "result-sr.png", tmp, window=(900, 1500))
                    continue
                source_uid = ds.SourceImageSequence[0].ReferencedSOPInstanceUID
                kind = next(k for k, s in sources.items() if s.SOPInstanceUID == source_uid)
                target = args.out / f"result-capture{'' if kind == 'positive' else '-negative'}.png"
                cv2.imwrite(str(target), cv2.cvtColor(ds.pixel_array, cv2.COLOR_RGB2BGR))
                finding = by_source[source_uid]
                print(f"{kind}: probability {finding['probability']:.3f} fracture {finding['fracture']} -> {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
