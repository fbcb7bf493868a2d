"""One exception root for pacs-bridge.

::

    PacsBridgeError
    ├── ConfigError            invalid settings; reported at start-up
    ├── StorageError           the spool or database cannot take an instance
    │   ├── RejectedInstance   the instance is refused (bad UID, too large, ...)
    │   └── OutOfResources     disk below the watermark (DIMSE 0xA700)
    ├── AnalysisError          an instance or study cannot be analysed
    │   └── TransientError     retry later (the worker backs off)
    └── DeliveryError          a destination did not take an object (retried)
"""

from __future__ import annotations

__all__ = [
    "AnalysisError",
    "ConfigError",
    "DeliveryError",
    "OutOfResources",
    "PacsBridgeError",
    "RejectedInstance",
    "StorageError",
    "TransientError",
]


class PacsBridgeError(Exception):
    """Root of every error raised on purpose by pacs-bridge."""


class ConfigError(PacsBridgeError):
    """The settings are invalid; the message says which key and why."""


class StorageError(PacsBridgeError):
    """An instance could not be stored."""


class RejectedInstance(StorageError):
    """The instance is refused for what it is (bad UID, too large, not DICOM)."""


class OutOfResources(StorageError):
    """Free disk is below the configured watermark."""


class AnalysisError(PacsBridgeError):
    """An instance or study could not be analysed."""


class TransientError(AnalysisError):
    """A failure worth retrying later."""


class DeliveryError(PacsBridgeError):
    """A destination did not accept an object."""
