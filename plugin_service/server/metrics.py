"""Every Prometheus metric the service exports, defined once, on a registry of its own.

Names follow Prometheus conventions (base units, ``_total`` counters, ``_seconds``/``_bytes``)
and carry the ``advface_`` prefix. deploy/grafana and deploy/prometheus query these names
only; tests/test_deploy.py checks that they exist here.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    start_http_server,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
GAIN_BUCKETS = (0.5, 0.8, 0.9, 1.0, 1.05, 1.1, 1.2, 1.3, 1.5, 2.0, 3.0, 5.0)
NORM_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)


class ServiceMetrics:
    """The service's metrics; one instance per server (tests make their own registry)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.requests = Counter("advface_requests", "Finished RPCs by method and gRPC status code",
                                ["method", "code"], registry=r)
        self.batches = Counter("advface_batches", "Batches answered, by RPC method and the gRPC status code the client saw "
                               "(CANCELLED: the call ended before the answer was sent)",
                               ["method", "code"], registry=r)
        self.faces = Counter("advface_faces_protected", "Faces whose protected features were sent to the client",
                             ["protector"], registry=r)
        self.batch_size = Histogram("advface_batch_size_faces", "Faces per protected batch",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_wait = Histogram("advface_queue_wait_seconds", "Time a batch waited for the device",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.compute = Histogram("advface_compute_seconds", "Time the engine spent on a batch",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("advface_batch_latency_seconds",
                                 "End-to-end time from a batch's last chunk arriving to its result being queued for sending",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("advface_batches_in_flight", "Batches received and not yet answered", registry=r)
        self.streams = Gauge("advface_streams_open", "ProtectStream calls open", registry=r)
        self.reassembling = Gauge("advface_batches_reassembling", "Chunked batches whose chunks are still arriving",
                                  registry=r)
        self.queue_depth = Gauge("advface_queue_depth", "Batches waiting for the device", registry=r)
        self.gain = Histogram("advface_shadow_loss_gain_ratio",
                              "Per face: shadow-model L1 loss after protection / before; near 1 means no privacy gain",
                              buckets=GAIN_BUCKETS, registry=r)
        self.perturbation = Histogram("advface_perturbation_norm", "Per face: norm of the added perturbation",
                                      buckets=NORM_BUCKETS, registry=r)
        self.resynth_cosine = Histogram("advface_resynth_cosine",
                                        "Per face (resynth): cos(R(stored), R(z)) reached; below the target means "
                                        "the step limit ran out", buckets=(0.9, 0.95, 0.97, 0.98, 0.985, 0.99, 0.995, 1.0),
                                        registry=r)
        self.resynth_steps = Histogram("advface_resynth_steps", "Per face (resynth): optimiser steps taken",
                                       buckets=(5, 10, 20, 30, 40, 60, 80, 100, 150, 200), registry=r)
        self.wire_in = Counter("advface_wire_received_bytes", "Protobuf bytes of batch requests received", registry=r)
        self.wire_out = Counter("advface_wire_sent_bytes", "Protobuf bytes of batch responses sent", registry=r)
        self.reserved = Gauge("advface_memory_budget_reserved_bytes",
                              "Host bytes reserved for batches being reassembled, computed or sent", registry=r)
        self.device_memory = Gauge("advface_device_memory_bytes",
                                   "Peak device memory PyTorch allocated during the last batch (0 on CPU)", registry=r)
        self.device_capacity = Gauge("advface_device_memory_capacity_bytes", "Total memory of the device (0 on CPU)",
                                     registry=r)
        self.info = Info("advface_model", "Bundle version, protector and device being served", registry=r)

    def serve_http(self, port: int, addr: str) -> None:
        start_http_server(port, addr=addr, registry=self.registry)
