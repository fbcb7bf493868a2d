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
  region is known, Finding Site. Every NUM has its own content: an INFERRED
  FROM IMAGE "Source of Measurement" (TID 300, TID 320) naming the analysed
  image and, in the Image Reference Macro's nested Referenced SOP Sequence
  (PS3.3 C.18.4), the presentation state that draws the finding on it. TID
  1500 readers that look for a region under each NUM of a group without an
  Image Region (OHIF's, through dcmjs) find an image reference there.
- Revisions (:mod:`pacs_bridge.report.revision`): the UIDs follow from the
  revision's content digest; Series Number and Instance Number rise with the
  revision, Content Date/Time is the content's time, and the SR that this one
  replaces is listed in the Predecessor Documents Sequence (PS3.3 C.17.2.3).
  The annotated images, presentation states and study summary of the same
  revision are listed in the Pertinent Other Evidence Sequence (PS3.3 C.17.2.3).
- PS3.3 C.12.1 Contributing Equipment Sequence naming the algorithm (purpose
  of reference (Newcode1, 99IHE, "Processing Algorithm"), IHE AI Results).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

import pacs_bridge
from pacs_bridge.config import ReportSettings
from pacs_bridge.report.findings import FailedImage, FindingInput, ModelInfo
from pacs_bridge.report.revision import PriorObject, Revision, first_revision
from pacs_bridge.report.uids import device_uid, tracking_uid

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
    "hierarchical_references",
    "source_header",
]

LOGGER = logging.getLogger(__name__)

SR_SERIES_NUMBER = 9901
"""Series Number of the SR series: sorts after the acquired series in every viewer."""
SR_SERIES_DESCRIPTION = "AI fracture report"
KIND = "sr"
"""The output kind of the SR, which its UIDs are derived from."""

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


# TID 1603 descriptors that highdicom reads from every projection radiograph, and their concepts.
_OPTIONAL_DESCRIPTORS: dict[str, tuple[Code, ...]] = {
    "PatientOrientation": (codes.DCM.PatientOrientationRow, codes.DCM.PatientOrientationColumn),
    "ImagerPixelSpacing": (codes.DCM.HorizontalPixelSpacing, codes.DCM.VerticalPixelSpacing),
}


def _library_headers(headers: Sequence[Dataset]) -> tuple[list[Dataset], dict[str, set[str]]]:
    """Headers for the Image Library (TID 1601), and per SOP Instance UID the descriptors it must not state.

    Patient Orientation and Imager Pixel Spacing are optional for CR/DX
    images but read unconditionally by highdicom's TID 1603 descriptors; an
    image without them gets placeholders whose descriptor items are removed
    again (:func:`_drop_descriptors`), so the library names every image and
    states nothing the image does not.
    """
    prepared: list[Dataset] = []
    missing: dict[str, set[str]] = {}
    for header in headers:
        copy = Dataset()
        copy.update(header)
        for keyword, concepts in _OPTIONAL_DESCRIPTORS.items():
            value = header.get(keyword)
            if value is None or len(value) != 2 or not all(str(v).strip() for v in value):
                setattr(copy, keyword, ["X", "X"] if keyword == "PatientOrientation" else [1.0, 1.0])
                missing.setdefault(str(header.SOPInstanceUID), set()).update(c.value for c in concepts)
        prepared.append(copy)
    return prepared, missing


def _drop_descriptors(items: Sequence[Dataset], missing: Mapping[str, set[str]]) -> None:
    """Remove the placeholder descriptors of the images in ``missing`` from an Image Library tree."""
    for item in items:
        if item.get("ValueType") == "IMAGE" and "ContentSequence" in item:
            uid = str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            drop = missing.get(uid)
            if drop:
                kept = [c for c in item.ContentSequence if c.ConceptNameCodeSequence[0].CodeValue not in drop]
                item.ContentSequence = kept
        elif "ContentSequence" in item:
            _drop_descriptors(item.ContentSequence, missing)


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


