"""Release signatures: what is signed, how it is carried, and how a device verifies it.

A release is signed over its **statement**: a short text naming this scheme and the
SHA-256 of the canonical JSON of everything the device acts on (model, version,
rollback and what it rolls back from, the model's hash and size, each artifact's
codec/size/hash, smoke rows, schema, uplink policy, format). Artifact locations are
left out on purpose: IoT Jobs rewrites each `url` placeholder into a presigned URL per
delivery, and the manifest names the same artifacts by S3 `key`, so the manifest and
every delivered job document share one statement and one signature. The artifacts
themselves are bound by their SHA-256, which the statement covers.

The statement, not the document, is what the key signs because AWS KMS signs at most
4,096 bytes of RAW message while a job document may be 32,768 characters; a digest in
a fixed-size text keeps the RAW mode (which both KMS and moto implement identically)
and gives devices one code path (`ECDSA` over SHA-256 of the statement).

Signatures are ECDSA P-256 with SHA-256 (`ECDSA_SHA_256`, a KMS `ECC_NIST_P256` key),
DER-encoded, base64 in the document:

    "signature": {"algorithm": "ECDSA_SHA_256", "key_id": "<KMS key ARN>", "value": "<base64 DER>"}

`key_id` is informative (which key signed, for audit and rotation); a device tries
every public key it trusts, so rotating keys needs no device-side key-id mapping.

The cloud side needs only `release_statement` (the KMS call lives in chalicelib); the
verifier imports `cryptography` when it is built, so the Lambda bundle does not need it.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from .errors import SignatureError
from .signature import ALGORITHM, SIGNATURE_FIELD_MAX_CHARS, Signature

if TYPE_CHECKING:
    from .document import UpdateJob

STATEMENT_PREFIX = b"mledge-release-statement-v1\n"


def signed_content(job: UpdateJob) -> dict[str, Any]:
    """Everything a device acts on, without artifact locations (see the module doc).

    `health` (a canary's request for a health report) is left out on purpose: the canary
    tick releases the very same signed document to the fleet with `health` removed, and
    a forged request can only make a device send a report, never install anything.
    """
    return {
        "format": job.format,
        "model": job.model,
        "version": job.version,
        "rollback": job.rollback,
        "rollback_from": job.rollback_from,
        "model_sha256": job.model_sha256,
        "model_size": job.model_size,
        "full": {"encoding": job.full.encoding, "size": job.full.size, "sha256": job.full.sha256},
        "deltas": [{"from_version": d.from_version, "from_sha256": d.from_sha256,
                    "codec": d.codec, "size": d.size, "sha256": d.sha256} for d in job.deltas],
        "smoke": {"input_name": job.smoke.input_name, "inputs": job.smoke.inputs,
                  "outputs": job.smoke.outputs, "tolerance": job.smoke.tolerance},
        "schema": job.schema,
        "uplink": job.uplink,
    }


def release_statement(job: UpdateJob) -> bytes:
    """The bytes a release key signs (ECDSA_SHA_256, KMS MessageType RAW)."""
    canonical = json.dumps(signed_content(job), sort_keys=True, separators=(",", ":"),
                           ensure_ascii=True, allow_nan=False).encode("ascii")
    return STATEMENT_PREFIX + hashlib.sha256(canonical).hexdigest().encode("ascii")


class ReleaseVerifier:
    """Verifies release signatures against a set of trusted ECDSA P-256 public keys."""

    def __init__(self, public_keys: Sequence[Any]) -> None:
        from cryptography.hazmat.primitives.asymmetric import ec

        if not public_keys:
            raise SignatureError("no trusted release key given")
        for key in public_keys:
            if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
                raise SignatureError("release keys must be EC P-256 public keys")
        self.public_keys = tuple(public_keys)

    @classmethod
    def from_pem(cls, pem: bytes) -> ReleaseVerifier:
        """Every `PUBLIC KEY` block in `pem` (a file may hold the old and the new key
        while a rotation is under way)."""
        from cryptography.hazmat.primitives import serialization

        blocks = _pem_blocks(pem)
        if not blocks:
            raise SignatureError("no PUBLIC KEY block in the release key file")
        keys = []
        for block in blocks:
            try:
                keys.append(serialization.load_pem_public_key(block))
            except ValueError as exc:
                raise SignatureError(f"unreadable release public key: {exc}") from None
        return cls(keys)

    @classmethod
    def from_der(cls, ders: Iterable[bytes]) -> ReleaseVerifier:
        """Keys as KMS `GetPublicKey` returns them (DER SubjectPublicKeyInfo)."""
        from cryptography.hazmat.primitives import serialization

        try:
            return cls([serialization.load_der_public_key(der) for der in ders])
        except ValueError as exc:
            raise SignatureError(f"unreadable release public key: {exc}") from None

    def verify(self, job: UpdateJob) -> None:
        """Return when one trusted key signed `job`'s statement; else SignatureError."""
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        if job.signature is None:
            raise SignatureError(f"{job.model} v{job.version} is not signed")
        statement = release_statement(job)
        for key in self.public_keys:
            try:
                key.verify(job.signature.value, statement, ec.ECDSA(hashes.SHA256()))
                return
            except InvalidSignature:
                continue
        raise SignatureError(
            f"{job.model} v{job.version}: signature (key {job.signature.key_id or '?'}) does not "
            f"verify with any of the {len(self.public_keys)} trusted release key(s)")


def public_key_pem(der: bytes) -> bytes:
    """PEM text of a DER public key (KMS `GetPublicKey` -> the file devices get)."""
    body = base64.encodebytes(der).decode("ascii").replace("\n", "")
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    return ("-----BEGIN PUBLIC KEY-----\n" + "\n".join(lines)
            + "\n-----END PUBLIC KEY-----\n").encode("ascii")


def _pem_blocks(pem: bytes) -> list[bytes]:
    begin, end = b"-----BEGIN PUBLIC KEY-----", b"-----END PUBLIC KEY-----"
    blocks, pos = [], 0
    while (start := pem.find(begin, pos)) != -1:
        stop = pem.find(end, start)
        if stop == -1:
            raise SignatureError("release key file has an unterminated PUBLIC KEY block")
        blocks.append(pem[start:stop + len(end)] + b"\n")
        pos = stop + len(end)
    return blocks


__all__: Sequence[str] = (
    "ALGORITHM",
    "SIGNATURE_FIELD_MAX_CHARS",
    "ReleaseVerifier",
    "Signature",
    "public_key_pem",
    "release_statement",
    "signed_content",
)
