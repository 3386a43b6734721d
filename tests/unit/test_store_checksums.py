"""S3 integrity under AWS's encryption modes: which digests a fetch compares for SSE-KMS, DSSE-KMS, SSE-C and
multipart objects, against the real S3 server on 127.0.0.1 (moto), with controls that corruption is still caught.

moto 5.2.5 differs from AWS in two ways that matter here, so :class:`_LikeAws` hooks one boto3 client to
see what AWS sends (the objects, their bytes and checksums stay moto's):

- moto gives every single-part object an MD5 ETag; AWS's ETag of an SSE-KMS, DSSE-KMS or SSE-C object is
  not the MD5 of the object. The hook replaces such ETags (and maps ``If-Match`` back for the server).
- moto ignores SSE-C keys on reads; AWS answers 400 to a HEAD or GET of an SSE-C object without the key,
  and echoes ``SSECustomerAlgorithm`` when the key is sent. The hook answers and echoes likewise.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from hotswap.errors import AdapterFetchError
from hotswap.store import CONFIG_NAME, WEIGHTS_NAME, AdapterFetcher, LocalStore, S3Store, _expected_digests
from tests.faultproxy import Fault, FaultProxy

_SSE_C_KEY = bytes(range(32))
_SSE_C = {"SSECustomerAlgorithm": "AES256", "SSECustomerKey": _SSE_C_KEY}


class _Raw:
    def __init__(self, body: bytes) -> None:
        self.body = body

    def stream(self, **_):
        yield self.body


class _LikeAws:
    """Hooks on one boto3 client so that moto's answers for encrypted objects read as AWS's (module docstring).

    ``sse_c_keys``: object keys stored with SSE-C. ``send_sse_c_key``: the client sends the customer key
    (as an application could register on a client it injects). ``refused`` counts the 400s answered.
    """

    def __init__(self, client, *, sse_c_keys=(), send_sse_c_key: bool = False) -> None:
        from botocore.awsrequest import AWSResponse

        self._response = AWSResponse
        self.sse_c_keys = set(sse_c_keys)
        self.send_sse_c_key = send_sse_c_key
        self.real_etags: dict[str, str] = {}
        self.refused = 0
        for op in ("HeadObject", "GetObject"):
            client.meta.events.register(f"provide-client-params.s3.{op}", self._params)
            client.meta.events.register(f"before-send.s3.{op}", self._send)
            client.meta.events.register(f"after-call.s3.{op}", self._answer)

    def _params(self, params, context, **_):
        context["sse_c"] = params["Key"] in self.sse_c_keys
        if context["sse_c"] and self.send_sse_c_key:
            params.update(_SSE_C)
        if params.get("IfMatch") in self.real_etags:
            params["IfMatch"] = self.real_etags[params["IfMatch"]]

    def _send(self, request, **_):
        key = unquote(urlsplit(request.url).path).split("/", 2)[-1]
        if key in self.sse_c_keys and "x-amz-server-side-encryption-customer-key" not in request.headers:
            self.refused += 1
            body = b"" if request.method == "HEAD" else (
                b"<Error><Code>InvalidRequest</Code><Message>The object was stored using a form of Server Side "
                b"Encryption. The correct parameters must be provided to retrieve the object.</Message></Error>"
            )
            return self._response(request.url, 400, {"Content-Type": "application/xml"}, _Raw(body))
        return None

    def _answer(self, parsed, context, **_):
        if "ETag" not in parsed:  # an error answer
            return
        if context.get("sse_c"):
            parsed["SSECustomerAlgorithm"] = "AES256"
        if context.get("sse_c") or parsed.get("ServerSideEncryption") in ("aws:kms", "aws:kms:dsse"):
            parts = parsed["ETag"].strip('"').partition("-")[1:]  # a multipart ETag keeps its "-N"
            fake = f'"{hashlib.md5(parsed["ETag"].encode()).hexdigest()}{"".join(parts)}"'  # not the body's MD5
            self.real_etags[fake] = parsed["ETag"]
            parsed["ETag"] = fake


@pytest.fixture(scope="module")
def adapter(make_adapter) -> Path:
    return make_adapter("checksums-r8", r=8, seed=33)


def _client(endpoint: str, **config):
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, config=Config(connect_timeout=2, read_timeout=2,
                                                   retries={"total_max_attempts": 1}, **config)
    )


def _fetcher(base_settings, client) -> AdapterFetcher:
    s3 = S3Store(client, max_adapter_bytes=1 << 30, max_attempts=3, retry_backoff_s=0.01)
    local = LocalStore(base_settings.store_root, max_adapter_bytes=1 << 30)
    return AdapterFetcher(cache_dir=base_settings.cache_dir, local=local, s3=s3)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _b64sha(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def _upload(client, bucket: str, prefix: str, adapter: Path, **extra) -> None:
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        client.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=(adapter / name).read_bytes(), **extra)


def _keys(prefix: str) -> set[str]:
    return {f"{prefix}/{WEIGHTS_NAME}", f"{prefix}/{CONFIG_NAME}"}


def _default_encryption(client, bucket: str, algorithm: str) -> None:
    rule = {"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": algorithm}}
    client.put_bucket_encryption(Bucket=bucket, ServerSideEncryptionConfiguration={"Rules": [rule]})


_MD5 = "0123456789abcdef0123456789abcdef"
_SUM = "n4bQgYhMfWWaL+qgxVrQFaO/TxsrC4Is0V1sFbDwCgg="
# (id, HEAD fields, GET fields, expected sha256_b64, expected md5_hex)
DIGEST_CASES = [
    ("plain", {"ETag": f'"{_MD5}"', "ChecksumSHA256": _SUM}, {"ChecksumType": "FULL_OBJECT"}, _SUM, _MD5),
    ("no-checksum", {"ETag": f'"{_MD5}"'}, {}, None, _MD5),
    ("sse-s3", {"ETag": f'"{_MD5}"', "ServerSideEncryption": "AES256", "ChecksumSHA256": _SUM}, {}, _SUM, _MD5),
    ("sse-kms", {"ETag": f'"{_MD5}"', "ServerSideEncryption": "aws:kms", "ChecksumSHA256": _SUM}, {}, _SUM, None),
    ("dsse-kms-no-checksum", {"ETag": f'"{_MD5}"', "ServerSideEncryption": "aws:kms:dsse"}, {}, None, None),
    ("sse-c", {"ETag": f'"{_MD5}"', "SSECustomerAlgorithm": "AES256", "ChecksumSHA256": _SUM}, {}, _SUM, None),
    ("multipart-composite", {"ETag": f'"{_MD5}-2"'}, {"ChecksumSHA256": f"{_SUM}-2", "ChecksumType": "COMPOSITE"},
     None, None),
    # moto 5.2.5 sends a multipart object's composite checksum on HEAD without its "-N"
    ("multipart-head-without-suffix", {"ETag": f'"{_MD5}-2"', "ChecksumSHA256": _SUM}, {}, None, None),
    ("multipart-full-object", {"ETag": f'"{_MD5}-2"'}, {"ChecksumSHA256": _SUM, "ChecksumType": "FULL_OBJECT"},
     _SUM, None),
    ("etag-not-hex", {"ETag": '"not-an-md5-at-all-not-an-md5-xx"'}, {}, None, None),
]


@pytest.mark.parametrize(("head", "get", "sha256_b64", "md5_hex"), [c[1:] for c in DIGEST_CASES],
                         ids=[c[0] for c in DIGEST_CASES])
def test_which_digests_s3_metadata_allows(head, get, sha256_b64, md5_hex):
    expected = _expected_digests(head, get)
    assert (expected.sha256_b64, expected.md5_hex) == (sha256_b64, md5_hex)


@pytest.mark.parametrize("encryption", ["aws:kms", "aws:kms:dsse"])
def test_push_into_a_kms_encrypted_bucket_then_fetch(s3_bucket, s3_server, base_settings, adapter, encryption):
    """The reported bug: under SSE-KMS the ETag is not the MD5, and every fetch failed on 'does not match ETag'."""
    client, bucket = s3_bucket
    _default_encryption(client, bucket, encryption)
    reader = _client(s3_server)
    like = _LikeAws(reader)
    fetcher = _fetcher(base_settings, reader)
    fetcher.push(adapter, f"s3://{bucket}/kms/v1")
    fetched = fetcher.fetch(f"s3://{bucket}/kms/v1")
    assert fetched.sha256 == _sha(adapter / WEIGHTS_NAME)
    assert fetched.config_bytes == (adapter / CONFIG_NAME).read_bytes()
    assert like.real_etags  # the reader did see AWS-style ETags
    head = client.head_object(Bucket=bucket, Key=f"kms/v1/{WEIGHTS_NAME}", ChecksumMode="ENABLED")
    assert head["ServerSideEncryption"] == encryption
    assert head["ChecksumSHA256"] == _b64sha((adapter / WEIGHTS_NAME).read_bytes())  # push stores the sha256


def test_kms_object_without_any_s3_checksum_is_fetched(s3_bucket, s3_server, base_settings, adapter):
    """Uploaded by another tool with no checksum: only the length and the cache's own sha256 are left."""
    _, bucket = s3_bucket
    _upload(_client(s3_server, request_checksum_calculation="when_required"), bucket, "bare", adapter,
            ServerSideEncryption="aws:kms")
    reader = _client(s3_server)
    _LikeAws(reader)
    assert reader.head_object(Bucket=bucket, Key=f"bare/{WEIGHTS_NAME}", ChecksumMode="ENABLED").get(
        "ChecksumSHA256") is None
    assert _fetcher(base_settings, reader).fetch(f"s3://{bucket}/bare").sha256 == _sha(adapter / WEIGHTS_NAME)


