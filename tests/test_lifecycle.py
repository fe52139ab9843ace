"""Health follows the server's life: NOT_SERVING while loading, SERVING once warm, and a
shutdown past its grace period ends what is left with UNAVAILABLE instead of hanging."""

from __future__ import annotations

import threading

import grpc
import pytest
from conftest import FaultyBackend
from grpc_health.v1 import health_pb2, health_pb2_grpc

from diffusiond.client import ClientError, DiffusionClient, build_request
from diffusiond.models.sources import ModelSource
from diffusiond.server.app import ServerSettings, ServerThread

WAIT_S = 60.0


def health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def test_not_serving_until_loaded_then_grace_period_ends_leftovers(builtin_dir):
    thread = ServerThread(ServerSettings(host="127.0.0.1", port=0, models=[ModelSource("builtin", str(builtin_dir))]))
    thread.start(load=False)
    stopped = False
    try:
        assert health(thread.address) == health_pb2.HealthCheckResponse.NOT_SERVING
        with DiffusionClient(thread.address, timeout=WAIT_S, max_attempts=1) as client:  # its own answer, not a retry's
            with pytest.raises(ClientError) as loading:
                client.generate("a fox", seed=1, steps=1)
            assert loading.value.code is grpc.StatusCode.UNAVAILABLE and "loading" in loading.value.details

            thread.load()
            assert health(thread.address) == health_pb2.HealthCheckResponse.SERVING
            model = thread.server.registry.get("builtin")
            backend = model.pipeline.backend = FaultyBackend(model.pipeline.backend)
            batcher = thread.server.batcher
            in_flight = threading.Event()

            def hold_until_stopped(sample) -> None:
                in_flight.set()
                assert batcher.running[0].wait_cancelled(WAIT_S)  # shutdown aborts it

            backend.before_unet = hold_until_stopped
            call = client._stub.Generate.future(build_request("a long one", seed=2, steps=50), timeout=WAIT_S)
            assert in_flight.wait(WAIT_S)
            thread.stop(grace=0.2)
            stopped = True
            with pytest.raises(grpc.RpcError) as aborted:
                call.result(WAIT_S)
            assert aborted.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "shut down before it finished" in aborted.value.details()
            assert len(backend.unet_rows) == 1  # it stopped at the next step, not after 50
    finally:
        if not stopped:
            thread.stop()
