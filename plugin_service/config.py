"""Service settings: one typed object, filled from flags, then environment, then defaults.

Every field documents itself once (its ``help``); the CLI builds ``advface serve``'s flags and
the environment variable names (``ADVFACE_<FIELD>``) from these fields, so flags, env vars
and ``--help`` cannot drift apart.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plugin_service import settings_cli
from plugin_service.settings_cli import option

ENV_PREFIX = "ADVFACE_"


@dataclass(frozen=True)
class ServerSettings:
    bundle: Path | None = option(None, "model bundle directory (default: the bundle embedded in the package)")
    host: str = option("0.0.0.0", "address to listen on for gRPC")
    port: int = option(50051, "gRPC port")
    metrics_port: int = option(9464, "Prometheus /metrics HTTP port (0 disables the endpoint)")
    metrics_host: str = option("", "address the /metrics endpoint listens on, e.g. an internal interface or 127.0.0.1 "
                             "(empty: the gRPC --host); it is plain HTTP without authentication")
    tls_cert: Path | None = option(None, "PEM certificate chain for TLS on the gRPC port (with --tls-key); unset: plaintext")
    tls_key: Path | None = option(None, "PEM private key of --tls-cert")
    tls_client_ca: Path | None = option(None, "PEM CA certificate(s); when set, every client must present a certificate "
                                      "they signed (mutual TLS); needs --tls-cert")
    auth_tokens: Path | None = option(None, "file of bearer tokens, one per line: TOKEN, or NAME TOKEN, or NAME TOKEN "
                                    "METHOD[,METHOD] to allow only those RPCs; when set, every call except health "
                                    "checks needs the metadata 'authorization: Bearer TOKEN'")
    device: str = option("auto", "where the engine runs: auto (CUDA if visible), cpu, cuda or cuda:N")
    max_batch: int = option(256, "largest batch, in faces, a client may send")
    queue_size: int = option(4, "batches waiting for the device before clients are pushed back")
    workers: int = option(1, "engine threads feeding the device concurrently")
    memory_budget_mb: int = option(2048, "bytes of batches being reassembled or answered at once, in MiB")
    max_message_mb: int = option(8, "largest single gRPC message accepted, in MiB (clients chunk below it)")
    chunk_kb: int = option(1024, "size of response chunks, in KiB")
    chunk_timeout_s: float = option(30.0, "a chunked batch whose next chunk does not arrive within this many seconds is "
                                  "answered DEADLINE_EXCEEDED and its memory freed; the stream goes on")
    max_streams: int = option(256, "ProtectStream calls open at once; more are refused with RESOURCE_EXHAUSTED (retryable)")
    max_reassembling: int = option(64, "chunked batches being reassembled at once, over all streams; more are answered "
                                 "RESOURCE_EXHAUSTED (retryable)")
    max_feature_value: float = option(1e4, "largest accepted |feature value| when the bundle records no feature_bound "
                                    "(with one, values must lie in [0, feature_bound])")
    protectors: str = option("advface", "comma-separated protectors clients may ask for (advface, resynth, random, dp)")
    max_steps: int = option(100, "largest PGD step count a client may ask for")
    min_eps: float = option(0.05, "smallest eps a client may ask for (smaller weakens the protection)")
    max_eps: float = option(0.5, "largest eps a client may ask for (larger costs accuracy)")
    max_connection_age_s: float = option(300.0, "close client connections after this long (they reconnect), so new "
                                       "replicas get traffic")
    drain_seconds: float = option(30.0, "on SIGTERM, how long in-flight batches may take before the server stops")
    torch_threads: int = option(0, "CPU threads for PyTorch (0: PyTorch's default)")
    warmup_faces: int = option(2, "faces in the warm-up batch run before health reports SERVING")
    log_level: str = option("info", "debug, info, warning or error; debug logs one line per batch")

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
    return settings_cli.env_name(ENV_PREFIX, field_name)


def add_settings_arguments(parser: argparse.ArgumentParser, cls: type = ServerSettings) -> None:
    """One flag per field; its default is the environment variable if set, else the field default."""
    settings_cli.add_arguments(parser, cls, env_prefix=ENV_PREFIX)


def settings_from_args(args: argparse.Namespace, cls: type = ServerSettings) -> Any:
    return settings_cli.from_args(args, cls).validate()