def test_sse_c_object_is_a_clear_error_naming_the_object_and_the_fix(s3_bucket, s3_server, base_settings, adapter):
    client, bucket = s3_bucket
    _upload(client, bucket, "ssec", adapter, ChecksumAlgorithm="SHA256", **_SSE_C)
    reader = _client(s3_server)
    like = _LikeAws(reader, sse_c_keys=_keys("ssec"))
    with pytest.raises(AdapterFetchError, match="SSE-C") as info:
        _fetcher(base_settings, reader).fetch(f"s3://{bucket}/ssec")
    message = str(info.value)
    assert f"s3://{bucket}/ssec/{WEIGHTS_NAME}" in message and "--sse aws:kms" in message
    assert "failed 3 times" not in message  # a 400 is an answer, not a fault to retry
    assert like.refused >= 1


def test_sse_c_object_read_by_a_client_that_sends_the_key(s3_bucket, s3_server, base_settings, adapter):
    """An injected client that carries the key reads it; the (non-MD5) ETag is not compared, the sha256 is."""
    client, bucket = s3_bucket
    _upload(client, bucket, "ssec-key", adapter, ChecksumAlgorithm="SHA256", **_SSE_C)
    reader = _client(s3_server)
    like = _LikeAws(reader, sse_c_keys=_keys("ssec-key"), send_sse_c_key=True)
    assert _fetcher(base_settings, reader).fetch(f"s3://{bucket}/ssec-key").sha256 == _sha(adapter / WEIGHTS_NAME)
    assert like.refused == 0 and like.real_etags


