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


def _check_fast_path(root_pid: int, *, proxy: bool = True) -> None:
    """Serve's HTTP proxy runs with SERVE_PROXY_ENV (the config's controller_options: gRPC to the ingress) and the
    ingress and the model replicas with SERVE_FAST_PATH_ENV (the application's runtime_env); ``proxy=False``: the
    deployments only (in HAProxy mode the proxy is a backup that serves nothing once the ingress is up)."""
    import psutil

    from deployments.app import SERVE_FAST_PATH_ENV, SERVE_PROXY_ENV

    wanted = {"ray::ServeReplica:hotswap:Ingress": SERVE_FAST_PATH_ENV,
              "ray::ServeReplica:hotswap:ModelReplica": SERVE_FAST_PATH_ENV}
    if proxy:
        wanted["ray::ProxyActor"] = SERVE_PROXY_ENV
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


def _haproxy_direct(root_pid: int, port: int) -> tuple[int, frozenset[int]]:
    """HAProxy takes the config's HTTP port and the ingress answers HTTP itself on a port of Serve's direct-ingress
    range (30000-31000) on the config's host; returns the requests HAProxy sent that port so far. (Serve's Python
    proxy still runs beside them as HAProxy's backup server: requests sent before the ingress passed its health
    checks go there.) Also the HAProxy processes' ids: Serve reloads HAProxy on a routing change, and the new
    process counts from 0."""
    import socket

    import psutil

    haproxy_ports, ingress, configs, pids = set(), set(), set(), set()
    for child in psutil.Process(root_pid).children(recursive=True):
        try:
            argv = child.cmdline()
            title = argv[0] if argv else ""
            listening = {(c.laddr.ip, c.laddr.port) for c in child.net_connections(kind="tcp")
                         if c.status == psutil.CONN_LISTEN}
        except psutil.Error:
            continue
        if title.endswith("/haproxy"):
            haproxy_ports |= {p for _, p in listening}
            pids.add(child.pid)
            configs |= {argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-f"}
        elif title.startswith("ray::ServeReplica:hotswap:Ingress"):
            ingress |= {(ip, p) for ip, p in listening if 30000 <= p <= 31000}
    assert port in haproxy_ports, (port, sorted(haproxy_ports))
    assert ingress and all(ip == "127.0.0.1" for ip, _ in ingress), ingress  # the config's host, not all interfaces
    # its admin socket, as its config names it (Serve keeps one folder per node)
    (config,) = configs
    (admin_path,) = {line.split()[2] for line in Path(config).read_text().splitlines()
                     if line.strip().startswith("stats socket")}
    with socket.socket(socket.AF_UNIX) as admin:
        admin.connect(admin_path)
        admin.sendall(b"show stat\n")
        raw = b""
        while chunk := admin.recv(65536):
            raw += chunk
    lines = raw.decode().splitlines()
    header = lines[0].lstrip("# ").split(",")
    rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]
    servers = [row for row in rows if row.get("svname") not in ("FRONTEND", "BACKEND")]
    direct = [row for row in servers if row.get("addr") in {f"{ip}:{p}" for ip, p in ingress}]
    assert direct, [(row.get("pxname"), row.get("addr")) for row in servers]
    # HAProxy sends requests there once its health checks pass (before, they go to the backup)
    assert all(row.get("status", "").startswith("UP") for row in direct), [row.get("status") for row in direct]
    return sum(int(row["stot"] or 0) for row in direct), frozenset(pids)  # over every backend naming the ingress


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
        direct_before, haproxy_pids = 0, frozenset()
        if proxy == "haproxy":  # HAProxy may still be taking the ingress into rotation when /healthz answers
            def direct_up() -> bool:
                nonlocal direct_before, haproxy_pids
                try:
                    direct_before, haproxy_pids = _haproxy_direct(proc.pid, port)
                except (AssertionError, OSError, ValueError):
                    return False
                return True

            wait_for_condition(direct_up, timeout_s=60, interval_s=0.5, message="HAProxy to route to the ingress")
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
        _check_fast_path(proc.pid, proxy=proxy == "serve")
        if proxy == "haproxy":  # the completion and the stream went from HAProxy straight to the ingress
            direct_after, pids_after = _haproxy_direct(proc.pid, port)
            if pids_after == haproxy_pids:  # else HAProxy was reloaded in between: its counters started again
                assert direct_after - direct_before >= 2
            else:  # once more on the new process: one completion, counted
                direct_before, haproxy_pids = direct_after, pids_after
                assert httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                                  json={"prompt": "again", "max_tokens": 2}).status_code == 200
                direct_after, pids_after = _haproxy_direct(proc.pid, port)
                assert pids_after == haproxy_pids and direct_after - direct_before >= 1
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()
