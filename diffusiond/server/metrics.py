"""Every Prometheus metric the server exports, defined in one place with its help text.

Each server owns its own ``CollectorRegistry`` (several servers in one process,
as in tests, never clash) and serves it over HTTP at ``/metrics`` when
``--metrics-port`` is set. Counters and histograms are updated as things
happen; cache and GPU figures are read when scraped. GPU memory and
utilisation come from NVML (the ``nvidia-ml-py`` package, imported lazily)
and only for CUDA devices a model runs on; without the package they are simply
not exported (logged once).

The README's "Metrics" section lists every metric; keep it in step.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


class ServerMetrics:
    """The server's metrics; implements the batcher's ``BatcherMetrics`` hooks."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "diffusiond_requests", "RPCs finished, by method, gRPC status code and client (the auth token's name; "
            "- without authentication).", ["method", "code", "client"], registry=r
        )
        self.request_duration = Histogram(
            "diffusiond_request_duration_seconds",
            "Total time of an RPC, from its arrival to its last message (queue wait, inference, image encoding).",
            ["method"], buckets=SECONDS_BUCKETS, registry=r,
        )
        self.queue_wait = Histogram(
            "diffusiond_queue_wait_seconds",
            "Time a request waited in the queue (including any batch delay) before it joined the running set.",
            ["model"], buckets=SECONDS_BUCKETS, registry=r,
        )
        self.inference = Histogram(
            "diffusiond_inference_seconds",
            "Time from a request joining the running set to its outcome: prompt encoding, denoising, decoding.",
            ["model"], buckets=SECONDS_BUCKETS, registry=r,
        )
        self.denoising_steps = Counter(
            "diffusiond_denoising_steps",
            "Denoising steps done, counted per image (a request of 2 images and 30 steps adds 60); "
            "rate() of it is the server's denoising throughput.",
            ["model"], registry=r,
        )
        self.steps_per_second = Gauge(
            "diffusiond_denoising_steps_per_second",
            "Image denoising steps per second of UNet time in the most recent denoising step of a batch.",
            ["model"], registry=r,
        )
        self.queue_depth = Gauge("diffusiond_queue_depth", "Requests waiting in the queue.", registry=r)
        self.running = Gauge("diffusiond_requests_running", "Requests in the running set now.", registry=r)
        self.batch_size = Histogram(
            "diffusiond_batch_size", "Requests sharing a denoising step (one UNet call).", ["model"],
            buckets=BATCH_BUCKETS, registry=r,
        )
        self.batch_images = Histogram(
            "diffusiond_batch_images", "Images sharing a denoising step (the UNet batch is twice this "
            "with classifier-free guidance).", ["model"], buckets=BATCH_BUCKETS, registry=r,
        )
        self.oom = Counter(
            "diffusiond_out_of_memory",
            "Network calls that ran out of device memory and were retried with fewer rows "
            "(what: unet, vae_decode).",
            ["model", "what"], registry=r,
        )
        self.filtered = Counter(
            "diffusiond_images_filtered",
            "Finished images the safety checker withheld (sent black, flagged in the response).",
            ["model"], registry=r,
        )
        self.serving = Gauge(
            "diffusiond_serving", "1 while health is SERVING; 0 while loading, warming up or draining.", registry=r
        )
        self._http: Any = None
        self._http_thread: threading.Thread | None = None

    # -- sources read at scrape time ------------------------------------------

    def watch_batcher(self, queue_depth: Callable[[], int], running: Callable[[], int]) -> None:
        self.queue_depth.set_function(queue_depth)
        self.running.set_function(running)

    def add_collector(self, collector: Collector) -> None:
        self.registry.register(collector)

    # -- BatcherMetrics -------------------------------------------------------

    def request_started(self, model: str, queue_wait_s: float) -> None:
        self.queue_wait.labels(model).observe(queue_wait_s)

    def request_finished(self, model: str, inference_s: float, ok: bool) -> None:
        self.inference.labels(model).observe(inference_s)

    def denoise_step(self, model: str, requests: int, images: int, seconds: float) -> None:
        self.batch_size.labels(model).observe(requests)
        self.batch_images.labels(model).observe(images)
        self.denoising_steps.labels(model).inc(images)
        if seconds > 0:
            self.steps_per_second.labels(model).set(images / seconds)

    def out_of_memory(self, model: str, what: str, rows: int) -> None:
        self.oom.labels(model, what).inc()

    def images_filtered(self, model: str, images: int) -> None:
        self.filtered.labels(model).inc(images)

    # -- servicer -------------------------------------------------------------

    def rpc_finished(self, method: str, code: str, client: str, seconds: float) -> None:
        self.requests.labels(method, code, client).inc()
        self.request_duration.labels(method).observe(seconds)

    # -- HTTP -----------------------------------------------------------------

    def serve_http(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on ``host:port`` (0: any free port) in a daemon thread; return the bound port."""
        self._http, self._http_thread = start_http_server(port, addr=host, registry=self.registry)
        bound = int(self._http.server_port)
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class CacheCollector:
    """Cache figures, read at scrape time from the caches themselves (which know nothing of Prometheus)."""

    def __init__(self, prompt_caches: Callable[[], Iterable[tuple[str, Any]]], result_cache: Any | None) -> None:
        self._prompt_caches = prompt_caches  # -> (model name, PromptEncoder) pairs
        self._result_cache = result_cache

    def collect(self) -> Iterator[Metric]:
        hits = CounterMetricFamily(
            "diffusiond_cache_hits", "Cache lookups that found an entry (cache: prompt or result).", labels=["cache", "model"]
        )
        misses = CounterMetricFamily(
            "diffusiond_cache_misses", "Cache lookups that found none (cache: prompt or result).", labels=["cache", "model"]
        )
        entries = GaugeMetricFamily("diffusiond_cache_entries", "Entries held by each cache.", labels=["cache", "model"])
        for model, encoder in self._prompt_caches():
            hits.add_metric(["prompt", model], encoder.hits)
            misses.add_metric(["prompt", model], encoder.misses)
            entries.add_metric(["prompt", model], encoder.cache_entries)
        result_bytes = GaugeMetricFamily(
            "diffusiond_result_cache_bytes", "Bytes of encoded images held by the result cache."
        )
        if self._result_cache is not None:
            stats = self._result_cache.stats()
            for model in sorted(set(stats.hits) | set(stats.misses) | set(stats.entries)):
                hits.add_metric(["result", model], stats.hits.get(model, 0))
                misses.add_metric(["result", model], stats.misses.get(model, 0))
                entries.add_metric(["result", model], stats.entries.get(model, 0))
            result_bytes.add_metric([], stats.bytes)
        yield hits
        yield misses
        yield entries
        if self._result_cache is not None:
            yield result_bytes


class GpuCollector:
    """GPU memory and utilisation from NVML, for the CUDA devices the models run on."""

    def __init__(self, cuda_devices: Callable[[], list[int]]) -> None:
        self._cuda_devices = cuda_devices  # -> torch CUDA device indices in use
        self._nvml: Any = None
        self._unavailable = False
        self._lock = threading.Lock()

    def _load_nvml(self) -> Any | None:
        with self._lock:
            if self._nvml is None and not self._unavailable:
                try:
                    import pynvml

                    pynvml.nvmlInit()
                    self._nvml = pynvml
                except ImportError:
                    self._unavailable = True
                    log.warning("GPU metrics are not exported: the 'nvidia-ml-py' package is not installed "
                                "(pip install 'diffusiond[gpu]')")
                except Exception as exc:  # NVML present but no driver, etc.
                    self._unavailable = True
                    log.warning("GPU metrics are not exported: NVML did not initialise (%s)", exc)
            return self._nvml

    def _handle(self, nvml: Any, index: int) -> Any:
        """NVML's handle for torch's CUDA device ``index`` (by UUID: CUDA_VISIBLE_DEVICES may renumber)."""
        try:
            import torch

            uuid = str(torch.cuda.get_device_properties(index).uuid)
            return nvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
        except Exception:
            return nvml.nvmlDeviceGetHandleByIndex(index)

    def collect(self) -> Iterator[Metric]:
        devices = self._cuda_devices()
        if not devices:
            return
        nvml = self._load_nvml()
        if nvml is None:
            return
        labels = ["device", "name"]
        used = GaugeMetricFamily("diffusiond_gpu_memory_used_bytes", "GPU memory in use (NVML, all processes).", labels=labels)
        total = GaugeMetricFamily("diffusiond_gpu_memory_total_bytes", "GPU memory in all (NVML).", labels=labels)
        util = GaugeMetricFamily(
            "diffusiond_gpu_utilization_ratio",
            "Fraction of the last NVML sample period (1/6 s to 1 s) in which a kernel ran on the GPU (0 to 1).",
            labels=labels,
        )
        for index in devices:
            try:
                handle = self._handle(nvml, index)
                name = nvml.nvmlDeviceGetName(handle)
                name = name.decode() if isinstance(name, bytes) else str(name)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                rates = nvml.nvmlDeviceGetUtilizationRates(handle)
            except Exception as exc:
                log.debug("NVML query for cuda:%d failed: %s", index, exc)
                continue
            key = [f"cuda:{index}", name]
            used.add_metric(key, float(memory.used))
            total.add_metric(key, float(memory.total))
            util.add_metric(key, float(rates.gpu) / 100.0)
        yield used
        yield total
        yield util
