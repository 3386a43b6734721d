"""Signed and pinned adapters: OpenSSF model signing with real EC keys made here, the local store and a real S3
server on 127.0.0.1 (moto), the settings cross-check, and the CLI (``push --sign-key``, ``validate``,
``roll --sha256``) run as a user runs it."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from hotswap.errors import AdapterValidationError, ConfigError
from hotswap.settings import HotswapSettings
from hotswap.signing import (
    SIGNATURE_NAME,
    SignatureCheck,
    check_pin,
    check_signature,
    claimed_key_id,
    load_trusted_keys,
    public_key_id,
    sign_adapter_dir,
    signed_digests,
)
from hotswap.store import AdapterFetcher, LocalStore, S3Store
from tests.unit import test_cli
from tests.unit.test_cli import _run


class Key:
    """An EC private key written as PEM (``private``) with its public half (``public``)."""

    def __init__(self, folder: Path, name: str, curve=ec.SECP256R1, password: bytes | None = None) -> None:
        self.key = ec.generate_private_key(curve())
        encryption = (serialization.BestAvailableEncryption(password) if password
                      else serialization.NoEncryption())
        self.private = folder / f"{name}.pem"
        self.private.write_bytes(self.key.private_bytes(serialization.Encoding.PEM,
                                                        serialization.PrivateFormat.PKCS8, encryption))
        self.public_pem = self.key.public_key().public_bytes(serialization.Encoding.PEM,
                                                             serialization.PublicFormat.SubjectPublicKeyInfo)
        self.public = folder / f"{name}.pub.pem"
        self.public.write_bytes(self.public_pem)

    @property
    def key_id(self) -> str:
        return hashlib.sha256(self.public_pem).hexdigest()


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    return {"alice": Key(folder, "alice"), "mallory": Key(folder, "mallory"),
            "p384": Key(folder, "p384", ec.SECP384R1)}


@pytest.fixture
def adapter_copy(make_adapter, store_root, request):
    """A fresh copy of a real adapter folder under the store root, for this test alone; yields (folder, uri)."""
    good = make_adapter("signing-good", r=4, seed=51)
    uri = f"signing/{request.node.name}"
    folder = store_root / uri
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(good, folder)
    return folder, uri


@pytest.fixture
def fetcher(base_settings, tmp_path):
    """A fetcher with its own blob cache, so tampering with a cached blob touches no other test."""
    local = LocalStore(base_settings.store_root, max_adapter_bytes=1 << 30)
    return AdapterFetcher(cache_dir=tmp_path / "cache", local=local, s3=None)


def _settings(base_settings, *keys: Key, required: bool = False) -> HotswapSettings:
    return base_settings.model_copy(update={"trusted_public_keys": tuple(str(k.public) for k in keys),
                                            "signature_required": required})


def _check(fetcher, uri, settings):
    fetched = fetcher.fetch(uri)
    return check_signature(fetched, fetched.signature, settings)


def test_sign_then_verify_names_the_signer(adapter_copy, fetcher, keys, base_settings):
    folder, uri = adapter_copy
    signature = sign_adapter_dir(folder, keys["alice"].private)
    assert (folder / SIGNATURE_NAME).read_bytes() == signature
    # the key id is model-signing's hint: sha256 of the PEM public key
    assert claimed_key_id(signature) == keys["alice"].key_id == public_key_id(keys["alice"].public_pem)
    covered = signed_digests(signature)
    assert covered == {
        "adapter_config.json": hashlib.sha256((folder / "adapter_config.json").read_bytes()).hexdigest(),
        "adapter_model.safetensors": hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest(),
    }
    check = _check(fetcher, uri, _settings(base_settings, keys["alice"], required=True))
    assert check == SignatureCheck(key_id=keys["alice"].key_id, key_source=str(keys["alice"].public))
    assert check.key_id != keys["mallory"].key_id  # control: ids tell keys apart


def test_the_cached_weights_are_linked_not_copied_and_other_files_are_not_covered(
        adapter_copy, fetcher, keys, base_settings):
    folder, uri = adapter_copy
    (folder / "README.md").write_text("not served, not signed")
    sign_adapter_dir(folder, keys["alice"].private)
    (folder / "README.md").write_text("changed after signing: still fine, it is never fetched")
    assert _check(fetcher, uri, _settings(base_settings, keys["alice"])).key_id == keys["alice"].key_id


@pytest.mark.parametrize(
    ("tamper", "named", "not_named"),
    [
        ("weights", "adapter_model.safetensors", "adapter_config.json"),
        ("config", "adapter_config.json", "adapter_model.safetensors"),
    ],
)
def test_a_covered_file_changed_after_signing_is_refused(adapter_copy, fetcher, keys, base_settings, tamper,
                                                         named, not_named):
    folder, uri = adapter_copy
    sign_adapter_dir(folder, keys["alice"].private)
    settings = _settings(base_settings, keys["alice"])
    assert _check(fetcher, uri, settings) is not None  # control: verifies before the change
    if tamper == "weights":
        raw = bytearray((folder / named).read_bytes())
        raw[-1] ^= 0x01  # one bit of one tensor value: still a valid safetensors file
        (folder / named).write_bytes(bytes(raw))
    else:
        config = json.loads((folder / named).read_text())
        config["lora_alpha"] = config["lora_alpha"] * 2
        (folder / named).write_text(json.dumps(config))
    with pytest.raises(AdapterValidationError) as caught:
        _check(fetcher, uri, settings)
    (problem,) = caught.value.problems
    assert uri in str(caught.value)
    assert problem.startswith("tampered: ") and named in problem and not_named not in problem
    assert "hotswap push DIR URI --sign-key" in problem


def test_the_cached_blob_itself_is_what_is_checked(adapter_copy, fetcher, keys, base_settings):
    """The fetch hashed the weights once; a blob changed in the cache after that is still caught."""
    folder, uri = adapter_copy
    sign_adapter_dir(folder, keys["alice"].private)
    fetched = fetcher.fetch(uri)
    blob = fetched.weights_path
    blob.chmod(0o644)
    raw = bytearray(blob.read_bytes())
    raw[-1] ^= 0x01
    blob.write_bytes(bytes(raw))
    with pytest.raises(AdapterValidationError, match="tampered: the cached files"):
        check_signature(fetched, fetched.signature, _settings(base_settings, keys["alice"]))


def test_a_signature_by_an_untrusted_key_is_refused(adapter_copy, fetcher, keys, base_settings):
    folder, uri = adapter_copy
    sign_adapter_dir(folder, keys["mallory"].private)
    with pytest.raises(AdapterValidationError) as caught:
        _check(fetcher, uri, _settings(base_settings, keys["alice"]))
    (problem,) = caught.value.problems
    assert keys["mallory"].key_id in problem and "not trusted" in problem and str(keys["alice"].public) in problem
    # control: trust both, and the signer is found by its id among them
    check = _check(fetcher, uri, _settings(base_settings, keys["alice"], keys["mallory"], keys["p384"]))
    assert check.key_source == str(keys["mallory"].public)


def test_a_p384_key_signs_and_verifies(adapter_copy, fetcher, keys, base_settings):
    folder, uri = adapter_copy
    sign_adapter_dir(folder, keys["p384"].private)
    assert _check(fetcher, uri, _settings(base_settings, keys["p384"])).key_id == keys["p384"].key_id


def test_an_altered_signature_is_refused(adapter_copy, fetcher, keys, base_settings):
    folder, uri = adapter_copy
    bundle = json.loads(sign_adapter_dir(folder, keys["alice"].private))
    envelope = bundle["dsseEnvelope"]
    # claim other digests inside the signed statement: the ECDSA signature no longer matches it
    statement = json.loads(base64.b64decode(envelope["payload"]))
    statement["predicate"]["resources"][0]["digest"] = "0" * 64
    envelope["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    (folder / SIGNATURE_NAME).write_text(json.dumps(bundle))
    with pytest.raises(AdapterValidationError, match="altered or forged"):
        _check(fetcher, uri, _settings(base_settings, keys["alice"]))


@pytest.mark.parametrize("content", [b"not json", b"{}", json.dumps({"verificationMaterial": {}}).encode()])
def test_a_file_that_is_not_a_bundle_is_refused(adapter_copy, fetcher, keys, base_settings, content):
    folder, uri = adapter_copy
    (folder / SIGNATURE_NAME).write_bytes(content)
    with pytest.raises(AdapterValidationError, match="is not a model-signing bundle"):
        _check(fetcher, uri, _settings(base_settings, keys["alice"]))


def test_unsigned_is_refused_only_when_signatures_are_required(adapter_copy, fetcher, keys, base_settings):
    _, uri = adapter_copy
    assert fetcher.fetch(uri).signature is None  # missing model.sig is not a fetch error
    assert _check(fetcher, uri, _settings(base_settings, keys["alice"])) is None
    assert _check(fetcher, uri, base_settings) is None
    with pytest.raises(AdapterValidationError) as caught:
        _check(fetcher, uri, _settings(base_settings, keys["alice"], required=True))
    (problem,) = caught.value.problems
    assert problem.startswith("unsigned: ") and "signature_required" in problem and "--sign-key" in problem


def test_a_signature_is_not_checked_without_trusted_keys(adapter_copy, fetcher, keys, base_settings):
    folder, uri = adapter_copy
    sign_adapter_dir(folder, keys["mallory"].private)
    assert _check(fetcher, uri, base_settings) is None


def test_signature_required_without_trusted_keys_is_a_config_error():
    with pytest.raises(ConfigError) as caught:
        HotswapSettings.from_args({"signature_required": True})
    assert "signature_required" in str(caught.value) and "trusted_public_keys" in str(caught.value)
    assert "signature_required: false" in str(caught.value)
    # control: with a key it is valid
    settings = HotswapSettings.from_args({"signature_required": True, "trusted_public_keys": ["/keys/a.pub.pem"]})
    assert settings.trusted_public_keys == ("/keys/a.pub.pem",)


def test_bad_trusted_keys_are_config_errors(tmp_path, keys, base_settings):
    rsa_pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "rsa.pub.pem").write_bytes(rsa_pem)
    (tmp_path / "junk.pem").write_text("hello")
    cases = [(tmp_path / "missing.pem", "cannot read trusted public key"),
             (tmp_path / "rsa.pub.pem", "elliptic-curve"),
             (tmp_path / "junk.pem", "is not a PEM public key"),
             (keys["alice"].private, "is not a PEM public key")]  # a private key given as trusted
    for path, message in cases:
        settings = base_settings.model_copy(update={"trusted_public_keys": (str(path),)})
        with pytest.raises(ConfigError, match=message):
            load_trusted_keys(settings)
    assert len(load_trusted_keys(_settings(base_settings, keys["alice"], keys["alice"]))) == 1  # control, deduped


def test_signing_refuses_bad_keys_and_folders(tmp_path, make_adapter, keys):
    good = make_adapter("signing-good", r=4, seed=51)
    folder = tmp_path / "a"
    shutil.copytree(good, folder)
    locked = Key(tmp_path, "locked", password=b"secret")
    with pytest.raises(ConfigError, match="not a usable PEM elliptic-curve private key"):
        sign_adapter_dir(folder, locked.private)
    assert claimed_key_id(sign_adapter_dir(folder, locked.private, password=b"secret")) == locked.key_id
    with pytest.raises(ConfigError, match="not a usable PEM"):
        sign_adapter_dir(folder, keys["alice"].public)
    with pytest.raises(ConfigError, match="cannot read signing key"):
        sign_adapter_dir(folder, tmp_path / "nope.pem")
    with pytest.raises(ConfigError, match="not an adapter folder"):
        sign_adapter_dir(tmp_path, keys["alice"].private)


def test_s3_signed_push_fetch_and_a_key_on_s3(s3_bucket, base_settings, make_adapter, keys, tmp_path):
    client, bucket = s3_bucket
    folder = tmp_path / "a"
    shutil.copytree(make_adapter("signing-good", r=4, seed=51), folder)
    signature = sign_adapter_dir(folder, keys["alice"].private)
    s3 = S3Store(client, max_adapter_bytes=1 << 30, max_attempts=2, retry_backoff_s=0.01)
    fetcher = AdapterFetcher(cache_dir=tmp_path / "cache", local=LocalStore(tmp_path, max_adapter_bytes=1 << 30),
                             s3=s3)
    fetcher.push(folder, f"s3://{bucket}/team/v1")
    client.put_object(Bucket=bucket, Key="keys/alice.pub.pem", Body=keys["alice"].public_pem)
    settings = base_settings.model_copy(update={"trusted_public_keys": (f"s3://{bucket}/keys/alice.pub.pem",),
                                                "signature_required": True})
    fetched = fetcher.fetch(f"s3://{bucket}/team/v1")
    assert fetched.signature == signature
    check = check_signature(fetched, fetched.signature, settings, s3_client=client)
    assert check == SignatureCheck(keys["alice"].key_id, f"s3://{bucket}/keys/alice.pub.pem")
    # an unsigned push over it removes the old model.sig, which would no longer match
    (folder / SIGNATURE_NAME).unlink()
    fetcher.push(folder, f"s3://{bucket}/team/v1")
    assert fetcher.fetch(f"s3://{bucket}/team/v1").signature is None
    missing = settings.model_copy(update={"trusted_public_keys": (f"s3://{bucket}/keys/nobody.pem",)})
    with pytest.raises(ConfigError, match=f"s3://{bucket}/keys/nobody.pem"):
        load_trusted_keys(missing, s3_client=client)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("abc", "'abc' (3 characters)"),
        ("A" * 64, "write it in lowercase"),
        ("g" * 64, "64 lowercase hex digits"),
        ("a" * 65, "(65 characters)"),
        (12, "got 12"),
    ],
)
def test_pins_are_64_lowercase_hex(value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_pin(value)
    assert check_pin("0123456789abcdef" * 4) == "0123456789abcdef" * 4  # control


# The CLI, as a user runs it.

serve_config = test_cli.serve_config  # the same Serve config fixture (this session's cache and store root)


def test_cli_push_sign_key_then_validate_local(serve_config, make_adapter, keys, tmp_path, store_root):
    folder = tmp_path / "support-v2"
    shutil.copytree(make_adapter("signing-good", r=4, seed=51), folder)
    result = _run("push", str(folder), "signed/cli/v1", "--sign-key", str(keys["alice"].private),
                  "--config", str(serve_config))
    assert result.returncode == 0, result.stderr
    assert f"signed {folder} with key {keys['alice'].key_id}" in result.stdout
    assert (store_root / "signed/cli/v1" / SIGNATURE_NAME).read_bytes() == (folder / SIGNATURE_NAME).read_bytes()

    weights = hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()
    config = hashlib.sha256((folder / "adapter_config.json").read_bytes()).hexdigest()
    result = _run("validate", "signed/cli/v1", "--config", str(serve_config), "--trusted-key",
                  str(keys["alice"].public))
    assert result.returncode == 0, result.stderr
    assert f"adapter_model.safetensors sha256 {weights}" in result.stdout
    assert f"adapter_config.json       sha256 {config}" in result.stdout
    assert f"signature: verified, signed by key {keys['alice'].key_id} ({keys['alice'].public})" in result.stdout
    assert f"hotswap roll signed/cli/v1 --sha256 {weights}" in result.stdout

    # without trusted keys the signature is reported, not verified; with the wrong key it is refused
    result = _run("validate", "signed/cli/v1", "--config", str(serve_config), "--json")
    report = json.loads(result.stdout)
    assert report["config_sha256"] == config and report["adapter_sha256"] == weights
    assert report["signature"] == {"status": "unverified", "key_id": keys["alice"].key_id, "key_source": None}
    result = _run("validate", "signed/cli/v1", "--config", str(serve_config), "--trusted-key",
                  str(keys["mallory"].public))
    assert result.returncode == 1 and "not trusted" in result.stderr and "signed/cli/v1" in result.stderr


def test_cli_push_sign_key_to_s3(s3_bucket, serve_config, make_adapter, keys, tmp_path):
    client, bucket = s3_bucket
    folder = tmp_path / "a"
    shutil.copytree(make_adapter("signing-good", r=4, seed=51), folder)
    result = _run("push", str(folder), f"s3://{bucket}/support/v2", "--sign-key", str(keys["alice"].private),
                  "--config", str(serve_config))
    assert result.returncode == 0, result.stderr
    body = client.get_object(Bucket=bucket, Key=f"support/v2/{SIGNATURE_NAME}")["Body"].read()
    assert claimed_key_id(body) == keys["alice"].key_id


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--sha256", "abc123"), "64 lowercase hex digits"),
        (("--sha256", "F" * 64), "write it in lowercase"),
    ],
)
def test_cli_roll_sha256_format_is_checked_before_any_cluster(args, message, tmp_path):
    result = _run("roll", "support/v2", *args, env_extra={"RAY_ADDRESS": "127.0.0.1:1"})
    assert result.returncode == 2
    assert "--sha256" in result.stderr and message in result.stderr


def test_cli_push_with_a_bad_key_is_a_usage_error(serve_config, make_adapter, keys, tmp_path):
    folder = tmp_path / "a"
    shutil.copytree(make_adapter("signing-good", r=4, seed=51), folder)
    result = _run("push", str(folder), "signed/cli/bad", "--sign-key", str(keys["alice"].public),
                  "--config", str(serve_config))
    assert result.returncode == 2 and "not a usable PEM elliptic-curve private key" in result.stderr
    assert not (folder / SIGNATURE_NAME).exists()
