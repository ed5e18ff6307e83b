"""The MLEdgeDeploy update format, shared by the cloud (vendored into the Lambda bundle) and the device.

- `mledge_update.hashing`: SHA-256 of bytes and files.
- `mledge_update.codecs`: delta codecs by name (`bsdiff4` baseline) and full-model encodings.
- `mledge_update.document`: the IoT Jobs job document and the release manifest.
- `mledge_update.signing`: release signatures (ECDSA P-256 statement, device-side verifier).

Pure Python plus bsdiff4 and zstandard (no numpy): it runs in Lambda and on devices.
"""

from .errors import (
    JobDocumentError,
    JobDocumentTooLargeError,
    PatchError,
    SignatureError,
    UnknownCodecError,
    UnsupportedFormatError,
    UpdateFormatError,
)

__all__ = [
    "JobDocumentError",
    "JobDocumentTooLargeError",
    "PatchError",
    "SignatureError",
    "UnknownCodecError",
    "UnsupportedFormatError",
    "UpdateFormatError",
]
