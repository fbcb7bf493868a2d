"""The source attributes that result objects copy, made conformant before they are copied.

Every result object repeats the source's Patient Module (PS3.3 C.7.1.1),
General Study Module (C.7.2.1) and a few image attributes. A PACS may hold
values outside their Value Representation (PS3.5 6.2) or their enumerated
values, e.g. a Patient Birth Date ``1970-01-01``, a Study Time ``25:99`` or a
Patient Sex ``X``; copied as they are, they make highdicom or pydicom refuse to
build the object, and the study would get no result at all. Such a value is
emptied (Type 2 attributes stay present, empty, as PS3.5 7.4 allows) or removed
(an unknown Specific Character Set, so the text is read as the default
repertoire), in the data set read for building only: the stored instance is
never changed.
The values themselves are never logged; only the attribute keywords are.
"""

from __future__ import annotations

import logging

from pydicom import config
from pydicom.charset import python_encoding
from pydicom.dataset import Dataset
from pydicom.valuerep import validate_value

__all__ = ["COPIED_KEYWORDS", "make_conformant"]

LOGGER = logging.getLogger(__name__)

COPIED_KEYWORDS: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "StudyDescription",
    "AccessionNumber",
    "ReferringPhysicianName",
    "SeriesDate",
    "SeriesTime",
    "ContentDate",
    "ContentTime",
    "Laterality",
    "ImageLaterality",
    "BodyPartExamined",
    "PatientOrientation",
    "InstitutionName",
)
"""What the result objects copy from the source and what is checked (all other attributes are left as they are)."""

_ENUMERATED: dict[str, frozenset[str]] = {
    "PatientSex": frozenset({"M", "F", "O"}),
    "Laterality": frozenset({"R", "L"}),
    "ImageLaterality": frozenset({"R", "L", "U", "B"}),
}


def _conformant(source: Dataset, keyword: str) -> bool:
    element = source.data_element(keyword)
    if element is None:
        return True
    try:
        value = element.value  # converting a raw value (DA, TM, PN, ...) may itself raise
        if value is None or value == "":
            return True
        validate_value(element.VR, value, config.RAISE)
        allowed = _ENUMERATED.get(keyword)
        return allowed is None or str(value) in allowed
    except Exception:
        return False


def make_conformant(source: Dataset, study_uid: str = "") -> Dataset:
    """Empty (or remove) the copied attributes of ``source`` that are invalid for their VR or enumerated values.

    ``source`` is a data set read from the spool for building result objects;
    it is changed in memory and returned.
    """
    charsets = source.get("SpecificCharacterSet")
    terms = [charsets] if isinstance(charsets, str) else list(charsets or [])
    bad_charset = any(str(t).strip() and str(t).strip() not in python_encoding for t in terms)
    bad = [k for k in COPIED_KEYWORDS if k in source and not _conformant(source, k)]
    if bad_charset:
        del source.SpecificCharacterSet
    for keyword in bad:
        setattr(source, keyword, None)
    if bad or bad_charset:
        shown = bad + (["SpecificCharacterSet"] if bad_charset else [])
        LOGGER.warning("study %s: non-conformant %s left empty in the result objects", study_uid, ", ".join(shown))
    return source
