"""Errors of the update format; every one derives from UpdateFormatError."""

from __future__ import annotations


class UpdateFormatError(Exception):
    """Base class of every error this package raises."""


class UnknownCodecError(UpdateFormatError, KeyError):
    """A codec or full-model encoding name that this build does not know."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "unknown codec"


class PatchError(UpdateFormatError):
    """A delta or encoded artifact could not be applied/decoded: corrupt, truncated,
    made for a different base, or its result does not match the expected hash."""


class JobDocumentError(UpdateFormatError, ValueError):
    """A job document or release manifest is malformed; the message names the field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class UnsupportedFormatError(JobDocumentError):
    """The document's `format` is newer than this device understands (report REJECTED)."""


class JobDocumentTooLargeError(UpdateFormatError):
    """Even with every delta dropped the job document exceeds the IoT Jobs size limit."""


class SignatureError(UpdateFormatError):
    """A release is unsigned, or its signature does not verify with a trusted key
    (the device reports REJECTED and keeps its model)."""
