"""One exception root for pacs-bridge.

::

    PacsBridgeError
    ├── ConfigError            invalid settings; reported at start-up
    ├── StorageError           the spool or database cannot take an instance
    │   ├── RejectedInstance   the instance is refused (bad UID, too large, ...)
    │   └── OutOfResources     disk below the watermark (DIMSE 0xA700)
    ├── AnalysisError          an instance or study cannot be analysed
    ├── DeliveryError          a destination did not take an object (retried)
    └── JobFailure             a stage's job failed; its type tells the queue what to do
        ├── TransientError     retry later with the stage's backoff
        ├── PermanentError     no retry: the job becomes a dead letter at once
        └── Defer              not a failure: run the job again at a later time
"""

from __future__ import annotations

__all__ = [
    "AnalysisError",
    "ConfigError",
    "Defer",
    "DeliveryError",
    "JobFailure",
    "OutOfResources",
    "PacsBridgeError",
    "PermanentError",
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


class JobFailure(PacsBridgeError):
    """A job of a pipeline stage did not complete; the subclass says whether to retry."""


class TransientError(JobFailure):
    """A failure worth retrying later (the destination is down, the disk is full, ...)."""


class PermanentError(JobFailure):
    """A failure that retrying cannot fix (the input is broken, the destination refuses it)."""


class Defer(JobFailure):
    """Run the job again after ``seconds``, without counting an attempt (e.g. a study not yet quiet)."""

    def __init__(self, seconds: float, reason: str = "") -> None:
        super().__init__(reason or f"deferred by {seconds:.1f} s")
        self.seconds = seconds


class DeliveryError(PacsBridgeError):
    """A destination did not accept an object."""
