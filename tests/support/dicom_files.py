"""Build radiograph DICOM files for tests from any grayscale picture (a FracAtlas JPEG, an array).

:func:`make_radiograph` writes a CR (PS3.3 A.2 CR Image IOD) or DX For
Presentation (PS3.3 A.26 DX Image IOD) instance with the patient, study,
series and image attributes that pacs-bridge reads; every UID and identifying
value can be chosen so that several files form one study.
"""

from __future__ import annotations

from datetime import datetime
from os import PathLike
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

__all__ = ["CR_IMAGE_STORAGE", "DX_PRESENTATION_STORAGE", "SOP_CLASS_BY_MODALITY", "make_radiograph"]

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
SOP_CLASS_BY_MODALITY = {"CR": CR_IMAGE_STORAGE, "DX": DX_PRESENTATION_STORAGE}

# Body Part Examined -> Anatomic Region Sequence item (PS3.16 CID 4009, SNOMED CT).
_ANATOMIC_REGIONS = {
    "HAND": ("85562004", "SCT", "Hand"),
    "WRIST": ("74670003", "SCT", "Wrist joint"),
    "LEG": ("30021000", "SCT", "Lower leg"),
    "HIP": ("24136001", "SCT", "Hip joint"),
    "SHOULDER": ("16982005", "SCT", "Shoulder region"),
}


def _load_gray(source: str | PathLike[str] | npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    """Grayscale picture scaled to [0, 1] (bright = dense)."""
    if isinstance(source, np.ndarray):
        array = source.astype(np.float64)
        if array.ndim == 3:
            array = array[..., :3].mean(axis=2)
        low, high = float(array.min()), float(array.max())
        return (array - low) / (high - low) if high > low else np.zeros_like(array)
    image = cv2.imread(str(source), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise ValueError(f"cannot read image {source}")
    return image.astype(np.float64) / 255.0


def make_radiograph(
    source: str | PathLike[str] | npt.NDArray[Any],
    study_uid: str | None = None,
    *,
    path: str | PathLike[str] | None = None,
    modality: str = "DX",
    sop_class_uid: str | None = None,
    series_uid: str | None = None,
    sop_instance_uid: str | None = None,
    bits_stored: int = 12,
    photometric: str = "MONOCHROME2",
    patient_name: str = "Test^Patient",
    patient_id: str = "PB-TEST-0001",
    patient_birth_date: str = "19700101",
    patient_sex: str = "O",
    accession_number: str = "ACC0001",
    study_id: str = "1",
    study_date: str | None = None,
    study_description: str = "XR HAND 2 VIEWS",
    series_number: int = 1,
    instance_number: int = 1,
    body_part: str | None = "HAND",
    laterality: str | None = "L",
    view_position: str | None = "PA",
    pixel_spacing: float = 0.15,
    window: tuple[float, float] | None = None,
    rescale: tuple[float, float] | None = None,
    implicit_vr: bool = False,
) -> Dataset:
    """A radiograph dataset made from a picture; written to ``path`` when given.

    ``source`` is an image file (JPEG, PNG) or a 2-D array. ``bits_stored``
    (8..16) sets the stored range; ``photometric`` ``MONOCHROME1`` stores the
    inverted values (so a correct viewer shows the same picture). ``window``
    is (center, width) in stored units, default the full range. ``rescale``
    is (slope, intercept), omitted by default. Missing UIDs are generated.
    """
    modality = modality.upper()
    if sop_class_uid is None:
        sop_class_uid = SOP_CLASS_BY_MODALITY.get(modality, DX_PRESENTATION_STORAGE)
    if not 8 <= bits_stored <= 16:
        raise ValueError("bits_stored must be 8..16")
    gray = _load_gray(source)
    max_value = 2**bits_stored - 1
    if photometric == "MONOCHROME1":
        gray = 1.0 - gray
    bits_allocated = 8 if bits_stored == 8 else 16
    dtype = np.uint8 if bits_allocated == 8 else np.uint16
    pixels = np.round(gray * max_value).astype(dtype)

    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    sop_instance_uid = sop_instance_uid or generate_uid()
    now = datetime.now()
    study_date = study_date or now.strftime("%Y%m%d")

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit_vr else ExplicitVRLittleEndian
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    ds.StudyDate = study_date
    ds.SeriesDate = study_date
    ds.ContentDate = study_date
    ds.StudyTime = "101500"
    ds.SeriesTime = "101500"
    ds.ContentTime = "101530"
    ds.AccessionNumber = accession_number
    ds.Modality = modality
    ds.Manufacturer = "Test Manufacturer"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = study_description
    ds.SeriesDescription = f"{body_part or 'XR'} {view_position or ''}".strip()
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = patient_birth_date
    ds.PatientSex = patient_sex
    if body_part:
        ds.BodyPartExamined = body_part
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = study_id
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.PatientOrientation = ["A", "F"] if modality == "CR" else ["R", "F"]
    if laterality:
        ds.ImageLaterality = laterality
    if view_position:
        ds.ViewPosition = view_position
    ds.ImageType = ["ORIGINAL", "PRIMARY"] if modality == "CR" else ["ORIGINAL", "PRIMARY", ""]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelSpacing = [pixel_spacing, pixel_spacing]
    ds.ImagerPixelSpacing = [pixel_spacing, pixel_spacing]
    if window is None:
        window = (max_value / 2.0 + 0.5, float(max_value + 1))
    ds.WindowCenter = f"{window[0]:g}"
    ds.WindowWidth = f"{window[1]:g}"
    if rescale is not None:
        ds.RescaleSlope = f"{rescale[0]:g}"
        ds.RescaleIntercept = f"{rescale[1]:g}"
        ds.RescaleType = "US"
    if sop_class_uid == DX_PRESENTATION_STORAGE:
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.DetectorType = "DIRECT"
        ds.BurnedInAnnotation = "NO"
        ds.LossyImageCompression = "00"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1
        ds.RescaleSlope = ds.get("RescaleSlope", "1")
        ds.RescaleIntercept = ds.get("RescaleIntercept", "0")
        ds.RescaleType = "US"
        ds.PresentationLUTShape = "IDENTITY" if photometric == "MONOCHROME2" else "INVERSE"
        ds.ImagerPixelSpacing = [pixel_spacing, pixel_spacing]
        ds.PositionerType = ""
        ds.AcquisitionContextSequence = []
        region = _ANATOMIC_REGIONS.get((body_part or "").upper())
        if region is not None:
            item = Dataset()
            item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = region
            ds.AnatomicRegionSequence = [item]
        else:
            ds.AnatomicRegionSequence = []
    ds.PixelData = pixels.tobytes()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
    return ds
