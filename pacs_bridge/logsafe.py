"""Log hygiene: no patient identifier in a log line at INFO or above, whoever writes it.

pacs-bridge's own messages name studies and instances by UID only. Other
libraries are less careful: pydicom's warnings and exceptions quote raw
element values (``Invalid value for VR PN: b'Doe^John'``), and an exception
text or a traceback may carry them into an ``ERROR`` line. :func:`install`
puts a filter on every root handler that, for records at INFO and above,

- rewrites messages from pydicom (its logger, and its ``warnings`` routed to
  logging through :func:`logging.captureWarnings`) with every quoted value
  and byte string replaced by ``<redacted>``;
- redacts the same way the exception text and traceback of any record;

and at DEBUG leaves everything as it is (the documented place for patient
data, ``[log] level = "DEBUG"``). :func:`redact` is used by the receiving
code wherever an exception text goes into a log line or a DIMSE error
comment. The rules follow the confidentiality profile spirit of PS3.15
Annex E: identifying values are removed, structure is kept.
"""

from __future__ import annotations

import logging
import re
import warnings

__all__ = ["RedactingFilter", "install", "redact"]

# Quoted strings and bytes literals as Python's repr writes them, including escaped quotes inside.
_QUOTED = re.compile(r"(?<!\w)b?'(?:[^'\\\n]|\\.)*'|(?<!\w)b?\"(?:[^\"\\\n]|\\.)*\"")

_PYDICOM = ("pydicom", "py.warnings")


def redact(text: str) -> str:
    """``text`` with quoted values and byte strings (as ``repr`` and pydicom write them) replaced by ``<redacted>``."""
    return _QUOTED.sub("'<redacted>'", text)


def _redact_traceback(text: str) -> str:
    # Frame lines ("  File ...", source lines) are code, not data; the exception lines are redacted.
    return "\n".join(line if line.startswith((" ", "\t")) else redact(line) for line in text.split("\n"))


def _from_pydicom(record: logging.LogRecord) -> bool:
    if record.name.startswith("pydicom"):
        return True
    if record.name == "py.warnings":
        return "pydicom" in record.getMessage()
    return False


class RedactingFilter(logging.Filter):
    """Redacts patient data from records at ``min_level`` and above (see the module docstring)."""

    def __init__(self, min_level: int = logging.INFO) -> None:
        super().__init__()
        self.min_level = min_level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.min_level:
            return True
        if record.name.startswith(_PYDICOM) and _from_pydicom(record):
            record.msg = redact(record.getMessage())
            record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = _redact_traceback(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = _redact_traceback(record.exc_text)
        return True


def install(level: str) -> None:
    """Route ``warnings`` to logging and put the redacting filter on every root handler.

    At ``DEBUG`` nothing is redacted. Called once by the command line after it
    configures its handlers.
    """
    logging.captureWarnings(True)
    # Each pydicom warning once per place, not once per instance: a malformed sender would flood the log.
    warnings.filterwarnings("default", module=r"pydicom(\..*)?")
    min_level = logging.INFO if level.upper() != "DEBUG" else logging.CRITICAL + 1
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter(min_level))
