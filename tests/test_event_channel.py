"""A slow streaming client loses intermediate previews (oldest first), never a step event."""

from __future__ import annotations

import asyncio

import numpy as np

from diffusiond.pipeline.request import PreviewKind, StepInfo
from diffusiond.service.batcher import EventChannel


def step(n: int, with_preview: bool) -> StepInfo:
    preview = np.full((1, 2, 2, 3), n, dtype=np.uint8) if with_preview else None
    kind = PreviewKind.APPROX_RGB if with_preview else PreviewKind.NONE
    return StepInfo(step=n, total_steps=10, timestep=0.0, elapsed_s=0.0, eta_s=0.0, preview_kind=kind, preview=preview)


def test_unread_previews_are_dropped_oldest_first():
    async def main():
        channel = EventChannel(max_buffered_previews=2)
        for n in range(1, 11):
            channel.put(step(n, with_preview=n % 2 == 0))
        channel.close()
        items = []
        while (item := await channel.get()) is not None:
            items.append(item)
        return channel, items

    channel, items = asyncio.run(main())
    assert [i.step for i in items] == list(range(1, 11))  # every step event arrives
    assert [i.step for i in items if i.preview is not None] == [8, 10]  # the newest previews
    assert channel.dropped_previews == 3
    assert all(i.preview_kind is PreviewKind.NONE for i in items if i.preview is None)


def test_reader_keeping_up_gets_every_preview():
    async def main():
        channel = EventChannel(max_buffered_previews=1)
        got = []
        for n in range(1, 6):
            channel.put(step(n, with_preview=True))
            got.append(await channel.get())
        channel.close()
        assert await channel.get() is None
        return got

    got = asyncio.run(main())
    assert all(i.preview is not None for i in got)
