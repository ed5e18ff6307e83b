"""Release signatures: the statement covers every field a device acts on, parsing refuses
malformed signatures, verification takes any trusted key and only those."""

from __future__ import annotations

import base64
import copy
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from mledge_update.document import build_manifest, parse_job_document, parse_manifest
from mledge_update.errors import JobDocumentError, SignatureError
from mledge_update.signing import ReleaseVerifier, release_statement

from tests.edge.support import new_release_key, release_keys_pem, sign_job
from tests.update_format.test_document import _job

UNSIGNED_LOCATIONS = {"url", "key", "signature"}


def _leaves(value: Any, path: tuple = ()) -> Iterator[tuple]:
    if isinstance(value, dict):
        for k, v in value.items():
            if k not in UNSIGNED_LOCATIONS:
                yield from _leaves(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _leaves(v, (*path, i))
    else:
        yield path


def _changed(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, str):
        return value[:-1] + ("0" if value[-1:] != "0" else "1") if value else "x"
    return "changed"


def _set(doc: dict, path: tuple, value: Any) -> None:
    for step in path[:-1]:
        doc = doc[step]
    doc[path[-1]] = value


def test_every_signed_field_is_covered_by_the_signature() -> None:
    """Each leaf of the document (but the per-delivery locations) changed alone breaks it."""
    key = new_release_key()
    verifier = ReleaseVerifier([key.public_key()])
    document = sign_job(_job(rollback=True, rollback_from=4), key).to_document()
    verifier.verify(parse_job_document(document))
    paths = list(_leaves(document))
    assert len(paths) > 40 and ("smoke", "inputs", 1, 7) in paths and ("rollback_from",) in paths
    for path in paths:
        tampered = copy.deepcopy(document)
        value = tampered
        for step in path:
            value = value[step]
        _set(tampered, path, _changed(value))
        try:
            job = parse_job_document(tampered)
        except JobDocumentError:
            continue  # refused by the parser already (e.g. an out-of-range value)
        with pytest.raises(SignatureError):
            verifier.verify(job)


def test_manifest_and_job_document_share_one_statement() -> None:
    job = sign_job(_job())
    manifest = build_manifest(job, created_at="2025-01-02T03:04:05Z", metrics={"m": 1})
    assert release_statement(parse_manifest(manifest)) == release_statement(job)
    ReleaseVerifier.from_pem(release_keys_pem()).verify(parse_manifest(manifest))


@pytest.mark.parametrize(("signature", "field"), [
    ("not an object", "signature"),
    ({"algorithm": "RSASSA_PSS_SHA_256", "key_id": "k", "value": "AAAA"}, "signature.algorithm"),
    ({"algorithm": "ECDSA_SHA_256", "key_id": "k", "value": "***"}, "signature.value"),
    ({"algorithm": "ECDSA_SHA_256", "key_id": "k", "value": ""}, "signature.value"),
    ({"algorithm": "ECDSA_SHA_256", "key_id": "k", "value": "A" * 10_000}, "signature.value"),
    ({"algorithm": "ECDSA_SHA_256", "key_id": 7, "value": "AAAA"}, "signature.key_id"),
    ({"algorithm": "ECDSA_SHA_256", "key_id": "k" * 5000, "value": "AAAA"}, "signature.key_id"),
])
def test_malformed_signature_field_is_a_named_parse_error(signature, field) -> None:
    document = _job().to_document()
    document["signature"] = signature
    with pytest.raises(JobDocumentError) as info:
        parse_job_document(document)
    assert info.value.field == field


@pytest.mark.parametrize("value", [b"", b"\x30\x00", b"\x00" * 72, b"\x30\x06\x02\x01\x01\x02\x01\x01"])
def test_garbage_signature_bytes_are_refused_not_crashing(value) -> None:
    job = sign_job(_job())
    document = job.to_document()
    document["signature"]["value"] = base64.b64encode(value).decode() or "AA=="
    with pytest.raises(SignatureError):
        ReleaseVerifier.from_pem(release_keys_pem()).verify(parse_job_document(document))


def test_key_files_hold_one_or_more_p256_keys_and_nothing_else() -> None:
    a, b = new_release_key(), new_release_key()
    assert len(ReleaseVerifier.from_pem(release_keys_pem(a, b)).public_keys) == 2
    with pytest.raises(SignatureError, match="no PUBLIC KEY"):
        ReleaseVerifier.from_pem(b"")
    with pytest.raises(SignatureError, match="unterminated"):
        ReleaseVerifier.from_pem(b"-----BEGIN PUBLIC KEY-----\nAAAA")
    with pytest.raises(SignatureError, match="unreadable"):
        ReleaseVerifier.from_pem(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    for other in (p384, rsa_key):
        pem = other.public_bytes(serialization.Encoding.PEM,
                                 serialization.PublicFormat.SubjectPublicKeyInfo)
        with pytest.raises(SignatureError, match="P-256"):
            ReleaseVerifier.from_pem(pem)
