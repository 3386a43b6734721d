"""Signed adapters: OpenSSF model signing (``model-signing`` 1.1) with elliptic-curve keys, fully offline.

**What is signed.** Exactly the two files a replica uses, ``adapter_config.json`` and
``adapter_model.safetensors``, each recorded by its sha256 (model-signing's per-file
manifest). Other files in an adapter folder (a README, training logs) are not covered; they
are never fetched or served either. The signature is a Sigstore bundle (JSON) in
``model.sig`` (:data:`SIGNATURE_NAME`) beside the two files, in the same folder or S3
prefix; ``hotswap push DIR URI --sign-key KEY.pem`` signs and uploads it, and the stores
fetch it into :attr:`FetchedAdapter.signature <hotswap.store.FetchedAdapter.signature>`.

**Who is trusted.** ``trusted_public_keys`` in the settings: PEM public keys (P-256, P-384
or P-521), local paths or ``s3://bucket/key``. A key's id is the sha256 of its PEM
SubjectPublicKeyInfo encoding, the same "hint" model-signing writes into every bundle, so
the signer's key is looked up by id instead of trying each key.

**How a fetched adapter is verified.** model-signing verifies a directory; a fetched adapter
is a blob in the content-addressed cache plus config bytes in memory. :func:`verify_adapter`
lays them out in a temporary folder: a symlink to the cached blob (model-signing follows
symlinks when told to, so a 2 GiB file is never copied) and the config bytes written out.
The weights are hashed again from the cache, one sequential read: what is checked is the
file that will be loaded. model-signing 1.1.1 guesses the hashing settings from a signature
but then hashes with symlinks refused whatever it guessed, so both sides here set them
explicitly (sha256 per file, symlinks followed); manifests compare by file digests only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from hotswap.errors import AdapterValidationError, ConfigError
from hotswap.store import CONFIG_NAME, SIGNATURE_NAME, WEIGHTS_NAME, FetchedAdapter, make_s3_client

if TYPE_CHECKING:
    from hotswap.settings import HotswapSettings

__all__ = [
    "COVERED_FILES",
    "SIGNATURE_NAME",
    "SignatureCheck",
    "TrustedKey",
    "check_pin",
    "check_signature",
    "claimed_key_id",
    "load_trusted_keys",
    "public_key_id",
    "sign_adapter_dir",
    "signed_digests",
    "verify_adapter",
]

logger = logging.getLogger(__name__)

COVERED_FILES: tuple[str, ...] = (CONFIG_NAME, WEIGHTS_NAME)
_SUPPORTED_CURVES = ("secp256r1", "secp384r1", "secp521r1")
_MAX_KEY_BYTES = 64 << 10
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_RESIGN = "sign and push it again with 'hotswap push DIR URI --sign-key KEY.pem'"


@dataclass(frozen=True)
class TrustedKey:
    """A public key whose signatures are accepted. ``source`` is where it was read from (path or s3:// URI)."""

    key_id: str
    source: str
    pem: bytes


@dataclass(frozen=True)
class SignatureCheck:
    """A verified signature: the signer's key id (sha256 of its PEM public key) and where that key came from."""

    key_id: str
    key_source: str


def check_pin(sha256: str, *, what: str = "sha256") -> str:
    """Return ``sha256`` if it is a pin (64 lowercase hex digits); else raise :class:`ConfigError` saying so.

    A pin is the sha256 of ``adapter_model.safetensors``, as ``hotswap validate URI`` prints it;
    ``what`` names the argument in the message (``--sha256``, the JSON field ``sha256``).
    """
    if isinstance(sha256, str) and _SHA256_HEX.fullmatch(sha256):
        return sha256
    hint = "; write it in lowercase" if isinstance(sha256, str) and _SHA256_HEX.fullmatch(sha256.lower()) else ""
    shown = f"{sha256!r} ({len(sha256)} characters)" if isinstance(sha256, str) else repr(sha256)
    raise ConfigError(
        f"{what} must be the 64 lowercase hex digits of adapter_model.safetensors' sha256 (as 'hotswap validate URI' "
        f"prints it), got {shown}{hint}"
    )


def _hashing_config():
    from model_signing import hashing

    return hashing.Config().use_file_serialization(hashing_algorithm="sha256").set_allow_symlinks(True)


def _load_public_key(pem: bytes, source: str):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as e:
        raise ConfigError(
            f"trusted public key {source} is not a PEM public key ({e}); export it with "
            "'openssl ec -in KEY.pem -pubout -out KEY.pub.pem'"
        ) from e
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in _SUPPORTED_CURVES:
        kind = key.curve.name if isinstance(key, ec.EllipticCurvePublicKey) else type(key).__name__
        raise ConfigError(
            f"trusted public key {source} is {kind}; model signing takes elliptic-curve keys on "
            f"{', '.join(_SUPPORTED_CURVES)} (e.g. 'openssl ecparam -name prime256v1 -genkey -noout -out KEY.pem')"
        )
    return key


def _key_id(key) -> str:
    from cryptography.hazmat.primitives import serialization

    spki = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def public_key_id(pem: bytes, *, source: str = "<pem>") -> str:
    """The id of a PEM EC public key: sha256 hex of its PEM SubjectPublicKeyInfo (model-signing's key hint)."""
    return _key_id(_load_public_key(pem, source))


def claimed_key_id(signature: bytes) -> str | None:
    """The key id a ``model.sig`` bundle claims (NOT verified); None if it names none or is unreadable."""
    try:
        bundle = json.loads(signature)
        hint = bundle["verificationMaterial"]["publicKey"]["hint"]
    except (ValueError, KeyError, TypeError):
        return None
    return hint if isinstance(hint, str) and hint else None


def sign_adapter_dir(local_dir: Path, private_key: Path, *, password: bytes | None = None) -> bytes:
    """Sign the adapter folder ``local_dir`` with an EC private key; write ``local_dir/model.sig``, return its bytes.

    Covers exactly :data:`COVERED_FILES`; other files in the folder are neither signed nor pushed.
    Raises :class:`ConfigError` when the folder is not an adapter or the key cannot be used.
    """
    from model_signing import signing

    local_dir, private_key = Path(local_dir), Path(private_key)
    missing = [n for n in COVERED_FILES if not (local_dir / n).is_file()]
    if missing:
        raise ConfigError(
            f"{local_dir} is not an adapter folder: missing {', '.join(missing)}; save the adapter with "
            "save_pretrained(..., safe_serialization=True)"
        )
    try:
        config = signing.Config().use_elliptic_key_signer(private_key=private_key, password=password)
    except OSError as e:
        raise ConfigError(f"cannot read signing key {private_key}: {e.strerror}") from e
    except (ValueError, TypeError) as e:
        raise ConfigError(
            f"signing key {private_key} is not a usable PEM elliptic-curve private key ({e}); create one with "
            "'openssl ecparam -name prime256v1 -genkey -noout -out KEY.pem'"
        ) from e
    config.set_hashing_config(_hashing_config())
    with tempfile.TemporaryDirectory(prefix="hotswap-sign-") as tmp:
        # sign a folder of links to exactly the covered files, so nothing else in local_dir is covered
        model = Path(tmp) / "adapter"
        model.mkdir()
        for name in COVERED_FILES:
            (model / name).symlink_to((local_dir / name).resolve())
        out = Path(tmp) / SIGNATURE_NAME
        config.sign(model, out)
        signature = out.read_bytes()
    target = local_dir / SIGNATURE_NAME
    partial = target.with_name(f".{SIGNATURE_NAME}.partial")
    partial.write_bytes(signature)
    os.replace(partial, target)
    logger.info("signed %s with key %s", local_dir, claimed_key_id(signature))
    return signature


def load_trusted_keys(settings: HotswapSettings, *, s3_client: Any = None) -> tuple[TrustedKey, ...]:
    """Read and parse every key of ``settings.trusted_public_keys``; raise :class:`ConfigError` naming a bad one.

    ``s3_client`` serves ``s3://`` sources; by default one is made from the S3 settings.
    """
    keys: dict[str, TrustedKey] = {}
    for source in settings.trusted_public_keys:
        if urlparse(source).scheme == "s3":
            if s3_client is None:
                s3_client = make_s3_client(
                    connect_timeout_s=settings.s3_connect_timeout_s,
                    read_timeout_s=settings.s3_read_timeout_s,
                    endpoint_url=settings.s3_endpoint_url,
                )
            pem = _read_s3_key(s3_client, source)
        else:
            pem = _read_local_key(Path(source).expanduser(), source)
        key_id = public_key_id(pem, source=source)
        keys.setdefault(key_id, TrustedKey(key_id, source, pem))
    return tuple(keys.values())


def _read_local_key(path: Path, source: str) -> bytes:
    try:
        if path.stat().st_size > _MAX_KEY_BYTES:
            raise ConfigError(f"trusted public key {source} is over {_MAX_KEY_BYTES} bytes; give a PEM public key")
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(
            f"cannot read trusted public key {source}: {e.strerror}; fix the path in trusted_public_keys"
        ) from e


def _read_s3_key(client: Any, source: str) -> bytes:
    from botocore.exceptions import BotoCoreError, ClientError

    parsed = urlparse(source)
    bucket, key = parsed.netloc, parsed.path.lstrip("/")
    if not bucket or not key:
        raise ConfigError(f"bad trusted public key URI {source!r}; expected s3://bucket/key.pem")
    try:
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
        try:
            return body.read(_MAX_KEY_BYTES)
        finally:
            body.close()
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        raise ConfigError(
            f"cannot read trusted public key {source} ({code}); check the URI in trusted_public_keys and the AWS "
            "credentials"
        ) from e
    except BotoCoreError as e:
        raise ConfigError(f"cannot read trusted public key {source} ({e}); check that S3 is reachable") from e


def verify_adapter(fetched: FetchedAdapter, signature: bytes, trusted: Sequence[TrustedKey]) -> SignatureCheck:
    """Verify ``signature`` (the bytes of ``model.sig``) over the fetched weights and config.

    Returns the :class:`SignatureCheck` of the trusted key that signed it. Raises
    :class:`AdapterValidationError` naming the adapter when the signature is unreadable,
    was made by a key not in ``trusted``, does not verify with that key (altered or forged),
    or when a covered file changed after signing (tampered weights or config).
    """
    from model_signing import verifying

    uri = fetched.uri
    claimed = claimed_key_id(signature)
    if claimed is None:
        raise AdapterValidationError(uri, [
            f"{SIGNATURE_NAME} is not a model-signing bundle that names its key (no verificationMaterial.publicKey."
            f"hint); {_RESIGN}"
        ])
    key = next((k for k in trusted if k.key_id == claimed), None)
    if key is None:
        known = ", ".join(f"{k.key_id[:16]} ({k.source})" for k in trusted) or "none"
        raise AdapterValidationError(uri, [
            f"{SIGNATURE_NAME} was signed by key {claimed}, which is not trusted (trusted_public_keys: {known}); "
            "add that signer's public key to trusted_public_keys, or sign with a trusted key and push again"
        ])
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hotswap-verify-") as tmp:
        model = Path(tmp) / "adapter"
        model.mkdir()
        (model / WEIGHTS_NAME).symlink_to(Path(fetched.weights_path).resolve())
        (model / CONFIG_NAME).write_bytes(fetched.config_bytes)
        (Path(tmp) / "key.pem").write_bytes(key.pem)
        (Path(tmp) / SIGNATURE_NAME).write_bytes(signature)
        config = verifying.Config().use_elliptic_key_verifier(public_key=Path(tmp) / "key.pem")
        config.set_hashing_config(_hashing_config())
        try:
            config.verify(model, Path(tmp) / SIGNATURE_NAME)
        except Exception as e:  # model-signing raises ValueError, InvalidSignature, parse errors: all reject
            raise AdapterValidationError(uri, [_describe_failure(e, key, fetched, signature)]) from e
    logger.info("adapter %s: signature by key %s verified in %.0f ms", uri, key.key_id[:16],
                (time.perf_counter() - started) * 1e3)
    return SignatureCheck(key.key_id, key.source)


def _describe_failure(error: Exception, key: TrustedKey, fetched: FetchedAdapter, signature: bytes) -> str:
    from cryptography.exceptions import InvalidSignature

    if isinstance(error, InvalidSignature):
        return (f"{SIGNATURE_NAME} names trusted key {key.key_id[:16]} ({key.source}) but its signature does not "
                f"verify with that key: the signature file was altered or forged; {_RESIGN}")
    text = str(error)
    if not text.startswith("Signature mismatch"):
        return (f"{SIGNATURE_NAME} does not verify with trusted key {key.key_id[:16]}: {type(error).__name__}: "
                f"{text}; {_RESIGN}")
    # the signature itself verified, so the digests it carries are the signer's
    signed = signed_digests(signature)
    fetched_digests = {CONFIG_NAME: hashlib.sha256(fetched.config_bytes).hexdigest(), WEIGHTS_NAME: fetched.sha256}
    changed = [f"{n} (signed sha256 {signed[n][:16]}..., fetched {fetched_digests[n][:16]}...)"
               for n in COVERED_FILES if n in signed and signed[n] != fetched_digests[n]]
    others = sorted(set(signed) ^ set(COVERED_FILES))
    if others:
        return (f"{SIGNATURE_NAME} by key {key.key_id[:16]} covers {', '.join(sorted(signed)) or 'no files'}, but an "
                f"adapter is exactly {' and '.join(COVERED_FILES)}; sign the adapter folder with "
                "'hotswap push DIR URI --sign-key KEY.pem'")
    what = " and ".join(changed) if changed else f"the cached files ({text})"
    return (f"tampered: {what} changed after signing by key {key.key_id[:16]}; restore the signed files, or if "
            f"the change is intended {_RESIGN}")


def signed_digests(signature: bytes) -> dict[str, str]:
    """File name -> sha256 hex as recorded in a ``model.sig`` bundle, NOT verified; empty when unreadable."""
    import base64

    try:
        bundle = json.loads(signature)
        statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
        resources = statement["predicate"]["resources"]
        return {str(r["name"]): str(r["digest"]) for r in resources if r.get("algorithm") == "sha256"}
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}


