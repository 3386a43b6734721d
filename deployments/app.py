"""``build_app``: the Serve application that ``serve run serve_config.yaml`` starts."""

from __future__ import annotations

from ray.serve import Application

from deployments.ingress import Ingress
from deployments.replica import ModelReplica
from hotswap.settings import HotswapSettings

__all__ = ["build_app"]


def build_app(
    args: dict | None = None,
    *,
    replica_options: dict | None = None,
    ingress_options: dict | None = None,
    replica_class=None,
) -> Application:
    """Validate ``applications[].args`` (unknown keys are an error naming the key) and bind the app.

    Replica count and resources come from the Serve config's ``deployments:`` overrides
    (deployment names ``ModelReplica`` and ``Ingress``); ``replica_options`` does the same from Python
    (``serve.run`` has no overrides), e.g. ``{"num_replicas": 3}``; ``replica_class`` replaces the
    replica deployment (tests inject faults through it).
    """
    settings = HotswapSettings.from_args(args)
    replica = replica_class or ModelReplica
    replica = replica.options(**replica_options) if replica_options else replica
    ingress = Ingress.options(**ingress_options) if ingress_options else Ingress
    return ingress.bind(replica.bind(settings), settings)