@pytest.mark.parametrize("encryption", [None, "aws:kms"])
def test_multipart_object_composite_checksum_is_not_taken_for_the_digest(
    s3_bucket, s3_server, base_settings, adapter, encryption
):
    client, bucket = s3_bucket
    key, data = f"mp/{WEIGHTS_NAME}", (adapter / WEIGHTS_NAME).read_bytes()
    extra = {"ServerSideEncryption": encryption} if encryption else {}
    upload = client.create_multipart_upload(Bucket=bucket, Key=key, ChecksumAlgorithm="SHA256", **extra)
    part = client.upload_part(Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=data,
                              ChecksumAlgorithm="SHA256")
    client.complete_multipart_upload(
        Bucket=bucket, Key=key, UploadId=upload["UploadId"],
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"], "ChecksumSHA256": part["ChecksumSHA256"]}]},
    )
    client.put_object(Bucket=bucket, Key=f"mp/{CONFIG_NAME}", Body=(adapter / CONFIG_NAME).read_bytes())
    reader = _client(s3_server)
    _LikeAws(reader)
    got = reader.get_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    got["Body"].close()
    assert got["ETag"].strip('"').endswith("-1") and got["ChecksumSHA256"].endswith("-1")  # what S3 sends
    assert _fetcher(base_settings, reader).fetch(f"s3://{bucket}/mp").sha256 == _sha(adapter / WEIGHTS_NAME)


