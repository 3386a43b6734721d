"""The ``hotswap`` command line.

``roll``, ``promote``, ``rollback`` and ``status`` talk to the running service's controller
(through the Ray cluster at ``RAY_ADDRESS`` or the local one). ``push`` and ``validate``
need no cluster: they use the store and the settings of a Serve config (``--config``).
Exit codes: 0 success; 1 rejected, failed and reverted, or refused; 2 bad arguments or no service;
3 the controller died mid-call or is still starting (``hotswap status`` says where it stands).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from hotswap.errors import ConfigError, HotswapError

__all__ = ["main"]

EXIT_OK, EXIT_REJECTED, EXIT_USAGE = 0, 1, 2


def load_settings(config_path: str | None, app_name: str | None = None):
    """Settings from ``applications[].args`` of a Serve config file, or the defaults when no file is given."""
    from hotswap.settings import HotswapSettings

    if config_path is None:
        return HotswapSettings()
    import yaml

    path = Path(config_path)
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read Serve config {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"Serve config {path} is not valid YAML: {e}") from e
    apps = (document or {}).get("applications") if isinstance(document, dict) else None
    if not isinstance(apps, list) or not apps:
        raise ConfigError(f"Serve config {path} has no 'applications' list")
    if app_name is not None:
        apps = [a for a in apps if isinstance(a, dict) and a.get("name") == app_name]
        if not apps:
            raise ConfigError(f"Serve config {path} has no application named {app_name!r}")
    app = apps[0]
    if not isinstance(app, dict):
        raise ConfigError(f"Serve config {path}: each entry of 'applications' must be a mapping (name, import_path, "
                          f"args, ...), got {type(app).__name__} {app!r}")
    args = app.get("args") or {}
    if not isinstance(args, dict):
        raise ConfigError(f"Serve config {path}: application {app.get('name')!r} has 'args' of type "
                          f"{type(args).__name__}; it must be a mapping of hotswap settings")
    return HotswapSettings.from_args(args)


def _cmd_push(args) -> int:
    from hotswap.store import AdapterFetcher

    settings = load_settings(args.config)
    fetcher = AdapterFetcher.from_settings(settings)
    if args.sign_key is not None:
        from hotswap.signing import SIGNATURE_NAME, claimed_key_id, sign_adapter_dir

        fetcher.store_for(args.uri)  # refuse a bad destination before writing model.sig
        signature = sign_adapter_dir(Path(args.local_dir), Path(args.sign_key))
        print(f"signed {args.local_dir} with key {claimed_key_id(signature)} -> "
              f"{Path(args.local_dir) / SIGNATURE_NAME}")
    fetcher.push(Path(args.local_dir), args.uri)
    print(f"pushed {args.local_dir} -> {args.uri}")
    return EXIT_OK


def _signature_report(fetched, settings) -> dict:
    """Apply the signature policy (raises when it refuses) and say what it found, for ``validate``."""
    from hotswap.signing import check_signature, claimed_key_id

    check = check_signature(fetched, fetched.signature, settings)
    if check is not None:
        return {"status": "verified", "key_id": check.key_id, "key_source": check.key_source}
    if fetched.signature is None:
        return {"status": "unsigned", "key_id": None, "key_source": None}
    return {"status": "unverified", "key_id": claimed_key_id(fetched.signature), "key_source": None}


def _describe_signature(report: dict) -> str:
    if report["status"] == "verified":
        return f"verified, signed by key {report['key_id']} ({report['key_source']})"
    if report["status"] == "unsigned":
        return "none (no model.sig)"
    return f"not verified (no trusted_public_keys); model.sig claims key {report['key_id']}"


def _cmd_validate(args) -> int:
    from hotswap.adapters import model_spec_for, resolve_adapter_uri, validate_fetched
    from hotswap.engine import resolve_device_dtype
    from hotswap.staging import stage_adapter
    from hotswap.store import AdapterFetcher
    from hotswap.versions import config_digest

    settings = load_settings(args.config)
    if args.trusted_key:
        settings = settings.model_copy(update={"trusted_public_keys": (*settings.trusted_public_keys,
                                                                       *args.trusted_key)})
    _, dtype = resolve_device_dtype(settings)
    spec = model_spec_for(settings)
    # the order of a roll: fetch, signature, validate, stage
    fetched = AdapterFetcher.from_settings(settings).fetch(resolve_adapter_uri(args.uri, settings))
    signature = _signature_report(fetched, settings)
    staged = stage_adapter(validate_fetched(fetched, settings=settings, spec=spec), spec, dtype=dtype)
    report = {
        "adapter_uri": staged.identity.uri,
        "adapter_sha256": staged.identity.sha256,
        "config_sha256": config_digest(fetched.config_bytes),
        "signature": signature,
        "r": staged.rank,
        "lora_alpha": staged.lora_alpha,
        "use_rslora": staged.use_rslora,
        "target_modules": list(staged.target_modules),
        "layers": len(staged.layer_indices),
        "bytes": staged.nbytes,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(
            f"ok: {report['adapter_uri']} sha256 {report['adapter_sha256']} r={report['r']} "
            f"alpha={report['lora_alpha']} on {report['layers']} layers ({', '.join(report['target_modules'])})"
        )
        print(f"  adapter_model.safetensors sha256 {report['adapter_sha256']}")
        print(f"  adapter_config.json       sha256 {report['config_sha256']}")
        print(f"  signature: {_describe_signature(signature)}")
        print(f"  pin it: hotswap roll {report['adapter_uri']} --sha256 {report['adapter_sha256']}")
    return EXIT_OK


def _client(args):
    from hotswap.client import HotswapClient

    return HotswapClient(args.app)


def _progress(line: str) -> None:
    print(f"  {line}", flush=True)


def _print_result(verb: str, result: dict) -> None:
    version = result["version"]
    swapped = len(result["swapped"])
    print(f"{verb} {version['uri']} (sha256 {version['sha256'][:12]}): {swapped} replica(s) swapped in "
          f"{result['ms']:.0f} ms")


def _cmd_roll(args) -> int:
    what = f"canary {args.canary}% of replicas" if args.canary is not None else "every replica"
    pinned = f" (pinned to sha256 {args.sha256[:12]})" if args.sha256 else ""
    print(f"rolling {args.uri}{pinned} to {what}", flush=True)
    _print_result("rolled", _client(args).roll(args.uri, canary=args.canary, sha256=args.sha256,
                                               on_event=_progress))
    return EXIT_OK


def _cmd_promote(args) -> int:
    _print_result("promoted", _client(args).promote(on_event=_progress))
    return EXIT_OK


def _cmd_rollback(args) -> int:
    _print_result("rolled back to", _client(args).rollback(on_event=_progress))
    return EXIT_OK


def _cmd_status(args) -> int:
    status = _client(args).status()
    if args.json:
        print(json.dumps(status, indent=2))
        return EXIT_OK

    def short(v):
        return f"{v['uri']} ({v['sha256'][:12]})" if v else "none"

    if not status.get("ready", True):
        print(f"app {status['app']}   controller {status.get('controller')} is starting: waiting for "
              f"{status['waiting_for']}")
        return EXIT_OK
    print(f"app {status['app']}   stable: {short(status['stable'])}   canary: {short(status['canary'])}")
    if status.get("fenced") or status.get("retired"):
        print(f"controller {status['controller']} serves no operation: {status.get('fenced') or status['retired']}")
    def ms(value) -> str:
        return "-" if value is None else f"{value:.2f}"

    def slots(r) -> str:  # "0*:v2 1:v1(3)": * the active slot, (n) rows still reading it
        out = []
        for slot in r.get("slots") or ():
            sha = (slot.get("adapter_sha256") or "")[:8] or ("base" if slot.get("adapter_uri") else "empty")
            rows = f"({slot['rows']})" if slot.get("rows") else ""
            out.append(f"{slot['slot']}{'*' if slot.get('active') else ''}:{sha}{rows}")
        return " ".join(out) or "-"

    rows = [("REPLICA", "ADAPTER", "SHA256", "SWAPS", "LAST_SWAP_MS", "LAST_DRAIN_MS", "SLOTS", "GRAPHS", "LIVE")]
    for r in status["replicas"]:
        rows.append((r["id"], r["adapter_uri"], r["adapter_sha256"][:12], str(r["swaps"]), ms(r["last_swap_ms"]),
                     ms(r.get("last_drain_ms")), slots(r), str(r["compiled_graphs"]), "yes" if r["live"] else "no"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    rollout = status["rollout"]
    print(f"rollout: {rollout['kind']} of {rollout['version']['uri']} ({len(rollout['done'])}/"
          f"{len(rollout['targets'])})" if rollout else "rollout: none")
    for entry in status["history"][-5:]:
        print(f"  {entry['kind']:8} {entry['result']:8} {entry['uri']} {entry.get('reason', '')}".rstrip())
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hotswap",
        description="Roll LoRA adapter versions into a running hotswap service (A/B canary, promote, "
        "rollback), and manage the adapter store.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def operation(name: str, help_: str):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--app", default="hotswap", help="Serve application name (default: hotswap)")
        return p

    roll = operation("roll", "fetch, validate and stage an adapter once, then swap it into replicas in order")
    roll.add_argument("uri", metavar="URI", help="s3://bucket/prefix or a path under the local store root")
    roll.add_argument("--canary", type=_percent, metavar="PERCENT",
                      help="move only this share of replicas (at least one); the rest stay on stable")
    roll.add_argument("--sha256", type=_pin, metavar="HEX",
                      help="refuse the roll unless adapter_model.safetensors has this sha256 (64 lowercase hex "
                      "digits; 'hotswap validate URI' prints it)")
    roll.set_defaults(func=_cmd_roll)
    operation("promote", "move every replica to the canary version; it becomes stable").set_defaults(
        func=_cmd_promote)
    operation("rollback", "canary active: its replicas return to stable; otherwise every replica returns to the "
              "previous stable version").set_defaults(func=_cmd_rollback)
    status = operation("status", "what every replica runs, the stable and canary versions, the history")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.set_defaults(func=_cmd_status)

    push = sub.add_parser("push", help="upload an adapter folder to the store (s3://bucket/prefix or a local path)")
    push.add_argument("local_dir", metavar="LOCAL_DIR", help="folder with adapter_config.json and "
                      "adapter_model.safetensors")
    push.add_argument("uri", metavar="URI", help="destination, e.g. s3://bucket/adapters/support/v3")
    push.add_argument("--config", metavar="SERVE_CONFIG", help="take store settings from this Serve config")
    push.add_argument("--sign-key", metavar="KEY.pem", help="sign the adapter (OpenSSF model signing, PEM "
                      "elliptic-curve private key) into LOCAL_DIR/model.sig, then upload it with the adapter")
    push.set_defaults(func=_cmd_push)

    validate = sub.add_parser("validate", help="fetch and validate an adapter exactly as a roll would, without "
                              "touching the service")
    validate.add_argument("uri", metavar="URI")
    validate.add_argument("--config", metavar="SERVE_CONFIG", help="validate against this Serve config's settings "
                          "(base_model, max_rank, target_modules); defaults otherwise")
    validate.add_argument("--trusted-key", action="append", default=[], metavar="PUB.pem",
                          help="also trust this PEM public key (path or s3:// URI) when checking model.sig; "
                          "repeatable, added to the config's trusted_public_keys")
    validate.add_argument("--json", action="store_true", help="print the result as JSON")
    validate.set_defaults(func=_cmd_validate)
    return parser


def _pin(text: str) -> str:
    from hotswap.signing import check_pin

    try:
        return check_pin(text, what="--sha256")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _percent(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--canary takes a percentage such as 10 or 33.3, got {text!r}") from None
    if not 0 < value <= 100:
        raise argparse.ArgumentTypeError(f"--canary must be in (0, 100], got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except Exception as e:  # noqa: BLE001 - one line and an exit code per error class (hotswap.errors)
        from hotswap.errors import unwrap

        cause = unwrap(e)
        if not isinstance(cause, HotswapError):
            raise
        print(f"hotswap {args.command}: error: {cause}", file=sys.stderr)
        return cause.exit_code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
