"""Server lifecycle: load the bundle, warm up, serve with health and reflection, drain on SIGTERM.

The gRPC port is plaintext, TLS (``--tls-cert``/``--tls-key``) or mutual TLS (``--tls-client-ca``);
with ``--auth-tokens`` every call but health checks needs a bearer token (:mod:`.auth`).

Health is NOT_SERVING until the bundle is loaded and one warm-up batch has run, so a load
balancer or Kubernetes readiness probe never routes a batch to a cold replica. SIGTERM (or
SIGINT) flips health to NOT_SERVING, turns new batches away with UNAVAILABLE, lets queued and
in-flight batches finish within ``drain_seconds``, then stops. A bundle that contradicts the
operator's settings (PGD defaults outside the policy, an invalid feature bound) stops the start
with :class:`StartupError`, which ``serve`` turns into a one-line message and exit status 1.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass

import grpc
from advface.v1 import plugin_pb2 as pb
from advface.v1 import plugin_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from plugin_service.bundle import BundleError, load_bundle
from plugin_service.config import ServerSettings
from plugin_service.engine import Engine
from plugin_service.engine_settings import EngineSettings
from plugin_service.server.batcher import ByteBudget, DeviceQueue, Job
from advface.codec import UNARY_MAX_BYTES, BatchLimits
from plugin_service.server.auth import TokenAuthInterceptor, TokenFileError, load_tokens
from plugin_service.server.interceptors import MetricsInterceptor
from plugin_service.server.metrics import ServiceMetrics
from plugin_service.server.policy import Policy
from plugin_service.server.reflection import enable_reflection
from plugin_service.server.servicer import GuardServicer
from plugin_service.server.state import ServingState

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AdvFaceGuard"].full_name
# gRPC itself refuses messages above this multiple of --max-message-mb (killing the stream); between
# the two the service answers the message's batch INVALID_ARGUMENT and the stream goes on.
HARD_MESSAGE_LIMIT_FACTOR = 2


class StartupError(RuntimeError):
    """The server must not start; the message says why in one line."""


@dataclass
class RunningServer:
    server: grpc.aio.Server
    state: ServingState
    health: health.aio.HealthServicer
    queue: DeviceQueue
    port: int


def _model_info(engine: Engine, settings: ServerSettings, policy: Policy) -> pb.ModelInfo:
    b = engine.bundle
    return pb.ModelInfo(
        model_version=b.version, content_hash=b.content_hash, feature_shape=list(engine.feature_shape),
        feature_dtype=b.manifest.feature_dtype, split=b.manifest.split, shadow_arch=b.manifest.shadow.arch,
        protector=policy.default_protector, protector_params={k: str(v) for k, v in engine.default_params().items()},
        device=str(engine.device),
        policy=pb.Policy(protectors=list(policy.protectors), max_steps=policy.max_steps, min_eps=policy.min_eps,
                         max_eps=policy.max_eps, max_batch=policy.max_batch),
        max_message_bytes=settings.max_message_mb * 2**20, max_unary_bytes=UNARY_MAX_BYTES)


def _feature_range(feature_bound: float | None, settings: ServerSettings) -> tuple[float, float]:
    """[0, bound] from the bundle (E ends in a ReLU; fp16 rounding keeps signs), else +-max_feature_value."""
    if feature_bound is None:
        return (-settings.max_feature_value, settings.max_feature_value)
    if not 0 < feature_bound < float("inf"):
        raise StartupError(f"the bundle's feature_bound {feature_bound!r} is not a positive number")
    return (0.0, float(feature_bound))


def _interceptors(settings: ServerSettings, metrics: ServiceMetrics) -> list[grpc.aio.ServerInterceptor]:
    """Metrics outermost, so refused calls are counted with the code the caller saw."""
    interceptors: list[grpc.aio.ServerInterceptor] = [MetricsInterceptor(metrics, SERVICE_NAME)]
    if settings.auth_tokens is not None:
        methods = [m.name for m in pb.DESCRIPTOR.services_by_name["AdvFaceGuard"].methods]
        try:
            callers = load_tokens(settings.auth_tokens, methods)
        except (OSError, TokenFileError) as e:
            raise StartupError(f"cannot use the token file: {e}") from None
        interceptors.append(TokenAuthInterceptor(callers, SERVICE_NAME))
        log.info("bearer tokens required for %d caller(s): %s", len(callers), ", ".join(c.name for c in callers))
    return interceptors


def _add_port(server: grpc.aio.Server, settings: ServerSettings) -> int:
    host = f"[{settings.host}]" if ":" in settings.host and not settings.host.startswith("[") else settings.host
    address = f"{host}:{settings.port}"
    if settings.tls_cert is None:
        return server.add_insecure_port(address)
    try:
        key, chain = settings.tls_key.read_bytes(), settings.tls_cert.read_bytes()  # type: ignore[union-attr]
        client_ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
    except OSError as e:
        raise StartupError(f"cannot read a TLS file: {e}") from None
    credentials = grpc.ssl_server_credentials([(key, chain)], root_certificates=client_ca,
                                              require_client_auth=client_ca is not None)
    return server.add_secure_port(address, credentials)


async def start_server(settings: ServerSettings, metrics: ServiceMetrics | None = None,
                       engine_settings: EngineSettings = EngineSettings()) -> RunningServer:
    """Builds and starts the server; returns once it is SERVING (bundle loaded, warmed up)."""
    metrics = metrics or ServiceMetrics()
    limit = settings.max_message_mb * 2**20
    server = grpc.aio.server(
        interceptors=_interceptors(settings, metrics),
        options=[("grpc.max_receive_message_length", HARD_MESSAGE_LIMIT_FACTOR * limit),
                 ("grpc.max_send_message_length", limit),
                 # Clients reconnect (and re-resolve) periodically, so replicas added by the
                 # autoscaler get traffic from long-running clients too.
                 ("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)),
                 ("grpc.max_connection_age_grace_ms", int(settings.drain_seconds * 1000))])
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
    servicer = GuardServicer()
    pb_grpc.add_AdvFaceGuardServicer_to_server(servicer, server)
    enable_reflection((SERVICE_NAME, health.SERVICE_NAME), server)
    try:
        port = _add_port(server, settings)
    except RuntimeError as e:  # grpc.aio raises RuntimeError when it cannot bind, or the key does not fit the chain
        raise StartupError(f"cannot listen on {settings.host}:{settings.port}: {e}") from None
    if port == 0:
        raise StartupError(f"cannot listen on {settings.host}:{settings.port}")
    await server.start()  # health answers NOT_SERVING while the model loads
    if settings.metrics_port:
        try:
            metrics.serve_http(settings.metrics_port, settings.metrics_host or settings.host)
        except OSError as e:
            await server.stop(0)
            raise StartupError(f"cannot serve metrics on {settings.metrics_host or settings.host}:"
                               f"{settings.metrics_port}: {e}") from None

    loop = asyncio.get_running_loop()
    try:
        try:
            bundle = await loop.run_in_executor(None, load_bundle, settings.bundle)
        except BundleError as e:
            raise StartupError(f"cannot load the bundle: {e}") from None
        policy = Policy(settings.allowed_protectors, settings.max_steps, settings.min_eps, settings.max_eps,
                        settings.max_batch, default_protector=settings.allowed_protectors[0])
        pgd = bundle.manifest.pgd
        if (problem := policy.check_defaults(pgd.steps, pgd.eps)) is not None:
            raise StartupError(f"refusing to serve bundle {bundle.version}: {problem}")
        if "resynth" in policy.protectors and bundle.manifest.recognizer is None:
            raise StartupError(f"refusing to offer resynth: bundle {bundle.version} carries no recogniser R; add it with "
                               "`advface bundle-add-recognizer` or drop resynth from --protectors")
        value_range = _feature_range(bundle.manifest.feature_bound, settings)
    except StartupError:
        await server.stop(0)
        raise
    engine = Engine(bundle, settings.device, settings.torch_threads, engine_settings)
    metrics.device_capacity.set(engine.memory_capacity())

    def run(job: Job):  # noqa: ANN202 - EngineResult, kept out of the server's imports' concerns
        result = engine.protect(job.features, job.protector, job.params)
        metrics.device_memory.set(engine.peak_memory())
        return result

    queue = DeviceQueue(run, settings.queue_size, settings.workers, metrics)
    queue.start()
    info = _model_info(engine, settings, policy)
    budget_bytes = settings.memory_budget_mb * 2**20
    limits = BatchLimits(engine.feature_shape, settings.max_batch, max_batch_bytes=budget_bytes, value_range=value_range)
    state = ServingState(queue, ByteBudget(budget_bytes, metrics), policy, limits, metrics, info,
                         settings.chunk_kb * 1024, stream_window=settings.queue_size + 2, max_message_bytes=limit,
                         chunk_timeout=settings.chunk_timeout_s, max_streams=settings.max_streams,
                         max_reassembling=settings.max_reassembling)
    servicer.ready(state)
    seconds = await loop.run_in_executor(None, engine.warm_up, settings.warmup_faces)
    metrics.info.info({"model_version": bundle.version, "protector": policy.default_protector,
                       "device": str(engine.device), "shadow_arch": bundle.manifest.shadow.arch})
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    transport = "mutual TLS" if settings.tls_client_ca else "TLS" if settings.tls_cert else "plaintext"
    log.info("serving bundle %s (%s shadow) on %s:%d (%s%s), device %s, warm-up %.2fs%s", bundle.version,
             bundle.manifest.shadow.arch, settings.host, port, transport,
             ", bearer tokens" if settings.auth_tokens else "", engine.device, seconds,
             f", metrics on {settings.metrics_host or settings.host}:{settings.metrics_port}/metrics"
             if settings.metrics_port else "")
    return RunningServer(server, state, health_servicer, queue, port)


async def drain_and_stop(running: RunningServer, grace: float) -> None:
    """Stops taking batches, lets queued and in-flight ones finish, then stops the server."""
    log.info("draining: health NOT_SERVING, new batches refused, up to %.0fs for in-flight batches", grace)
    running.state.draining = True
    await running.health.enter_graceful_shutdown()
    # stop() sends GOAWAY at once, so clients open new streams on other replicas, and waits up to
    # `grace` for the calls already open; their queued batches still run.
    await running.server.stop(grace)
    try:
        await asyncio.wait_for(running.queue.join(), timeout=1.0)
    except TimeoutError:
        log.warning("drain ended after %.0fs with batches still queued", grace)
    await running.queue.close()
    log.info("stopped")


async def serve(settings: ServerSettings, engine_settings: EngineSettings = EngineSettings()) -> None:
    try:
        running = await start_server(settings, engine_settings=engine_settings)
    except StartupError as e:
        raise SystemExit(f"advface serve: {e}") from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await drain_and_stop(running, settings.drain_seconds)
