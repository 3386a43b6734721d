"""The ``hotswap`` command line.

Commands that need only the adapter store and the settings run here without a cluster:
``push`` uploads an adapter folder, ``validate`` runs the exact checks a roll runs, against
the settings of a Serve config (``--config serve_config.yaml``) or the defaults.
Exit codes: 0 success, 1 the adapter was rejected or could not be read, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from hotswap.errors import AdapterError, ConfigError, HotswapError

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
    return HotswapSettings.from_args(apps[0].get("args") or {})


def _cmd_push(args) -> int:
    from hotswap.store import AdapterFetcher

    settings = load_settings(args.config)
    AdapterFetcher.from_settings(settings).push(Path(args.local_dir), args.uri)
    print(f"pushed {args.local_dir} -> {args.uri}")
    return EXIT_OK


def _cmd_validate(args) -> int:
    from hotswap.adapters import model_spec_for, prepare_adapter
    from hotswap.engine import resolve_device_dtype

    settings = load_settings(args.config)
    _, dtype = resolve_device_dtype(settings)
    staged = prepare_adapter(args.uri, settings=settings, spec=model_spec_for(settings), dtype=dtype)
    report = {
        "adapter_uri": staged.identity.uri,
        "adapter_sha256": staged.identity.sha256,
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
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hotswap",
        description="Manage hotswap LoRA adapters: upload them to the store and validate them against a "
        "service's settings.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    push = sub.add_parser("push", help="upload an adapter folder to the store (s3://bucket/prefix or a local path)")
    push.add_argument("local_dir", metavar="LOCAL_DIR", help="folder with adapter_config.json and "
                      "adapter_model.safetensors")
    push.add_argument("uri", metavar="URI", help="destination, e.g. s3://bucket/adapters/support/v3")
    push.add_argument("--config", metavar="SERVE_CONFIG", help="take store settings from this Serve config")
    push.set_defaults(func=_cmd_push)

    validate = sub.add_parser("validate", help="fetch and validate an adapter exactly as a roll would, without "
                              "touching the service")
    validate.add_argument("uri", metavar="URI")
    validate.add_argument("--config", metavar="SERVE_CONFIG", help="validate against this Serve config's settings "
                          "(base_model, max_rank, target_modules); defaults otherwise")
    validate.add_argument("--json", action="store_true", help="print the result as JSON")
    validate.set_defaults(func=_cmd_validate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"hotswap {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (AdapterError, HotswapError) as e:
        print(f"hotswap {args.command}: error: {e}", file=sys.stderr)
        return EXIT_REJECTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
