"""The downloadable report of an uploaded image: one PDF page (fpdf2).

It carries what a reader needs to weigh the result: the radiograph, the same
image with the model's heatmap and box, the probability against the decision
threshold, the body region the model assigned, the model's name and version,
when it was analysed, and the statement that this is an AI result, not a
diagnosis. The core PDF fonts are Latin-1 only, so every text is reduced to
it. Uploaded images carry no DICOM patient module, so the report holds no
patient data unless the file name does (it is printed as given).
"""

from __future__ import annotations

import io
import logging
from typing import Any

from fpdf import FPDF

from pacs_bridge.web.images import composite_png
from pacs_bridge.web.upload import UploadResult

__all__ = ["DISCLAIMER", "build_report"]

LOGGER = logging.getLogger(__name__)

DISCLAIMER = "AI result, not a diagnosis"


def _latin1(text: str) -> str:
    return text.encode("latin-1", "replace").decode("latin-1")


def _boxes(finding: dict[str, Any]) -> list[list[float]]:
    boxes = finding.get("boxes") or []
    out = [list(b["box"]) for b in boxes if isinstance(b, dict) and b.get("box")]
    if not out and finding.get("box"):
        out = [list(finding["box"])]
    return out


def build_report(result: UploadResult, *, product: str = "pacs-bridge") -> bytes:
    """The PDF report of ``result``."""
    finding = result.finding
    pdf = FPDF(orientation="portrait", unit="mm", format="A4")
    pdf.set_title(_latin1(f"{product}: AI fracture analysis of {result.name}"))
    pdf.set_author(product)
    pdf.set_compression(False)  # text stays searchable and checkable; the images are compressed PNGs anyway
    pdf.set_auto_page_break(auto=False)
    pdf.add_page()
    pdf.set_font("Helvetica", "B", 16)
    pdf.cell(0, 9, "AI fracture analysis", new_x="LMARGIN", new_y="NEXT")

    pdf.set_fill_color(255, 236, 179)
    pdf.set_font("Helvetica", "B", 12)
    pdf.cell(
        0, 9, _latin1(f"{DISCLAIMER}. Research model, not for clinical use."), fill=True, new_x="LMARGIN", new_y="NEXT"
    )
    pdf.ln(2)

    probability = float(finding["probability"])
    threshold = float(finding["threshold"])
    model = finding.get("model") or {}
    rows = [
        ("Image", result.name),
        ("Analysed", result.analysed_at.replace("T", " ")),
        (
            "Finding",
            "FRACTURE suspected" if finding["fracture"] else "no fracture found",
        ),
        ("Probability", f"{probability:.3f} (decision threshold {threshold:.3f})"),
        ("Body region", str(finding.get("body_part") or "not determined")),
        ("Model", f"{model.get('name', '?')} {model.get('version', '?')}"),
    ]
    pdf.set_font("Helvetica", "", 11)
    for label, value in rows:
        pdf.set_font("Helvetica", "B", 11)
        pdf.cell(38, 7, _latin1(label))
        pdf.set_font("Helvetica", "", 11)
        pdf.cell(0, 7, _latin1(value), new_x="LMARGIN", new_y="NEXT")
    pdf.ln(3)

    top = pdf.get_y()
    gap = 6.0
    column = (pdf.epw - gap) / 2
    aspect = result.pixels.shape[0] / max(result.pixels.shape[1], 1)
    height = min(column * aspect, 297 - top - 40)
    width = height / aspect
    overlay = composite_png(result.pixels, result.heatmap, _boxes(finding), (result.width, result.height))
    pdf.set_font("Helvetica", "I", 9)
    pdf.text(pdf.l_margin, top + 3, "Radiograph")
    pdf.text(pdf.l_margin + column + gap, top + 3, "Heatmap and box: where the model looked")
    pdf.image(io.BytesIO(result.image_png), x=pdf.l_margin, y=top + 5, w=width, h=height)
    pdf.image(io.BytesIO(overlay), x=pdf.l_margin + column + gap, y=top + 5, w=width, h=height)

    pdf.set_y(top + height + 10)
    pdf.set_font("Helvetica", "", 9)
    pdf.multi_cell(
        0,
        5,
        _latin1(
            f"{DISCLAIMER}. The probability is the model's output for this image; the finding is "
            f"'fracture' when it reaches the threshold {threshold:.3f}, chosen on validation data. "
            "The heatmap shows the regions that drove the output, not the outline of a fracture. "
            f"Produced by {product} with the model above; see the model card for its measured "
            "sensitivity and specificity."
        ),
    )
    return bytes(pdf.output())
