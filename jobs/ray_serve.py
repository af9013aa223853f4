"""The search service as a Ray Serve application: N replicas of the same FastAPI app `vitaclip serve` runs.

Each replica opens the outputs itself (indexes are memory-mapped, so replicas on one node share their pages) and
answers through `index.api.create_app`, so the input checks, limits and routes are the ones of the single-process
service. Started by ``vitaclip serve --ray-serve --replicas N`` or by a Serve config file (``serve run
infra/serve/search.yaml``) through `app_builder`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ray import serve

from index.service import SearchService, ServiceLimits, open_service, parse_index_specs, single_query_threads
from vitaclip.redact import endpoint_without_userinfo

DEPLOYMENT_NAME = "VitaclipSearch"


@dataclass(frozen=True)
class ServeOptions:
    """What every replica opens, and how many replicas with how much of a node each."""

    indexes: Sequence[str]
    model: str | None = None
    checkpoint: str | None = None
    device: str | None = None
    s3_endpoint_url: str | None = None
    replicas: int = 2
    num_cpus_per_replica: float = 1.0
    num_gpus_per_replica: float = 0.0
    limits: dict[str, Any] = field(default_factory=dict)  # ServiceLimits fields
    reload_seconds: float = 60.0  # each replica loads an output again when a run updated its index
    # The address Serve's HTTP proxy listens on (`run` sets it): on a loopback address the replicas answer only
    # loopback Host names and `limits.allowed_hosts` (DNS rebinding, as `vitaclip serve`); None (a Serve config
    # file's proxy on 0.0.0.0): only `limits.allowed_hosts` when given, any name otherwise.
    proxy_host: str | None = None

    def __post_init__(self) -> None:
        parse_index_specs(self.indexes)  # names checked before any replica starts
        if self.s3_endpoint_url:  # userinfo dropped here: never recorded, logged or sent
            object.__setattr__(self, "s3_endpoint_url", endpoint_without_userinfo(self.s3_endpoint_url))
        if not math.isfinite(self.reload_seconds) or self.reload_seconds < 0:
            raise ValueError(f"reload_seconds must be a number >= 0 (0: never), got {self.reload_seconds}")
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        ServiceLimits(**self.limits)


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class SearchDeployment:
    """One replica: the outputs opened once, the API app built on them."""

    def __init__(self, options: dict[str, Any]) -> None:
        from vitaclip.redact import install_log_redaction

        opts = ServeOptions(**options)
        self.proxy_host = opts.proxy_host
        for logger in (None, "ray.serve"):  # the replica's log handlers: tracebacks may hold URLs with credentials
            install_log_redaction(logger)
        single_query_threads(torch_threads=1)  # a replica's parallelism is Serve's concurrent requests
        self.service: SearchService = open_service(
            opts.indexes,
            model=opts.model,
            checkpoint=opts.checkpoint,
            device=opts.device,
            s3_endpoint_url=opts.s3_endpoint_url,
            limits=ServiceLimits(**opts.limits),
            reload_seconds=opts.reload_seconds,
        )

    def __serve_build_asgi_app__(self) -> Any:
        from index.api import create_app, host_checked

        app = create_app(self.service)
        return host_checked(app, bind_host=self.proxy_host, allowed_hosts=self.service.limits.allowed_hosts)


def application(options: ServeOptions) -> Any:
    """The Serve application (``serve.run(application(...))``) with `options.replicas` replicas."""
    actor: dict[str, Any] = {"num_cpus": options.num_cpus_per_replica}
    if options.num_gpus_per_replica:
        actor["num_gpus"] = options.num_gpus_per_replica
    deployment = SearchDeployment.options(num_replicas=options.replicas, ray_actor_options=actor)  # type: ignore[attr-defined]
    return deployment.bind(asdict(options))


def app_builder(args: dict[str, Any]) -> Any:
    """Builds the application from a Serve config's ``args`` (the `ServeOptions` fields)."""
    return application(ServeOptions(**args))


APP_NAME = "vitaclip-search"


def run(options: ServeOptions, *, host: str = "127.0.0.1", port: int = 8000, blocking: bool = True) -> Any:
    """Starts Serve's HTTP proxy on `host`:`port` and the application on the connected Ray cluster."""
    serve.start(http_options={"host": host, "port": port})
    return serve.run(application(replace(options, proxy_host=host)), name=APP_NAME, route_prefix="/", blocking=blocking)


def stop() -> None:
    """Deletes the application, and stops Serve (its proxy frees the port) when no other application runs: a
    service started on a cluster by ``vitaclip serve --ray-serve`` ends with its command, as a local one does."""
    if APP_NAME in serve.status().applications:
        serve.delete(APP_NAME)
    if not serve.status().applications:
        serve.shutdown()
