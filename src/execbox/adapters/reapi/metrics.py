"""What a farm operator graphs: leases by outcome and status code, action duration,
queue-to-start, input bytes and cache hits, sandbox launch time, running leases
(Prometheus, on --metrics-port)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)


class WorkerMetrics:
    """The worker's metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.leases = Counter("execbox_worker_leases", "Leases finished, by outcome and "
                              "gRPC status code", ["outcome", "code"], registry=r)
        self.action_duration = Histogram("execbox_worker_action_duration_seconds",
                                         "Time the command ran", buckets=_SECONDS, registry=r)
        self.queue_to_start = Histogram("execbox_worker_queue_to_start_seconds",
                                        "From the job's queueing to this worker starting it",
                                        buckets=_SECONDS, registry=r)
        self.input_fetch = Histogram("execbox_worker_input_fetch_seconds",
                                     "Staging the input root", buckets=_SECONDS, registry=r)
        self.output_upload = Histogram("execbox_worker_output_upload_seconds",
                                       "Uploading outputs", buckets=_SECONDS, registry=r)
        self.fetched_bytes = Counter("execbox_worker_input_fetch_bytes",
                                     "Bytes fetched from the CAS for input roots", registry=r)
        self.cache_hits = Counter("execbox_worker_cache_hits", "Input files found in the "
                                  "local cache", registry=r)
        self.cache_misses = Counter("execbox_worker_cache_misses", "Input files fetched "
                                    "from the CAS", registry=r)
        self.cache_hit_ratio = Gauge("execbox_worker_cache_hit_ratio", "Hits / (hits + "
                                     "misses) since the worker started", registry=r)
        self.launch = Histogram("execbox_worker_sandbox_launch_seconds",
                                "From asking execbox to start the command to its process "
                                "running", buckets=_SECONDS, registry=r)
        self.running = Gauge("execbox_worker_running_leases", "Leases being worked on",
                             registry=r)
        self._hits = 0
        self._misses = 0

    def serve(self, port: int, address: str = "127.0.0.1") -> None:
        start_http_server(port, addr=address, registry=self.registry)

    def count_cache(self, hits: int, misses: int, fetched: int) -> None:
        self.cache_hits.inc(hits)
        self.cache_misses.inc(misses)
        self.fetched_bytes.inc(fetched)
        self._hits += hits
        self._misses += misses
        if self._hits + self._misses:
            self.cache_hit_ratio.set(self._hits / (self._hits + self._misses))
