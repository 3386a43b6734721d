"""Integration tier: one real Ray (and Serve) per test session, an S3 server on 127.0.0.1, polling helpers."""

from __future__ import annotations

import os
import time

import pytest

from tests.conftest import free_port


def wait_for_condition(predicate, *, timeout_s: float = 60, interval_s: float = 0.1, message: str = "condition"):
    """Poll ``predicate`` until it is truthy; fail with ``message`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except Exception as e:  # keep polling; report the last error on timeout
            last = e
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {message} (last: {last!r})")


@pytest.fixture(scope="session")
def serve_cluster(s3_server, hotswap_home):
    """Ray + Serve on this machine, HTTP on a free loopback port; workers see the S3 endpoint and credentials."""
    import ray
    from ray import serve

    from deployments.app import SERVE_CONTROLLER_OPTIONS

    env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                      "AWS_DEFAULT_REGION")}
    env["HOTSWAP_CACHE_DIR"] = str(hotswap_home)
    env["TOKENIZERS_PARALLELISM"] = "false"
    metrics_port = free_port()
    # address="local": always a cluster of our own, never one another process left running on this machine
    ray.init(address="local", num_cpus=4, include_dashboard=False, runtime_env={"env_vars": env},
             logging_level="WARNING", log_to_driver=False, _metrics_export_port=metrics_port)
    os.environ["HOTSWAP_TEST_METRICS_URL"] = f"http://127.0.0.1:{metrics_port}/metrics"
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port},
                controller_options=SERVE_CONTROLLER_OPTIONS)
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def upload_adapter(folder, bucket: str, prefix: str) -> tuple[str, str]:
    """Upload an adapter folder straight to the test S3 server under ``s3://bucket/prefix``; (uri, sha256)."""
    import hashlib

    from hotswap.store import make_s3_client

    client = make_s3_client(connect_timeout_s=2, read_timeout_s=2)
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        client.upload_file(str(folder / f), bucket, f"{prefix}/{f}")
    return f"s3://{bucket}/{prefix}", hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()


def upload_versions(bucket: str, folders: dict) -> dict[str, tuple[str, str]]:
    """Create ``bucket`` on the test S3 server and upload each adapter folder under its name; name -> (uri, sha256)."""
    from hotswap.store import make_s3_client

    make_s3_client(connect_timeout_s=2, read_timeout_s=2).create_bucket(Bucket=bucket)
    return {name: upload_adapter(folder, bucket, name) for name, folder in folders.items()}
