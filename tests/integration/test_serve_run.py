"""The README's first command, for real: ``serve run serve_config.yaml`` in a subprocess answers a completion.

It starts its own Ray cluster, as a user's shell would; only the HTTP port is changed (to a free
one) so that the test cannot collide with anything already on 8000.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import free_port
from tests.integration.conftest import wait_for_condition

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]


def _check_fast_path(root_pid: int) -> None:
    """Every process on a request's path (Serve's HTTP proxy, the ingress, the model replicas) runs with Ray Serve's
    fast-path settings: the config's controller_options reach the proxy, its application runtime_env the replicas."""
    import psutil

    from deployments.app import SERVE_FAST_PATH_ENV

    seen = {}
    for child in psutil.Process(root_pid).children(recursive=True):
        try:
            title = (child.cmdline() or [""])[0]
            if title.startswith(("ray::ProxyActor", "ray::ServeReplica:hotswap:")):
                seen[title] = {k: child.environ().get(k) for k in SERVE_FAST_PATH_ENV}
        except psutil.Error:  # a worker that exited meanwhile
            continue
    kinds = {"ray::ProxyActor", "ray::ServeReplica:hotswap:Ingress", "ray::ServeReplica:hotswap:ModelReplica"}
    assert kinds <= {title.split(".")[0].split()[0] for title in seen}, sorted(seen)
    for title, env in seen.items():
        assert env == SERVE_FAST_PATH_ENV, (title, env)


def test_serve_run_serve_config_answers_a_completion(tmp_path):
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "HOTSWAP_CACHE_DIR": str(tmp_path / "cache"), "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    log = open(tmp_path / "serve.log", "w")
    serve_bin = Path(sys.executable).with_name("serve")
    proc = subprocess.Popen([str(serve_bin), "run", str(path)], cwd=tmp_path, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def healthy():
            if proc.poll() is not None:
                raise AssertionError(f"serve run exited with {proc.returncode}: "
                                     f"{(tmp_path / 'serve.log').read_text()[-3000:]}")
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200

        wait_for_condition(healthy, timeout_s=300, interval_s=1, message="serve run to answer /healthz")
        response = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                              json={"prompt": "Hello, hotswap", "max_tokens": 8, "temperature": 0})
        assert response.status_code == 200, response.text
        assert response.headers["x-adapter-uri"] == "demo/v1"
        assert len(response.headers["x-adapter-sha256"]) == 64
        assert response.json()["usage"]["completion_tokens"] >= 1
        _check_fast_path(proc.pid)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()
