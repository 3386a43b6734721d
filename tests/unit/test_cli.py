"""The ``hotswap`` console script, run as a user runs it (a subprocess on the installed entry point)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest


def _run(*args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    exe = shutil.which("hotswap")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "hotswap.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def serve_config(tmp_path_factory, base_settings):
    path = tmp_path_factory.mktemp("cli") / "serve_config.yaml"
    path.write_text(
        "applications:\n"
        "  - name: hotswap\n"
        "    import_path: deployments.app:build_app\n"
        "    args:\n"
        f"      cache_dir: {base_settings.cache_dir}\n"
        f"      local_store_root: {base_settings.store_root}\n"
        "      max_rank: 16\n"
    )
    return path


def test_help():
    result = _run("--help")
    assert result.returncode == 0
    assert "push" in result.stdout and "validate" in result.stdout


def test_validate_ok_and_json(serve_config, make_adapter):
    make_adapter("cli-good", r=4, seed=41)
    result = _run("validate", "cli-good", "--config", str(serve_config), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["r"] == 4 and len(report["adapter_sha256"]) == 64


def test_validate_rejection_is_one_line_naming_adapter_and_problems(serve_config, make_adapter, store_root):
    good = make_adapter("cli-good", r=4, seed=41)
    bad = store_root / "cli-bad"
    shutil.copytree(good, bad, dirs_exist_ok=True)
    config = json.loads((bad / "adapter_config.json").read_text())
    config.update(use_dora=True, r=99)
    (bad / "adapter_config.json").write_text(json.dumps(config))
    result = _run("validate", "cli-bad", "--config", str(serve_config))
    assert result.returncode == 1
    line = result.stderr.strip()
    assert "\n" not in line and "cli-bad" in line and "DoRA" in line and "max_rank=16" in line


def test_push_then_validate(serve_config, make_adapter):
    good = make_adapter("cli-good", r=4, seed=41)
    result = _run("push", str(good), "pushed/cli/v1", "--config", str(serve_config))
    assert result.returncode == 0, result.stderr
    assert _run("validate", "pushed/cli/v1", "--config", str(serve_config)).returncode == 0


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("validate", "x", "--config", "/no/such.yaml"), 2, "cannot read Serve config"),
        (("push", "/no/such/dir", "x/v1"), 2, "not an adapter folder"),
        (("frobnicate",), 2, "invalid choice"),
        (("validate", "missing/v1"), 1, "adapter not found"),
    ],
)
def test_bad_arguments_get_a_clear_error(args, code, message, tmp_path):
    result = _run(*args, env_extra={"HOTSWAP_CACHE_DIR": str(tmp_path)})
    assert result.returncode == code
    assert message in result.stderr


@pytest.mark.parametrize(("body", "message"), [
    ("applications:\n  - hotswap\n", "each entry of 'applications' must be a mapping"),
    ("applications:\n  - name: hotswap\n    args: [max_rank, 16]\n", "'args' of type list"),
])
def test_a_malformed_serve_config_is_a_config_error_not_a_traceback(tmp_path, make_adapter, body, message):
    """An outside review: an application given as a string crashed ``validate`` with an AttributeError traceback
    (exit 1); it is a configuration error naming the entry (exit 2, as every other bad config)."""
    path = tmp_path / "serve_config.yaml"
    path.write_text(body)
    result = _run("validate", str(make_adapter("cli-bad-config")), "--config", str(path))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
