"""``build_app``: the Serve application that ``serve run serve_config.yaml`` starts."""

from __future__ import annotations

from ray.serve import Application

from deployments.ingress import Ingress
from deployments.replica import ModelReplica
from hotswap.settings import HotswapSettings

__all__ = ["build_app", "make_app"]


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
    replica = replica.options(**replica_options) if replica_options else replica
    ingress = Ingress.options(**ingress_options) if ingress_options else Ingress
    return ingress.bind(replica.bind(settings), settings)
