"""Service settings: one typed object, filled from flags, then environment, then defaults.

Every field documents itself once (its ``help``); the CLI builds ``advface serve``'s flags and
the environment variable names (``ADVFACE_<FIELD>``) from these fields, so flags, env vars
and ``--help`` cannot drift apart.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any


def _opt(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 - mirrors argparse
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class ServerSettings:
    bundle: Path | None = _opt(None, "model bundle directory (default: the bundle embedded in the package)")
    host: str = _opt("0.0.0.0", "address to listen on for gRPC")
    port: int = _opt(50051, "gRPC port")
    metrics_port: int = _opt(9464, "Prometheus /metrics HTTP port (0 disables the endpoint)")
    metrics_host: str = _opt("", "address the /metrics endpoint listens on, e.g. an internal interface or 127.0.0.1 "
                             "(empty: the gRPC --host); it is plain HTTP without authentication")
    tls_cert: Path | None = _opt(None, "PEM certificate chain for TLS on the gRPC port (with --tls-key); unset: plaintext")
    tls_key: Path | None = _opt(None, "PEM private key of --tls-cert")
    tls_client_ca: Path | None = _opt(None, "PEM CA certificate(s); when set, every client must present a certificate "
                                      "they signed (mutual TLS); needs --tls-cert")
    auth_tokens: Path | None = _opt(None, "file of bearer tokens, one per line: TOKEN, or NAME TOKEN, or NAME TOKEN "
                                    "METHOD[,METHOD] to allow only those RPCs; when set, every call except health "
                                    "checks needs the metadata 'authorization: Bearer TOKEN'")
    device: str = _opt("auto", "where the engine runs: auto (CUDA if visible), cpu, cuda or cuda:N")
    max_batch: int = _opt(256, "largest batch, in faces, a client may send")
    queue_size: int = _opt(4, "batches waiting for the device before clients are pushed back")
    workers: int = _opt(1, "engine threads feeding the device concurrently")
    memory_budget_mb: int = _opt(2048, "bytes of batches being reassembled or answered at once, in MiB")
    max_message_mb: int = _opt(8, "largest single gRPC message accepted, in MiB (clients chunk below it)")
    chunk_kb: int = _opt(1024, "size of response chunks, in KiB")
    chunk_timeout_s: float = _opt(30.0, "a chunked batch whose next chunk does not arrive within this many seconds is "
                                  "answered DEADLINE_EXCEEDED and its memory freed; the stream goes on")
    max_streams: int = _opt(256, "ProtectStream calls open at once; more are refused with RESOURCE_EXHAUSTED (retryable)")
    max_reassembling: int = _opt(64, "chunked batches being reassembled at once, over all streams; more are answered "
                                 "RESOURCE_EXHAUSTED (retryable)")
    max_feature_value: float = _opt(1e4, "largest accepted |feature value| when the bundle records no feature_bound "
                                    "(with one, values must lie in [0, feature_bound])")
    protectors: str = _opt("advface", "comma-separated protectors clients may ask for (advface, resynth, random, dp)")
    max_steps: int = _opt(100, "largest PGD step count a client may ask for")
    min_eps: float = _opt(0.05, "smallest eps a client may ask for (smaller weakens the protection)")
    max_eps: float = _opt(0.5, "largest eps a client may ask for (larger costs accuracy)")
    max_connection_age_s: float = _opt(300.0, "close client connections after this long (they reconnect), so new "
                                       "replicas get traffic")
    drain_seconds: float = _opt(30.0, "on SIGTERM, how long in-flight batches may take before the server stops")
    torch_threads: int = _opt(0, "CPU threads for PyTorch (0: PyTorch's default)")
    warmup_faces: int = _opt(2, "faces in the warm-up batch run before health reports SERVING")
    log_level: str = _opt("info", "debug, info, warning or error; debug logs one line per batch")

    @property
    def allowed_protectors(self) -> tuple[str, ...]:
        return tuple(p.strip() for p in self.protectors.split(",") if p.strip())

    def validate(self) -> ServerSettings:
        from plugin_service.names import PROTECTORS

        unknown = [p for p in self.allowed_protectors if p not in PROTECTORS or p == "none"]
        if unknown:
            raise ValueError(f"--protectors: unknown or unsafe protector(s) {unknown}; allowed: advface, resynth, random, dp")
        if not 0 < self.min_eps <= self.max_eps:
            raise ValueError(f"need 0 < --min-eps <= --max-eps, got {self.min_eps} and {self.max_eps}")
        for name in ("max_batch", "queue_size", "workers", "memory_budget_mb", "max_message_mb", "chunk_kb", "max_steps",
                     "max_streams", "max_reassembling"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.chunk_timeout_s > 0:
            raise ValueError(f"--chunk-timeout-s must be > 0, got {self.chunk_timeout_s}")
        if not 0 < self.max_feature_value < float("inf"):
            raise ValueError(f"--max-feature-value must be a positive number, got {self.max_feature_value}")
        if self.chunk_kb * 1024 >= self.max_message_mb * 1024 * 1024:
            raise ValueError("--chunk-kb must be below --max-message-mb")
        self._validate_security()
        return self

    def _validate_security(self) -> None:
        """Half a TLS set-up would silently serve plaintext (or refuse everyone), so it is an error."""
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together: give both for TLS, neither for plaintext")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        for name in ("tls_cert", "tls_key", "tls_client_ca", "auth_tokens"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                problem = "is a directory" if Path(path).is_dir() else "does not exist"
                raise ValueError(f"--{name.replace('_', '-')}: {path} {problem}; expected a file")


def env_name(field_name: str) -> str:
    return f"ADVFACE_{field_name.upper()}"


def _field_type(f: Any) -> type:
    t = str(f.type)
    return {"int": int, "float": float, "str": str}.get(t, Path)


def add_settings_arguments(parser: argparse.ArgumentParser, cls: type = ServerSettings) -> None:
    """One flag per field; its default is the environment variable if set, else the field default."""
    for f in fields(cls):
        kind = _field_type(f)
        env = env_name(f.name)
        default = os.environ.get(env, f.default if f.default is not MISSING else None)
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=default,
                            help=f"{f.metadata['help']} [env {env}; default: %(default)s]")


def settings_from_args(args: argparse.Namespace, cls: type = ServerSettings) -> Any:
    values = {}
    for f in fields(cls):
        value = getattr(args, f.name)
        if value is not None and not isinstance(value, _field_type(f)):
            value = _field_type(f)(value)  # env var strings
        values[f.name] = value
    return cls(**values).validate()
