"""The metrics that need no server: GPU figures from NVML (a stand-in module here) and its absence."""

from __future__ import annotations

import logging
import sys
from types import SimpleNamespace

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from diffusiond.server.metrics import GpuCollector

GIB = 1024**3


def fake_pynvml(calls: list[str]) -> SimpleNamespace:
    def handle_by_uuid(uuid):
        calls.append(f"uuid {uuid}")
        raise RuntimeError("no such GPU")  # make it fall back to the index, as on a machine without torch CUDA

    return SimpleNamespace(
        nvmlInit=lambda: calls.append("init"),
        nvmlDeviceGetHandleByUUID=handle_by_uuid,
        nvmlDeviceGetHandleByIndex=lambda i: f"handle{i}",
        nvmlDeviceGetName=lambda h: b"NVIDIA H200",
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(used=30 * GIB, total=141 * GIB, free=111 * GIB),
        nvmlDeviceGetUtilizationRates=lambda h: SimpleNamespace(gpu=87, memory=40),
    )


def exposition(collector) -> str:
    registry = CollectorRegistry()
    registry.register(collector)
    return generate_latest(registry).decode()


def test_gpu_metrics_from_nvml(monkeypatch):
    calls: list[str] = []
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(calls))
    text = exposition(GpuCollector(lambda: [0]))
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    labels = (("device", "cuda:0"), ("name", "NVIDIA H200"))
    assert values == {
        ("diffusiond_gpu_memory_used_bytes", labels): 30 * GIB,
        ("diffusiond_gpu_memory_total_bytes", labels): 141 * GIB,
        ("diffusiond_gpu_utilization_ratio", labels): 0.87,
    }
    assert calls.count("init") == 1


def test_no_gpu_metrics_without_cuda_devices(monkeypatch):
    calls: list[str] = []
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(calls))
    assert "diffusiond_gpu" not in exposition(GpuCollector(lambda: []))
    assert calls == []  # NVML is not even loaded on a CPU-only server


def test_missing_nvml_package_is_logged_once_and_exports_nothing(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    collector = GpuCollector(lambda: [0])
    with caplog.at_level(logging.WARNING):
        first, second = exposition(collector), exposition(collector)
    assert "diffusiond_gpu" not in first + second
    assert [r.getMessage() for r in caplog.records].count(
        "GPU metrics are not exported: the 'nvidia-ml-py' package is not installed (pip install 'diffusiond[gpu]')"
    ) == 1
