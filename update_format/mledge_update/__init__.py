"""The MLEdgeDeploy update format, shared by the cloud (vendored into the Lambda bundle) and the device.

- `mledge_update.hashing`: SHA-256 of bytes and files.
- `mledge_update.codecs`: delta codecs by name (`bsdiff4` baseline) and full-model encodings.
- `mledge_update.document`: the IoT Jobs job document and the release manifest.

Python plus bsdiff4, zstandard and numpy (`onnx-delta-2` only; without numpy that codec is
simply not offered): it runs in Lambda and on devices.
"""

from .errors import (
    JobDocumentError,
    JobDocumentTooLargeError,
    PatchError,
    UnknownCodecError,
    UnsupportedFormatError,
    UpdateFormatError,
)

__all__ = [
    "JobDocumentError",
    "JobDocumentTooLargeError",
    "PatchError",
    "UnknownCodecError",
    "UnsupportedFormatError",
    "UpdateFormatError",
]
