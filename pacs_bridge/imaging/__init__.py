"""Images in: DICOM decoding (:mod:`.dicom`), raster loading (:mod:`.loader`), preprocessing (:mod:`.preprocess`).

Submodules are imported on use so that importing the package stays cheap
(:mod:`.preprocess` needs only numpy and OpenCV; :mod:`.dicom` pulls in
pydicom and its codecs).
"""

__all__ = ["dicom", "loader", "preprocess"]
