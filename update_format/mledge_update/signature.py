"""A release signature as a job document carries it (`signature`): parsed and written here,
checked by `mledge_update.signing` (kept apart so that `document` can parse it without
importing the verifier).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import JobDocumentError

ALGORITHM = "ECDSA_SHA_256"
# A P-256 DER signature is at most 72 bytes (96 base64 characters); refuse anything
# much larger before decoding it.
MAX_SIGNATURE_CHARS = 256
MAX_KEY_ID_CHARS = 256  # a KMS key ARN is about 80
# What the "signature" object adds to a job document at most, so packaging can keep
# room for it when it fits the document into the IoT Jobs limit before signing.
SIGNATURE_FIELD_MAX_CHARS = 64 + MAX_SIGNATURE_CHARS + MAX_KEY_ID_CHARS


@dataclass(frozen=True)
class Signature:
    """A release signature as carried in the job document and the manifest."""

    key_id: str
    value: bytes  # DER-encoded ECDSA signature
    algorithm: str = ALGORITHM

    def to_document(self) -> dict[str, str]:
        return {"algorithm": self.algorithm, "key_id": self.key_id,
                "value": base64.b64encode(self.value).decode("ascii")}

    @classmethod
    def from_document(cls, value: Any) -> Signature:
        if not isinstance(value, Mapping):
            raise JobDocumentError("signature", f"expected an object, got {type(value).__name__}")
        algorithm = value.get("algorithm")
        if algorithm != ALGORITHM:
            raise JobDocumentError("signature.algorithm",
                                   f"expected {ALGORITHM!r}, got {algorithm!r:.80}")
        key_id = value.get("key_id", "")
        if not isinstance(key_id, str) or len(key_id) > MAX_KEY_ID_CHARS:
            raise JobDocumentError("signature.key_id", "expected a string of at most "
                                   f"{MAX_KEY_ID_CHARS} characters")
        encoded = value.get("value")
        if not isinstance(encoded, str) or not encoded or len(encoded) > MAX_SIGNATURE_CHARS:
            raise JobDocumentError("signature.value", "expected base64 text of at most "
                                   f"{MAX_SIGNATURE_CHARS} characters")
        try:
            raw = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise JobDocumentError("signature.value", f"not base64: {exc}") from None
        return cls(key_id=key_id, value=raw, algorithm=algorithm)
