"""Helpers shared by the test suites: DICOM test files and a real Orthanc PACS."""
