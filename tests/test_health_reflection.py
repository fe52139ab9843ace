"""Generic gRPC tools can find and check the service: health and reflection."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc


def test_health_serving(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "diffusiond.v1.Diffusion"):
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_and_describes_the_service(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="diffusiond.v1.Diffusion"),
        ]
        listed, described = list(stub.ServerReflectionInfo(iter(requests), timeout=10))
        names = {s.name for s in listed.list_services_response.service}
        assert {"diffusiond.v1.Diffusion", "grpc.health.v1.Health"} <= names
        assert described.file_descriptor_response.file_descriptor_proto