def check_signature(
    fetched: FetchedAdapter,
    signature: bytes | None,
    settings: HotswapSettings,
    *,
    trusted_keys: Sequence[TrustedKey] | None = None,
    s3_client: Any = None,
) -> SignatureCheck | None:
    """The signature policy of ``settings`` applied to a fetched adapter; call after fetch, before validation.

    ``signature`` is the bytes of ``model.sig`` beside the adapter, or None: pass ``fetched.signature``,
    which both stores fill when the file exists.

    - No ``trusted_public_keys``: signatures are not checked; returns None.
    - Unsigned: raises :class:`AdapterValidationError` when ``signature_required``; else returns None.
    - Signed: verified against the trusted keys (even when not required: a bad signature is never
      ignored); returns the signer's :class:`SignatureCheck` or raises
      :class:`AdapterValidationError` (untrusted key, altered signature, tampered weights or config).

    Args:
        fetched: what :meth:`hotswap.store.AdapterFetcher.fetch` returned.
        signature: ``fetched.signature``.
        settings: ``signature_required`` and ``trusted_public_keys`` (and the S3 settings for s3:// keys).
        trusted_keys: keys already loaded with :func:`load_trusted_keys` (reuse them across rolls);
            by default they are read from ``settings`` on each call.
        s3_client: for ``s3://`` keys when they are read here.

    Raises:
        AdapterValidationError: the adapter fails the policy; ``problems`` has one sentence naming the fix.
        ConfigError: a trusted key cannot be read or is not an EC public key.
    """
    if signature is None:
        if settings.signature_required:
            raise AdapterValidationError(fetched.uri, [
                f"unsigned: there is no {SIGNATURE_NAME} beside {WEIGHTS_NAME} and signature_required is true; "
                "sign and push it with 'hotswap push DIR URI --sign-key KEY.pem' (a key whose public half is in "
                "trusted_public_keys)"
            ])
        return None
    if not settings.trusted_public_keys and not trusted_keys:
        logger.info("adapter %s has a %s but no trusted_public_keys are set; not verified", fetched.uri,
                    SIGNATURE_NAME)
        return None
    keys = trusted_keys if trusted_keys is not None else load_trusted_keys(settings, s3_client=s3_client)
    return verify_adapter(fetched, signature, keys)