def hierarchical_references(objects: Sequence[PriorObject]) -> list[Dataset]:
    """Items of a Hierarchical SOP Instance Reference sequence (PS3.3 C.17.2.1), by study and series."""
    studies: dict[str, dict[str, list[PriorObject]]] = {}
    for item in objects:
        studies.setdefault(item.study_instance_uid, {}).setdefault(item.series_instance_uid, []).append(item)
    items: list[Dataset] = []
    for study_uid, series in studies.items():
        study_item = Dataset()
        study_item.StudyInstanceUID = study_uid
        series_items = []
        for series_uid, members in series.items():
            series_item = Dataset()
            series_item.SeriesInstanceUID = series_uid
            references = []
            for member in members:
                reference = Dataset()
                reference.ReferencedSOPClassUID = member.sop_class_uid
                reference.ReferencedSOPInstanceUID = member.sop_instance_uid
                references.append(reference)
            series_item.ReferencedSOPSequence = references
            series_items.append(series_item)
        study_item.ReferencedSeriesSequence = series_items
        items.append(study_item)
    return items


def _measurement_source(finding: FindingInput, presentation: PriorObject | None) -> hd.sr.SourceImageForMeasurement:
    """INFERRED FROM IMAGE (121112, DCM, "Source of Measurement"), with the image's presentation state if any."""
    source = hd.sr.SourceImageForMeasurement(
        referenced_sop_class_uid=finding.sop_class_uid,
        referenced_sop_instance_uid=finding.sop_instance_uid,
    )
    if presentation is not None:
        state = Dataset()
        state.ReferencedSOPClassUID = presentation.sop_class_uid
        state.ReferencedSOPInstanceUID = presentation.sop_instance_uid
        source.ReferencedSOPSequence[0].ReferencedSOPSequence = [state]
    return source


def _group(
    finding: FindingInput,
    source: Dataset,
    index: int,
    study_uid: str,
    model: ModelInfo,
    presentation: PriorObject | None = None,
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
        value=round(float(finding.probability) * 100.0, 1),
        unit=codes.UCUM.Percent,
        referenced_images=[_measurement_source(finding, presentation)],
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
    *,
    revision: Revision | None = None,
    failed: Sequence[FailedImage] = (),
    presentation_states: Mapping[str, PriorObject] | None = None,
    companions: Sequence[PriorObject] = (),
) -> Dataset:
    """Build the study's TID 1500 Comprehensive 3D SR (PS3.3 A.35.13) from its analysed images.

    ``sources`` are the analysed images (full datasets or headers) of one
    study; every finding must name one of them. The UIDs, numbers and times
    come from ``revision`` (the first revision of this content when not
    given), so building again gives the same object. ``presentation_states``
    maps a source SOP Instance UID to the presentation state drawn on it;
    ``companions`` are the revision's other objects (annotated images,
    presentation states, summary). Raises ``ValueError`` when there is
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
    if revision is None:
        revision = first_revision(study_uid, model, findings, settings, failed)
    states = presentation_states or {}

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
        _group(finding, header, index, study_uid, model, states.get(finding.sop_instance_uid))
        for index, (finding, header) in enumerate(zip(findings, analysed, strict=True), start=1)
    ]
    library, placeholders = _library_headers(analysed)
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=RADIOGRAPHIC_IMAGING_PROCEDURE,
        imaging_measurements=groups,
        referenced_images=library,
    )
    if placeholders:
        _drop_descriptors(
            [c for c in report[0].ContentSequence if c.ConceptNameCodeSequence[0].CodeValue == "111028"],
            placeholders,
        )
    predecessor = [revision.predecessor.as_dataset()] if revision.predecessor is not None else None
    sr = hd.sr.Comprehensive3DSR(
        evidence=analysed,
        content=report[0],
        series_instance_uid=revision.series_instance_uid(KIND),
        series_number=revision.series_number(SR_SERIES_NUMBER),
        sop_instance_uid=revision.sop_instance_uid(KIND),
        instance_number=revision.number,
        manufacturer=settings.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=settings.institution_name,
        contributing_equipment=[contributing_equipment(model, settings)],
        series_description=revision.series_description(SR_SERIES_DESCRIPTION),
        manufacturer_model_name="pacs-bridge",
        software_versions=pacs_bridge.__version__,
        previous_versions=predecessor,
    )
    first = analysed[0]
    for keyword in _COPIED:
        if keyword in first and keyword not in sr:
            setattr(sr, keyword, first[keyword].value)
    if companions:
        sr.PertinentOtherEvidenceSequence = hierarchical_references(companions)
    revision.stamp(sr)
    positives = sum(1 for f in findings if f.fracture)
    LOGGER.debug(
        "built SR %s (revision %d) for study %s: %d images, %d positive",
        sr.SOPInstanceUID,
        revision.number,
        study_uid,
        len(findings),
        positives,
    )
    return sr
