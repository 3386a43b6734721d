"""Adapter stores: local path safety, pickle refusal, the content-addressed cache, single-flight, and S3
against a real S3 server on 127.0.0.1 (moto), with faults injected by a TCP proxy in front of it."""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from hotswap.errors import (
    AdapterFetchError,
    AdapterNotFoundError,
    AdapterValidationError,
    ConfigError,
    UnsafePathError,
)
from hotswap.store import AdapterFetcher, LocalStore, S3Store, make_s3_client
from tests.faultproxy import Fault, FaultProxy


@pytest.fixture(scope="module")
def adapter(make_adapter) -> Path:
    return make_adapter("store-r8", r=8, seed=21)


@pytest.fixture
def fetcher(base_settings):
    return AdapterFetcher.from_settings(base_settings)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_local_fetch_is_content_addressed(fetcher, adapter, store_root):
    fetched = fetcher.fetch(str(adapter.relative_to(store_root)))
    assert fetched.sha256 == _sha(adapter / "adapter_model.safetensors")
    assert fetched.weights_path.name == f"{fetched.sha256}.safetensors"
    assert fetched.weights_path.read_bytes() == (adapter / "adapter_model.safetensors").read_bytes()
    assert fetched.config_bytes == (adapter / "adapter_config.json").read_bytes()
    # absolute and file:// spellings of the same folder give the same blob
    assert fetcher.fetch(str(adapter)).weights_path == fetched.weights_path
    assert fetcher.fetch(f"file://{adapter}").sha256 == fetched.sha256
    assert not list(fetched.weights_path.parent.glob(".incoming-*"))  # no temporary files left


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("../outside", "contains '..'"),
        ("store-r8/../../x", "contains '..'"),
        ("/etc", "outside the local store root"),
        ("file:///tmp", "outside the local store root"),
    ],
)
def test_local_paths_that_escape_the_root_are_refused(fetcher, uri, message):
    with pytest.raises(UnsafePathError, match=message):
        fetcher.fetch(uri)


def test_symlinked_folder_outside_root_is_refused(fetcher, store_root, adapter, tmp_path):
    outside = tmp_path / "outside-adapter"
    shutil.copytree(adapter, outside)
    link = store_root / f"link-{tmp_path.name}"
    link.symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafePathError, match="outside the local store root"):
        fetcher.fetch(link.name)


def test_symlinked_weights_outside_root_are_refused(fetcher, store_root, adapter, tmp_path):
    folder = store_root / f"linked-file-{tmp_path.name}"
    folder.mkdir()
    shutil.copy(adapter / "adapter_config.json", folder)
    secret = tmp_path / "secret.safetensors"
    shutil.copy(adapter / "adapter_model.safetensors", secret)
    (folder / "adapter_model.safetensors").symlink_to(secret)
    with pytest.raises(UnsafePathError, match="symlink"):
        fetcher.fetch(folder.name)


def test_missing_adapter_names_the_uri(fetcher):
    with pytest.raises(AdapterNotFoundError, match="no-such/v9") as info:
        fetcher.fetch("no-such/v9")
    assert info.value.uri == "no-such/v9"


def test_pickle_only_adapter_is_refused_unread(fetcher, store_root, adapter, tmp_path):
    folder = store_root / f"pickle-{tmp_path.name}"
    folder.mkdir()
    shutil.copy(adapter / "adapter_config.json", folder)
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04 not even read")
    with pytest.raises(AdapterValidationError, match="pickle"):
        fetcher.fetch(folder.name)


def test_local_size_cap(base_settings, adapter):
    small = AdapterFetcher.from_settings(base_settings.model_copy(update={"max_adapter_bytes": 100}))
    with pytest.raises(AdapterValidationError, match="max_adapter_bytes=100"):
        small.fetch(str(adapter))


def test_unsupported_scheme(fetcher):
    with pytest.raises(ConfigError, match="unsupported adapter URI"):
        fetcher.fetch("http://example.invalid/adapter")