# --- controls: corruption is still caught ------------------------------------------------------------


def test_control_kms_object_whose_bytes_do_not_match_its_checksum_is_refused(
    s3_bucket, s3_server, base_settings, adapter
):
    """moto keeps a wrong ChecksumSHA256 given at upload (AWS would refuse it): bytes that no longer match."""
    client, bucket = s3_bucket
    data = (adapter / WEIGHTS_NAME).read_bytes()
    client.put_object(Bucket=bucket, Key=f"bad/{WEIGHTS_NAME}", Body=data, ServerSideEncryption="aws:kms",
                      ChecksumAlgorithm="SHA256", ChecksumSHA256=_b64sha(data + b"x"))
    client.put_object(Bucket=bucket, Key=f"bad/{CONFIG_NAME}", Body=(adapter / CONFIG_NAME).read_bytes())
    reader = _client(s3_server)
    _LikeAws(reader)
    with pytest.raises(AdapterFetchError, match=f"GET s3://{bucket}/bad/{WEIGHTS_NAME} failed 3 times.*match"):
        _fetcher(base_settings, reader).fetch(f"s3://{bucket}/bad")
    assert not list((base_settings.cache_dir / "blobs").glob(".incoming-*"))


@pytest.mark.parametrize("times", [2, 99], ids=["flipped-twice-then-clean", "always-flipped"])
def test_control_unencrypted_object_without_checksum_still_checks_the_etag_md5(
    s3_bucket, s3_server, base_settings, adapter, times
):
    """With no S3 checksum at all, the ETag's MD5 is the only end-to-end check, and it still runs."""
    _, bucket = s3_bucket
    _upload(_client(s3_server, request_checksum_calculation="when_required"), bucket, "md5", adapter)
    proxy = FaultProxy("127.0.0.1", int(s3_server.rsplit(":", 1)[1]))
    try:
        proxy.add(Fault("flip", match=f"GET /{bucket}/md5/{WEIGHTS_NAME}".encode(), after=3000, times=times))
        fetcher = _fetcher(base_settings, _client(proxy.url))
        if times == 2:
            assert fetcher.fetch(f"s3://{bucket}/md5").sha256 == _sha(adapter / WEIGHTS_NAME)
        else:
            with pytest.raises(AdapterFetchError, match="does not match ETag"):
                fetcher.fetch(f"s3://{bucket}/md5")
        assert proxy.injected == min(times, 3)
    finally:
        proxy.close()


def test_control_our_own_sha256_comparison_reports_a_mismatch(tmp_path):
    """Botocore also checks a GET body against ChecksumSHA256 (ChecksumMode); ours must hold without it."""
    from hotswap.store import _BlobCache

    data = os.urandom(5000)
    good = _expected_digests({"ChecksumSHA256": _b64sha(data)}, {})
    bad = _expected_digests({"ChecksumSHA256": _b64sha(data + b"!")}, {})
    with _BlobCache(tmp_path).writer() as out:
        out.write(data)
    assert good.mismatch(out.sha256, out.md5) is None
    assert "does not match S3's ChecksumSHA256" in bad.mismatch(out.sha256, out.md5)
