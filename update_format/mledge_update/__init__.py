"""The MLEdgeDeploy update format, shared by the cloud (vendored into the Lambda bundle) and the device.

- `mledge_update.hashing`: SHA-256 of bytes and files.
- `mledge_update.codecs`: delta codecs by name (`bsdiff4` baseline) and full-model encodings.
- `mledge_update.document`: the IoT Jobs job document and the release manifest.
- `mledge_update.signing`: release signatures (ECDSA P-256 statement, device-side verifier).

The contracts cloud, device, trainer and local stack share are defined here once:
- `mledge_update.families`: the model families and their metrics;
- `mledge_update.onnx_metadata`: the ONNX metadata keys the trainer writes;
- `mledge_update.uplink`: `UplinkPolicy`, what a device sends upstream;
- `mledge_update.topics`: the telemetry and IoT Jobs MQTT topics;
- `mledge_update.naming`: training job names and tags, release IoT Job ids;
- `mledge_update.events`: EventBridge sources and detail types.

Pure Python plus bsdiff4 and zstandard: it runs in Lambda and on devices, and the
contract modules import neither (the trainer needs only them). `onnx-delta-2` also needs
numpy (the `delta2` extra); without it that codec is simply not registered.
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