def test_concurrent_fetches_share_one_download(base_settings, adapter):
    calls, gate = [], threading.Event()

    class SlowLocal(LocalStore):
        def fetch(self, uri, *, cache, signature=True):
            calls.append(uri)
            gate.wait(5)
            return super().fetch(uri, cache=cache, signature=signature)

    fetcher = AdapterFetcher(
        cache_dir=base_settings.cache_dir,
        local=SlowLocal(base_settings.store_root, max_adapter_bytes=1 << 30),
        s3=None,
    )
    results = []
    threads = [threading.Thread(target=lambda: results.append(fetcher.fetch(str(adapter)))) for _ in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(calls) < 1 and time.monotonic() < deadline:  # a fetch that fails at once must not hang the test
        threading.Event().wait(0.01)
    gate.set()
    for t in threads:
        t.join(10)
    assert len(calls) == 1
    assert len(results) == 4 and len({r.sha256 for r in results}) == 1


def test_local_push_round_trip(fetcher, adapter, store_root):
    fetcher.push(adapter, "pushed/v1")
    assert fetcher.fetch("pushed/v1").sha256 == _sha(adapter / "adapter_model.safetensors")


def test_push_refuses_a_non_adapter_folder(fetcher, tmp_path):
    with pytest.raises(ConfigError, match="missing adapter_model.safetensors"):
        fetcher.push(tmp_path, "x/v1")


def test_local_push_into_an_empty_folder(fetcher, adapter, store_root, tmp_path):
    (store_root / f"empty-{tmp_path.name}").mkdir()
    fetcher.push(adapter, f"empty-{tmp_path.name}")
    assert fetcher.fetch(f"empty-{tmp_path.name}").sha256 == _sha(adapter / "adapter_model.safetensors")


def test_local_push_replaces_a_single_adapter(fetcher, adapter, make_adapter, store_root, tmp_path):
    other = make_adapter("store-r4", r=4, seed=5)
    uri = f"replace-{tmp_path.name}/v1"
    fetcher.push(other, uri)
    (store_root / uri / "README.md").write_text("model card save_pretrained writes beside the adapter")
    fetcher.push(adapter, uri)
    assert fetcher.fetch(uri).sha256 == _sha(adapter / "adapter_model.safetensors")
    assert sorted(p.name for p in (store_root / uri).iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_local_push_refuses_a_parent_of_versions_and_deletes_nothing(fetcher, adapter, store_root, tmp_path):
    demo = f"demo-{tmp_path.name}"
    fetcher.push(adapter, f"{demo}/v1")
    fetcher.push(adapter, f"{demo}/v2")
    before = sorted(str(p.relative_to(store_root)) for p in (store_root / demo).rglob("*"))
    with pytest.raises(ConfigError, match=f"{demo}.*subfolders v1, v2.*'{demo}/v2'"):
        fetcher.push(adapter, demo)
    assert sorted(str(p.relative_to(store_root)) for p in (store_root / demo).rglob("*")) == before
    assert fetcher.fetch(f"{demo}/v1").size_bytes > 0


@pytest.mark.parametrize("uri", [".", "", "file://{root}", "{root}"], ids=["dot", "empty", "file-uri", "absolute"])
def test_local_push_refuses_the_store_root(fetcher, adapter, store_root, uri):
    before = sorted(p.name for p in store_root.iterdir())
    with pytest.raises(ConfigError, match="local store root|empty adapter path"):
        fetcher.push(adapter, uri.format(root=store_root))
    assert sorted(p.name for p in store_root.iterdir()) == before


def test_local_push_refuses_a_folder_that_is_not_an_adapter(fetcher, adapter, store_root, tmp_path):
    folder = store_root / f"notes-{tmp_path.name}"
    folder.mkdir()
    (folder / "notes.txt").write_text("not an adapter")
    with pytest.raises(ConfigError, match="notes.txt but no adapter_config.json"):
        fetcher.push(adapter, folder.name)
    assert (folder / "notes.txt").read_text() == "not an adapter"


# --- S3 against a real server on 127.0.0.1 -----------------------------------------------------------


def _s3_fetcher(base_settings, client, **store_kwargs) -> AdapterFetcher:
    s3 = S3Store(client, max_adapter_bytes=store_kwargs.pop("max_adapter_bytes", 1 << 30),
                 max_attempts=store_kwargs.pop("max_attempts", 3), retry_backoff_s=0.01)
    local = LocalStore(base_settings.store_root, max_adapter_bytes=1 << 30)
    return AdapterFetcher(cache_dir=base_settings.cache_dir, local=local, s3=s3)


def test_s3_push_and_fetch(s3_bucket, base_settings, adapter):
    client, bucket = s3_bucket
    fetcher = _s3_fetcher(base_settings, client)
    fetcher.push(adapter, f"s3://{bucket}/team/v1")
    fetched = fetcher.fetch(f"s3://{bucket}/team/v1")
    assert fetched.sha256 == _sha(adapter / "adapter_model.safetensors")
    assert fetched.uri == f"s3://{bucket}/team/v1"


class _Requests:
    """The S3 requests a real boto3 client sends, by operation and key (botocore's own event hooks)."""

    def __init__(self, client) -> None:
        self.sent: list[tuple[str, str]] = []
        client.meta.events.register("provide-client-params.s3.*", self._seen)

    def _seen(self, params, context, event_name, **_):
        self.sent.append((event_name.rsplit(".", 1)[-1], params.get("Key", "")))

    def take(self) -> list[tuple[str, str]]:
        out, self.sent = self.sent, []
        return out


def test_s3_fetch_sends_three_requests_and_none_for_weights_it_has(s3_bucket, base_settings, adapter, make_adapter,
                                                                      tmp_path):
    """A roll reads a version once per operation. A new version costs a HEAD of the weights and a GET of the config
    and of the weights (not also HEADs of the config and of model.sig); a version whose bytes the cache holds (S3's
    full-object sha256 on the HEAD names them: a roll back) costs a second HEAD instead of the weights GET; content
    changed at the URI is downloaded again."""
    client, bucket = s3_bucket
    fetcher = _s3_fetcher(base_settings.model_copy(update={"cache_dir": tmp_path}), client)  # an empty cache
    uri = f"s3://{bucket}/count/v1"
    fetcher.push(adapter, uri)
    requests = _Requests(client)
    first = fetcher.fetch(uri)
    assert sorted(requests.take()) == [("GetObject", "count/v1/adapter_config.json"),
                                       ("GetObject", "count/v1/adapter_model.safetensors"),
                                       ("GetObject", "count/v1/model.sig"),
                                       ("HeadObject", "count/v1/adapter_model.safetensors")]
    assert fetcher.fetch(uri, signature=False) == first
    assert sorted(requests.take()) == [("GetObject", "count/v1/adapter_config.json"),  # the weights HEADed again
                                       ("HeadObject", "count/v1/adapter_model.safetensors"),
                                       ("HeadObject", "count/v1/adapter_model.safetensors")]
    other = make_adapter("count-other", r=4, seed=7)
    fetcher.push(other, uri)  # new bytes at the same URI
    changed = fetcher.fetch(uri, signature=False)
    assert changed.sha256 == _sha(other / "adapter_model.safetensors") != first.sha256
    assert ("GetObject", "count/v1/adapter_model.safetensors") in requests.take()
    changed.weights_path.unlink()  # evicted from the cache: downloaded again
    assert fetcher.fetch(uri, signature=False).weights_path.read_bytes() == (other / "adapter_model.safetensors"
                                                                              ).read_bytes()


def test_s3_cached_weights_are_hashed_again_and_a_damaged_blob_is_downloaded_again(s3_bucket, base_settings, adapter,
                                                                                     tmp_path):
    """A cache hit is trusted only if the blob still hashes to its name (a flipped byte of the same size is not
    served, and the download repairs the blob), and it renews the blob's mtime (the cache evicts least recently
    used). A HEAD whose ChecksumSHA256 is not base64 is no error: the weights are downloaded."""
    client, bucket = s3_bucket
    fetcher = _s3_fetcher(base_settings.model_copy(update={"cache_dir": tmp_path}), client)
    uri = f"s3://{bucket}/damaged/v1"
    fetcher.push(adapter, uri)
    first = fetcher.fetch(uri)
    os.utime(first.weights_path, (1000, 1000))
    requests = _Requests(client)
    assert fetcher.fetch(uri, signature=False) == first  # a hit: no weights GET, mtime renewed
    assert ("GetObject", "damaged/v1/adapter_model.safetensors") not in requests.take()
    assert first.weights_path.stat().st_mtime > 1000
    raw = bytearray(first.weights_path.read_bytes())
    raw[-1] ^= 0xFF
    first.weights_path.write_bytes(bytes(raw))
    again = fetcher.fetch(uri, signature=False)
    assert ("GetObject", "damaged/v1/adapter_model.safetensors") in requests.take()
    assert again.sha256 == first.sha256 == _sha(again.weights_path)  # repaired in place

    def malformed(parsed, **_):
        parsed["ChecksumSHA256"] = "not base64!"

    client.meta.events.register("after-call.s3.HeadObject", malformed)
    try:
        assert fetcher.fetch(uri, signature=False).sha256 == first.sha256
        assert ("GetObject", "damaged/v1/adapter_model.safetensors") in requests.take()
    finally:
        client.meta.events.unregister("after-call.s3.HeadObject", malformed)


def test_s3_a_push_landing_during_a_cached_fetch_is_refused_not_paired_with_the_new_config(
        s3_bucket, base_settings, make_adapter, tmp_path):
    """Found by an outside review: a push (weights first, then the config) landing between the weights HEAD and the
    config GET made a cache hit return the old weights with the new config, a version never uploaded. The download
    path's IfMatch GET refuses that; the cache hit now HEADs the weights again and refuses it too."""
    import json

    client, bucket = s3_bucket
    old, new = make_adapter("torn-old", r=4, seed=51), make_adapter("torn-new", r=4, lora_alpha=99, seed=52)
    fetcher = _s3_fetcher(base_settings.model_copy(update={"cache_dir": tmp_path}), client)
    uri = f"s3://{bucket}/torn/v"
    fetcher.push(old, uri)
    fetcher.fetch(uri, signature=False)  # the old weights are cached
    pushed = []

    def push_after_the_first_head(**_):
        if not pushed:
            pushed.append(True)
            fetcher.push(new, uri)

    client.meta.events.register("after-call.s3.HeadObject", push_after_the_first_head)
    try:
        with pytest.raises(AdapterFetchError, match="changed while it was being read"):
            fetcher.fetch(uri, signature=False)
    finally:
        client.meta.events.unregister("after-call.s3.HeadObject", push_after_the_first_head)
    fetched = fetcher.fetch(uri, signature=False)  # once the upload has finished: the new version, whole
    assert fetched.sha256 == _sha(new / "adapter_model.safetensors")
    assert json.loads(fetched.config_bytes)["lora_alpha"] == 99


def test_s3_oversized_config_or_signature_is_refused_before_it_is_read(s3_bucket, base_settings, adapter):
    from hotswap.store import CONFIG_NAME, SIGNATURE_NAME

    client, bucket = s3_bucket
    fetcher = _s3_fetcher(base_settings, client)
    for name in (CONFIG_NAME, SIGNATURE_NAME):
        prefix = f"huge-{name}/v1"
        fetcher.push(adapter, f"s3://{bucket}/{prefix}")
        client.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=b" " * ((1 << 20) + 1))
        with pytest.raises(AdapterValidationError, match=f"{name} is larger than"):
            fetcher.fetch(f"s3://{bucket}/{prefix}")
    fetcher.fetch(f"s3://{bucket}/huge-{SIGNATURE_NAME}/v1", signature=False)  # not read: not refused


def test_s3_default_client_uses_the_standard_endpoint_variable(s3_bucket, base_settings, adapter):
    client, bucket = s3_bucket
    client.upload_file(str(adapter / "adapter_model.safetensors"), bucket, "std/v1/adapter_model.safetensors")
    client.upload_file(str(adapter / "adapter_config.json"), bucket, "std/v1/adapter_config.json")
    # no client injected: boto3 finds the server through AWS_ENDPOINT_URL_S3 alone
    assert os.environ["AWS_ENDPOINT_URL_S3"].startswith("http://127.0.0.1:")
    assert AdapterFetcher.from_settings(base_settings).fetch(f"s3://{bucket}/std/v1").size_bytes > 0


def test_s3_missing_names_the_uri(s3_bucket, base_settings):
    client, bucket = s3_bucket
    with pytest.raises(AdapterNotFoundError, match=f"s3://{bucket}/nothing/here"):
        _s3_fetcher(base_settings, client).fetch(f"s3://{bucket}/nothing/here")


def test_s3_missing_bucket_is_not_found(s3_server, base_settings):
    client = make_s3_client(connect_timeout_s=2, read_timeout_s=2)
    with pytest.raises(AdapterNotFoundError, match="s3://no-such-bucket-x/a"):
        _s3_fetcher(base_settings, client).fetch("s3://no-such-bucket-x/a")


def test_s3_pickle_only_is_refused(s3_bucket, base_settings, adapter):
    client, bucket = s3_bucket
    client.put_object(Bucket=bucket, Key="p/v1/adapter_model.bin", Body=b"\x80\x04pickle")
    client.upload_file(str(adapter / "adapter_config.json"), bucket, "p/v1/adapter_config.json")
    with pytest.raises(AdapterValidationError, match="pickle"):
        _s3_fetcher(base_settings, client).fetch(f"s3://{bucket}/p/v1")


def test_s3_size_cap_is_checked_before_download(s3_bucket, base_settings, adapter):
    client, bucket = s3_bucket
    fetcher = _s3_fetcher(base_settings, client, max_adapter_bytes=100)
    fetcher.push(adapter, f"s3://{bucket}/big/v1")
    with pytest.raises(AdapterValidationError, match="max_adapter_bytes=100"):
        fetcher.fetch(f"s3://{bucket}/big/v1")
    assert not list((base_settings.cache_dir / "blobs").glob(".incoming-*"))


def test_s3_corrupted_object_is_caught_by_validation(s3_bucket, base_settings, adapter, tiny_base):
    from hotswap.adapters import model_spec_for
    from hotswap.validation import validate_adapter

    client, bucket = s3_bucket
    raw = bytearray((adapter / "adapter_model.safetensors").read_bytes())
    raw[10] ^= 0xFF  # inside the JSON header
    client.put_object(Bucket=bucket, Key="c/v1/adapter_model.safetensors", Body=bytes(raw))
    client.upload_file(str(adapter / "adapter_config.json"), bucket, "c/v1/adapter_config.json")
    fetched = _s3_fetcher(base_settings, client).fetch(f"s3://{bucket}/c/v1")
    with pytest.raises(AdapterValidationError, match="header"):
        validate_adapter(fetched, model_spec_for(base_settings))


@pytest.fixture
def proxied(s3_bucket, s3_server, base_settings, adapter):
    """(fetcher through the proxy, proxy, uri) with the adapter uploaded directly."""
    client, bucket = s3_bucket
    client.upload_file(str(adapter / "adapter_model.safetensors"), bucket, "f/v1/adapter_model.safetensors")
    client.upload_file(str(adapter / "adapter_config.json"), bucket, "f/v1/adapter_config.json")
    port = int(s3_server.rsplit(":", 1)[1])
    proxy = FaultProxy("127.0.0.1", port)
    import boto3
    from botocore.config import Config

    proxied_client = boto3.session.Session().client(
        "s3",
        endpoint_url=proxy.url,
        config=Config(connect_timeout=2, read_timeout=1, retries={"total_max_attempts": 1}),
    )
    yield _s3_fetcher(base_settings, proxied_client), proxy, f"s3://{bucket}/f/v1", bucket
    proxy.close()


@pytest.mark.parametrize(
    ("kind", "after"),
    [("truncate", 700), ("stall", 700), ("flip", 3000), ("status500", 0)],
    ids=["truncated-body", "stalled-body", "flipped-byte", "server-error"],
)
def test_s3_faults_are_retried_then_succeed(proxied, adapter, kind, after):
    fetcher, proxy, uri, bucket = proxied
    proxy.add(Fault(kind, match=f"GET /{bucket}/f/v1/adapter_model.safetensors".encode(), after=after, times=2))
    fetched = fetcher.fetch(uri)
    assert proxy.injected == 2  # two damaged attempts, the third succeeded
    assert fetched.sha256 == _sha(adapter / "adapter_model.safetensors")


def test_s3_persistent_fault_gives_up_after_bounded_attempts(proxied):
    fetcher, proxy, uri, bucket = proxied
    proxy.add(Fault("truncate", match=f"GET /{bucket}/f/v1/adapter_model.safetensors".encode(), after=700, times=99))
    with pytest.raises(AdapterFetchError, match="failed 3 times") as info:
        fetcher.fetch(uri)
    assert uri in str(info.value)
    assert proxy.matched_requests == 3


def test_s3_server_down_is_a_clear_fetch_error(base_settings):
    import boto3
    from botocore.config import Config

    from tests.conftest import free_port

    client = boto3.session.Session().client(
        "s3", endpoint_url=f"http://127.0.0.1:{free_port()}",
        config=Config(connect_timeout=0.5, read_timeout=0.5, retries={"total_max_attempts": 1}),
    )
    with pytest.raises(AdapterFetchError, match="AWS_ENDPOINT_URL_S3"):
        _s3_fetcher(base_settings, client).fetch("s3://bucket/adapter")


def test_s3_endpoint_url_setting_routes_every_request_through_it(proxied, base_settings, adapter):
    """``s3_endpoint_url`` wins over AWS_ENDPOINT_URL_S3: the fetch goes through the proxy (which counts it)."""
    _, proxy, uri, bucket = proxied
    proxy.add(Fault("truncate", match=f"GET /{bucket}/f/v1/adapter_model.safetensors".encode(), after=700, times=1))
    settings = base_settings.model_copy(update={"s3_endpoint_url": proxy.url})
    fetched = AdapterFetcher.from_settings(settings).fetch(uri)
    assert proxy.injected == 1  # the damaged first attempt went through the proxy, the retry too
    assert fetched.sha256 == _sha(adapter / "adapter_model.safetensors")


@pytest.mark.parametrize("bad", ["127.0.0.1:9000", "ftp://host", "http://", "http://a b"])
def test_s3_endpoint_url_must_be_an_http_url(bad):
    from hotswap.errors import ConfigError
    from hotswap.settings import HotswapSettings

    with pytest.raises(ConfigError, match="s3_endpoint_url"):
        HotswapSettings.from_args({"s3_endpoint_url": bad})
