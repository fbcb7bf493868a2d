"""The study's AI result as a Comprehensive 3D SR with a TID 1500 Imaging Measurement Report.

Objects and templates (DICOM PS3.3, PS3.16):

- PS3.3 A.35.13 Comprehensive 3D SR IOD (SOP Class 1.2.840.10008.5.1.4.1.1.88.34),
  built with :class:`highdicom.sr.Comprehensive3DSR`; the source's patient and
  study modules are copied so the SR lands in the analysed study; Verification
  Flag UNVERIFIED, Completion Flag COMPLETE, Preliminary Flag PRELIMINARY (an
  algorithm's result awaiting a radiologist).
- PS3.16 TID 1500 Measurement Report (:class:`highdicom.sr.MeasurementReport`):
  a Device observer (TID 1004) whose Device Observer UID changes with the
  model version, Procedure Reported "Radiographic imaging procedure", an
  Image Library (TID 1600) of every analysed image.
- One measurement group per analysed image: TID 1410 Planar ROI
  (:class:`highdicom.sr.PlanarROIMeasurementsAndQualitativeEvaluations`) with
  an Image Region SCOORD POLYLINE when the model located the finding, else
  TID 1501 (:class:`highdicom.sr.MeasurementsAndQualitativeEvaluations`) with
  a source IMAGE reference. Each carries a Tracking Identifier and UID,
  TID 4019 Algorithm Identification (name, version, threshold parameter),
  Finding = Fracture, the qualitative evaluation Fracture = Present/Absent,
  Certainty of Finding as a NUM in percent (UCUM ``%``) and, where the body
  region is known, Finding Site.
- PS3.3 C.12.1 Contributing Equipment Sequence naming the algorithm (purpose
  of reference (Newcode1, 99IHE, "Processing Algorithm"), IHE AI Results).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

import pacs_bridge
from pacs_bridge.config import ReportSettings
from pacs_bridge.report.findings import FindingInput, ModelInfo
from pacs_bridge.report.uids import device_uid, instance_uid, series_uid, tracking_uid

__all__ = [
    "ABSENT",
    "FRACTURE",
    "PRESENT",
    "PROCESSING_ALGORITHM",
    "RADIOGRAPHIC_IMAGING_PROCEDURE",
    "SR_SERIES_DESCRIPTION",
    "SR_SERIES_NUMBER",
    "build_sr",
    "contributing_equipment",
    "finding_site_code",
    "source_header",
]

LOGGER = logging.getLogger(__name__)

SR_SERIES_NUMBER = 9901
"""Series Number of the SR series: sorts after the acquired series in every viewer."""
SR_SERIES_DESCRIPTION = "AI fracture report"

FRACTURE = Code("72704001", "SCT", "Fracture")
PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("272519000", "SCT", "Absent")
RADIOGRAPHIC_IMAGING_PROCEDURE = Code("363680008", "SCT", "Radiographic imaging procedure")
PROCESSING_ALGORITHM = Code("Newcode1", "99IHE", "Processing Algorithm")
"""Purpose of Reference of the algorithm in the Contributing Equipment Sequence (IHE AIR)."""

# Body region (FracAtlas labels and common Body Part Examined values) -> Finding Site (SNOMED CT).
_SITES: dict[str, Code] = {
    "hand": Code("85562004", "SCT", "Hand structure"),
    "finger": Code("85562004", "SCT", "Hand structure"),
    "wrist": Code("74670003", "SCT", "Wrist joint structure"),
    "leg": Code("30021000", "SCT", "Lower leg structure"),
    "lowerleg": Code("30021000", "SCT", "Lower leg structure"),
    "lower_leg": Code("30021000", "SCT", "Lower leg structure"),
    "tibia": Code("30021000", "SCT", "Lower leg structure"),
    "ankle": Code("70258002", "SCT", "Ankle joint structure"),
    "hip": Code("24136001", "SCT", "Hip joint structure"),
    "shoulder": Code("16982005", "SCT", "Shoulder region structure"),
}

# Patient and study attributes copied from the source beyond those highdicom copies itself.
_COPIED = (
    "IssuerOfPatientID",
    "OtherPatientIDsSequence",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "StudyDescription",
    "IssuerOfAccessionNumberSequence",
    "ReferringPhysicianName",
)

# Type 2 attributes highdicom reads from the first evidence dataset.
_TYPE2 = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


def finding_site_code(body_part: str | None) -> Code | None:
    """The Finding Site code of a body region name, or ``None`` when unknown."""
    if not body_part:
        return None
    return _SITES.get(body_part.strip().lower().replace(" ", ""))


def source_header(source: Dataset) -> Dataset:
    """A copy of a source image without its pixel data, missing Type 2 attributes filled with empty values."""
    header = Dataset()
    for element in source:
        if element.tag.group == 0x7FE0 or element.tag in (0x00281201, 0x00281202, 0x00281203):
            continue
        header.add(element)
    if hasattr(source, "file_meta"):
        header.file_meta = source.file_meta
    for keyword in _TYPE2:
        if keyword not in header:
            setattr(header, keyword, "")
    return header


def contributing_equipment(model: ModelInfo, settings: ReportSettings) -> hd.ContributingEquipment:
    """The algorithm as Contributing Equipment (PS3.3 C.12.1.1.5), with a Device UID per model version.

    highdicom accepts only the purposes of CID 7005; IHE AIR names the
    algorithm with (Newcode1, 99IHE, "Processing Algorithm"), which replaces
    CID 7005's "Processing Equipment" after construction.
    """
    equipment = hd.ContributingEquipment(
        manufacturer=settings.manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=model.name[:64],
        software_versions=model.version[:64],
        institution_name=settings.institution_name,
        contribution_description=f"Fracture detection by {model.label} (pacs-bridge {pacs_bridge.__version__})"[:64],
    )
    equipment.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept.from_code(PROCESSING_ALGORITHM)]
    equipment.DeviceUID = device_uid(model.name, model.version)
    return equipment


def _group(
    finding: FindingInput,
    source: Dataset,
    index: int,
    study_uid: str,
    model: ModelInfo,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations | hd.sr.MeasurementsAndQualitativeEvaluations:
    tracking = hd.sr.TrackingIdentifier(
        uid=tracking_uid(study_uid, model.name, model.version, finding.sop_instance_uid),
        identifier=f"Fracture finding, image {index}",
    )
    algorithm = hd.sr.AlgorithmIdentification(
        name=model.name,
        version=model.version,
        parameters=[f"threshold={finding.threshold:.4g}"],
    )
    evaluation = hd.sr.QualitativeEvaluation(name=FRACTURE, value=PRESENT if finding.fracture else ABSENT)
    certainty = hd.sr.Measurement(
        name=codes.DCM.CertaintyOfFinding,
        value=round(float(finding.probability) * 100.0, 2),
        unit=codes.UCUM.Percent,
    )
    site = finding_site_code(finding.body_part)
    sites = [hd.sr.FindingSite(anatomic_location=site)] if site is not None else None
    if finding.box is not None:
        rows, columns = int(source.Rows), int(source.Columns)
        x0, y0, x1, y1 = finding.box
        x0, x1 = (float(np.clip(v, 0, columns)) for v in (x0, x1))
        y0, y1 = (float(np.clip(v, 0, rows)) for v in (y0, y1))
        if x1 > x0 and y1 > y0:
            region = hd.sr.ImageRegion(
                graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                graphic_data=np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float32),
                source_image=hd.sr.SourceImageForRegion(
                    referenced_sop_class_uid=finding.sop_class_uid,
                    referenced_sop_instance_uid=finding.sop_instance_uid,
                ),
            )
            return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking,
                referenced_region=region,
                finding_type=FRACTURE,
                algorithm_id=algorithm,
                finding_sites=sites,
                measurements=[certainty],
                qualitative_evaluations=[evaluation],
            )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        finding_type=FRACTURE,
        algorithm_id=algorithm,
        finding_sites=sites,
        measurements=[certainty],
        qualitative_evaluations=[evaluation],
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=finding.sop_class_uid,
                referenced_sop_instance_uid=finding.sop_instance_uid,
            )
        ],
    )


def build_sr(
    sources: Sequence[Dataset],
    findings: Sequence[FindingInput],
    model: ModelInfo,
    settings: ReportSettings,
) -> Dataset:
    """Build the study's TID 1500 Comprehensive 3D SR (PS3.3 A.35.13) from its analysed images.

    ``sources`` are the analysed images (full datasets or headers) of one
    study; every finding must name one of them. The Series and SOP Instance
    UIDs are derived from the study and the model (:mod:`pacs_bridge.report.uids`),
    so building again gives the same UIDs. Raises ``ValueError`` when there is
    nothing to report or the inputs do not belong together.
    """
    if not findings:
        raise ValueError("no findings to report")
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    missing = [f.sop_instance_uid for f in findings if f.sop_instance_uid not in by_uid]
    if missing:
        raise ValueError(f"findings without a source image: {missing}")
    studies = {str(ds.StudyInstanceUID) for ds in sources}
    if len(studies) != 1:
        raise ValueError(f"sources belong to {len(studies)} studies, expected one")
    study_uid = studies.pop()

    analysed = [source_header(by_uid[f.sop_instance_uid]) for f in findings]
    device = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(model.name, model.version),
            name=model.name[:64],
            manufacturer_name=settings.manufacturer,
            model_name=model.label[:64],
        ),
    )
    groups = [
        _group(finding, header, index, study_uid, model)
        for index, (finding, header) in enumerate(zip(findings, analysed, strict=True), start=1)
    ]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=RADIOGRAPHIC_IMAGING_PROCEDURE,
        imaging_measurements=groups,
        referenced_images=analysed,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=analysed,
        content=report[0],
        series_instance_uid=series_uid(study_uid, model.name, model.version, "sr"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=instance_uid(study_uid, model.name, model.version, "sr"),
        instance_number=1,
        manufacturer=settings.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=settings.institution_name,
        contributing_equipment=[contributing_equipment(model, settings)],
        series_description=SR_SERIES_DESCRIPTION,
        manufacturer_model_name="pacs-bridge",
        software_versions=pacs_bridge.__version__,
    )
    first = analysed[0]
    for keyword in _COPIED:
        if keyword in first and keyword not in sr:
            setattr(sr, keyword, first[keyword].value)
    positives = sum(1 for f in findings if f.fracture)
    LOGGER.debug(
        "built SR %s for study %s: %d images, %d positive", sr.SOPInstanceUID, study_uid, len(findings), positives
    )
    return sr
