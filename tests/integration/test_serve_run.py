"""The README's first command, for real: ``serve run serve_config.yaml`` in a subprocess answers a completion, and
so does the same config with the README's HAProxy opt-in.

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
    """Serve's HTTP proxy runs with SERVE_PROXY_ENV (the config's controller_options: gRPC to the ingress) and the
    ingress and the model replicas with SERVE_FAST_PATH_ENV (the application's runtime_env)."""
    import psutil

    from deployments.app import SERVE_FAST_PATH_ENV, SERVE_PROXY_ENV

    wanted = {"ray::ProxyActor": SERVE_PROXY_ENV, "ray::ServeReplica:hotswap:Ingress": SERVE_FAST_PATH_ENV,
              "ray::ServeReplica:hotswap:ModelReplica": SERVE_FAST_PATH_ENV}
    seen = {}
    for child in psutil.Process(root_pid).children(recursive=True):
        try:
            argv = child.cmdline()
            title = argv[0] if argv else ""
            kind = next((k for k in wanted if title.startswith(k)), None)
            if kind is not None:
                environ = child.environ()
                seen.setdefault(kind, []).append({k: environ.get(k) for k in wanted[kind]})
        except psutil.Error:  # a worker that exited meanwhile
            continue
    assert set(seen) == set(wanted), sorted(seen)
    for kind, envs in seen.items():
        for env in envs:
            assert env == wanted[kind], (kind, env)


def _with_haproxy(config: dict) -> None:
    """The README's opt-in: SERVE_HAPROXY_ENV beside the settings already in Serve's controller options and in the
    application's runtime_env."""
    from deployments.app import SERVE_HAPROXY_ENV

    config["controller_options"]["runtime_env"]["env_vars"].update(SERVE_HAPROXY_ENV)
    for app in config["applications"]:
        app["runtime_env"]["env_vars"].update(SERVE_HAPROXY_ENV)


def _check_haproxy(root_pid: int) -> None:
    """HAProxy runs, and the ingress answers HTTP itself: it listens on a port of Serve's direct-ingress range
    (30000-31000). Serve's Python proxy still runs beside them (HAProxy's fallback), idle."""
    import psutil

    haproxy, ingress_ports = False, set()
    for child in psutil.Process(root_pid).children(recursive=True):
        try:
            argv = child.cmdline()
            title = argv[0] if argv else ""
            haproxy = haproxy or title.endswith("/haproxy")
            if title.startswith("ray::ServeReplica:hotswap:Ingress"):
                ingress_ports |= {c.laddr.port for c in child.net_connections(kind="tcp")
                                  if c.status == psutil.CONN_LISTEN}
        except psutil.Error:
            continue
    assert haproxy, "no haproxy process"
    assert any(30000 <= port <= 31000 for port in ingress_ports), sorted(ingress_ports)


@pytest.mark.parametrize("proxy", ["serve", "haproxy"])
def test_serve_run_serve_config_answers_a_completion(tmp_path, proxy):
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    if proxy == "haproxy":
        _with_haproxy(config)
    port = free_port()
    config["http_options"]["port"] = port
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    # nothing from this shell: the settings the processes run with must come from the config
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_") and k != "RAY_ADDRESS"}
    env["HOTSWAP_CACHE_DIR"] = str(tmp_path / "cache")
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
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                          json={"prompt": "Hello, hotswap", "max_tokens": 8, "temperature": 0, "stream": True}) as r:
            assert r.status_code == 200 and r.headers["x-adapter-uri"] == "demo/v1"
            text = "".join(r.iter_text())
        assert text.rstrip().endswith("data: [DONE]"), text
        if proxy == "serve":
            _check_fast_path(proc.pid)
        else:
            _check_haproxy(proc.pid)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()
