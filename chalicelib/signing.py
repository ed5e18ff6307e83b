"""Release signing with an AWS KMS asymmetric key (ECC_NIST_P256, ECDSA_SHA_256).

The packaging function signs each release's statement (`mledge_update.signing`) with
the stage's key (`MLEDGE_SIGNING_KEY_ID`, an alias or key ARN that infra creates);
the private key never leaves KMS. Devices verify with the public key they were
provisioned with (`mledge provision-device` writes it beside the certificate).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from botocore.exceptions import ClientError
from mledge_update.document import UpdateJob
from mledge_update.signing import ALGORITHM, Signature, public_key_pem, release_statement

from chalicelib.aws import error_code


class SigningError(Exception):
    """The release could not be signed (no key configured, KMS refused)."""


@dataclass(frozen=True)
class KmsReleaseSigner:
    kms: Any
    key_id: str

    def sign(self, job: UpdateJob) -> UpdateJob:
        """`job` with its signature (the KMS key ARN as `key_id`)."""
        if not self.key_id:
            raise SigningError("MLEDGE_SIGNING_KEY_ID is not set: releases must be signed "
                               "(infra/pipeline.yaml creates the key and its alias)")
        try:
            response = self.kms.sign(KeyId=self.key_id, Message=release_statement(job),
                                     MessageType="RAW", SigningAlgorithm=ALGORITHM)
        except ClientError as exc:
            raise SigningError(f"KMS Sign with {self.key_id} failed: "
                               f"{error_code(exc) or exc}") from None
        signature = Signature(key_id=str(response.get("KeyId", self.key_id)),
                              value=bytes(response["Signature"]))
        return replace(job, signature=signature)


def release_public_key_pem(kms: Any, key_id: str) -> bytes:
    """The PEM public key of the stage's signing key (what devices are given)."""
    try:
        der = kms.get_public_key(KeyId=key_id)["PublicKey"]
    except ClientError as exc:
        raise SigningError(f"KMS GetPublicKey for {key_id} failed: "
                           f"{error_code(exc) or exc}") from None
    return public_key_pem(bytes(der))


def create_signing_key(kms: Any, alias: str, *, description: str = "") -> str:
    """An ECC_NIST_P256 SIGN_VERIFY key behind `alias` (the local stack and tests; in
    AWS infra/pipeline.yaml creates it). Returns the key ARN."""
    metadata = kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY",
                              Description=description or f"MLEdgeDeploy release signing ({alias})")
    arn = str(metadata["KeyMetadata"]["Arn"])
    kms.create_alias(AliasName=alias, TargetKeyId=arn)
    return arn
