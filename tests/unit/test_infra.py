"""The Serve configs and the KubeRay manifest parse, and their app args validate against the app's model."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hotswap.settings import HotswapSettings

ROOT = Path(__file__).resolve().parents[2]


def _check_serve_config(document: dict) -> None:
    from ray.serve.schema import ServeDeploySchema

    from deployments.app import SERVE_CONTROLLER_OPTIONS, SERVE_FAST_PATH_ENV

    ServeDeploySchema.model_validate(document) if hasattr(ServeDeploySchema, "model_validate") else (
        ServeDeploySchema.parse_obj(document))
    for app in document["applications"]:
        assert app["import_path"] == "deployments.app:build_app"
        HotswapSettings.from_args(app["args"])
        names = {d["name"] for d in app.get("deployments", [])}
        assert names <= {"ModelReplica", "Ingress"}, names
        # a config's ray_actor_options replace the code's runtime_env: the app's runtime_env carries the fast path
        assert app["runtime_env"]["env_vars"] == SERVE_FAST_PATH_ENV
    # ... and Serve's controller, whose runtime_env the HTTP proxy inherits
    assert document["controller_options"] == SERVE_CONTROLLER_OPTIONS


@pytest.mark.parametrize("path", ["serve_config.yaml", "infra/serve_config.gpu.yaml"])
def test_serve_configs_validate(path):
    _check_serve_config(yaml.safe_load((ROOT / path).read_text()))


def test_rayservice_embeds_the_gpu_serve_config():
    manifest = yaml.safe_load((ROOT / "infra/rayservice.yaml").read_text())
    assert manifest["kind"] == "RayService"
    embedded = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    _check_serve_config(embedded)
    del embedded["applications"][0]["args"]["state_uri"]  # the one difference (next test)
    assert embedded == yaml.safe_load((ROOT / "infra/serve_config.gpu.yaml").read_text())
    groups = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert any(c["resources"]["limits"].get("nvidia.com/gpu") for g in groups
               for c in g["template"]["spec"]["containers"])


def test_rayservice_keeps_the_controller_state_in_s3_next_to_the_adapters():
    """More than one node: the controller may start on, or move to, any node, so its state cannot be a local file."""
    manifest = yaml.safe_load((ROOT / "infra/rayservice.yaml").read_text())
    args = yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"][0]["args"]
    settings = HotswapSettings.from_args(args)
    assert settings.state_uri and settings.state_uri.startswith("s3://"), settings.state_uri
    bucket = settings.state_uri.removeprefix("s3://").split("/")[0]
    assert bucket == str(settings.initial_adapter).removeprefix("s3://").split("/")[0]
    # control: without the key the state would go to a file under cache_dir, on whichever node the controller is
    del args["state_uri"]
    assert HotswapSettings.from_args(args).state_uri is None


def test_default_serve_config_runs_without_gpu_or_s3():
    args = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]["args"]
    settings = HotswapSettings.from_args(args)
    assert settings.base_model.startswith("builtin:") and settings.device == "cpu"
    assert not str(settings.initial_adapter).startswith("s3://")


def test_unknown_app_arg_is_an_error_naming_it():
    from hotswap.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown key 'inital_adapter'"):
        HotswapSettings.from_args({"inital_adapter": "s3://x/y"})


def test_build_app_is_callable_the_way_serve_run_calls_it():
    """serve run passes the args dict to a builder that must take exactly one parameter."""
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from deployments.app import build_app

    args = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]["args"]
    assert isinstance(call_user_app_builder_with_args_if_necessary(build_app, args), Application)


def test_make_app_puts_the_fast_path_in_every_deployments_runtime_env_and_keeps_the_callers_values():
    from deployments.app import SERVE_FAST_PATH_ENV, _fast_path
    from deployments.ingress import Ingress
    from deployments.replica import ModelReplica

    replica = _fast_path(ModelReplica, {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.5}})
    assert replica.num_replicas == 2 and replica.ray_actor_options["num_cpus"] == 0.5
    assert replica.ray_actor_options["runtime_env"]["env_vars"] == SERVE_FAST_PATH_ENV
    ingress = _fast_path(Ingress, {})
    assert ingress.ray_actor_options["num_cpus"] == 0.1  # the code's own options are kept
    assert ingress.ray_actor_options["runtime_env"]["env_vars"] == SERVE_FAST_PATH_ENV
    mine = {"RAY_SERVE_USE_GRPC_BY_DEFAULT": "0", "OTHER": "1"}
    options = {"ray_actor_options": {"num_cpus": 0.2, "runtime_env": {"env_vars": mine, "pip": ["x"]}}}
    custom = _fast_path(ModelReplica, options).ray_actor_options["runtime_env"]
    assert custom["env_vars"] == {**SERVE_FAST_PATH_ENV, **mine} and custom["pip"] == ["x"]
