"""The asyncio client: generate, stream, list models, deadlines and metadata."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from diffusiond.client import AsyncDiffusionClient, ClientError


def run(coro):
    return asyncio.run(coro)


def test_async_generate_matches_sync(server, client):
    async def main():
        async with AsyncDiffusionClient(server.address, timeout=60) as aclient:
            return await aclient.generate("a red fox", seed=8, steps=3)

    result = run(main())
    assert result.images[0].data == client.generate("a red fox", seed=8, steps=3).images[0].data


def test_async_stream_and_models(server):
    async def main():
        async with AsyncDiffusionClient(server.address, timeout=60) as aclient:
            kinds = [e.WhichOneof("event") async for e in aclient.stream("a cat", seed=1, steps=3, scheduler="ddim")]
            return kinds, await aclient.list_models()

    kinds, models = run(main())
    assert kinds == ["queued", "started", "step", "step", "step", "result"]
    assert [m.name for m in models] == ["builtin"]


def test_async_deadline(server):
    async def main():
        async with AsyncDiffusionClient(server.address) as aclient:
            await aclient.generate("a cat", seed=1, steps=200, timeout=0.3)

    with pytest.raises(ClientError) as info:
        run(main())
    assert info.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert server.server.batcher.wait_idle(30)


def test_metadata_request_id(server, client):
    """Call metadata reaches the server: an x-request-id header names the request."""

    async def main():
        async with AsyncDiffusionClient(server.address, timeout=60, metadata=[("x-request-id", "trace-42")]) as aclient:
            return await aclient.generate("a cat", seed=1, steps=1)

    assert run(main()).response.request_id == "trace-42"
    sync = client.generate("a cat", seed=1, steps=1, metadata=[("x-request-id", "trace-43")])
    assert sync.response.request_id == "trace-43"
    explicit = client.generate("a cat", seed=1, steps=1, request_id="field-wins", metadata=[("x-request-id", "t")])
    assert explicit.response.request_id == "field-wins"
