"""Transport: gzip both ways (measured on the wire) and message-size limits."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from diffusiond.client import ClientError, DiffusionClient
from diffusiond.models.sources import ModelSource
from diffusiond.pipeline.request import GenerationRequest, GenerationResult, Timings
from diffusiond.server import codec, transport
from diffusiond.server.app import ServerSettings, ServerThread
from diffusiond.service.outputs import encode_result

LONG_PROMPT = "a red fox in the snow " * 180  # 3960 characters: compresses to almost nothing


class CountingProxy:
    """A TCP relay that counts the bytes going each way (client -> server is ``up``)."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self._target = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self.up = 0
        self.down = 0
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self._target)
            self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, "up"), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, "down"), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, direction: str) -> None:
        try:
            while data := source.recv(65536):
                with self._lock:
                    setattr(self, direction, getattr(self, direction) + len(data))
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        for s in self._sockets:
            s.close()


def start_server(builtin_dir, **settings) -> ServerThread:
    thread = ServerThread(
        ServerSettings(host="127.0.0.1", port=0, models=[ModelSource("builtin", str(builtin_dir))], **settings)
    )
    thread.start()
    return thread


@pytest.fixture(scope="module")
def gzip_server(builtin_dir) -> Iterator[ServerThread]:
    thread = start_server(builtin_dir, compression="gzip", max_receive_message_bytes=6 * 1024)
    yield thread
    thread.stop()


def measured(address: str, compression: grpc.Compression | None, **fields):
    proxy = CountingProxy(address)
    try:
        with DiffusionClient(proxy.address, timeout=60, compression=compression) as client:
            result = client.generate(LONG_PROMPT, **fields)
        return result, proxy.up, proxy.down
    finally:
        proxy.close()


def test_gzip_shrinks_requests_and_responses_on_the_wire(server, gzip_server):
    fields = dict(seed=7, steps=2, scheduler="ddim")
    plain, plain_up, plain_down = measured(server.address, None, **fields)
    zipped, zipped_up, zipped_down = measured(gzip_server.address, grpc.Compression.Gzip, **fields)
    assert [i.data for i in zipped.images] == [i.data for i in plain.images]
    # The request is mostly the repetitive prompt; the response carries it in the PNG's text chunk.
    assert plain_up > len(LONG_PROMPT) and zipped_up < plain_up - 3000
    assert zipped_down < plain_down - 3000


def test_requests_over_the_receive_limit_are_refused(gzip_server):
    with DiffusionClient(gzip_server.address, timeout=60) as client:
        with pytest.raises(ClientError) as info:
            client.generate(LONG_PROMPT, negative_prompt=LONG_PROMPT, seed=1, steps=1)
        assert info.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert client.generate("a fox", seed=1, steps=1).images  # the next request is served


def test_responses_over_the_send_limit_fail_clearly(builtin_dir):
    thread = start_server(builtin_dir, max_send_message_bytes=4096)
    try:
        with DiffusionClient(thread.address, timeout=60) as client:
            assert client.list_models()  # small answers pass
            with pytest.raises(ClientError) as info:
                client.generate("a fox", seed=1, steps=1)  # a 64x64 noise PNG is about 12 KB
            assert info.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        thread.stop()


def test_send_limit_bound_holds_for_the_worst_case_answer():
    size, images = 128, 3
    worst_text = "\U0001f98a" * 4096  # 4-byte characters at the prompt length limit
    request = GenerationRequest("r" * 128, "m" * 64, worst_text, worst_text, size, size, 1, 7.5, 1, images, "ddim")
    noise = np.random.default_rng(0).random((images, size, size, 3))  # incompressible pixels
    result = GenerationResult(request, noise, request.image_seeds(), Timings(), warnings=["w" * 200])
    response = codec.response_to_proto(encode_result(result, backend="torch"))
    assert response.ByteSize() <= transport.largest_response_bytes(size, images)
    assert ServerSettings().send_limit_bytes >= transport.largest_response_bytes(2048, 8) > 4 * 1024 * 1024


def test_the_receive_limit_defaults_to_two_input_images_and_what_they_need():
    mib = 1024 * 1024
    assert ServerSettings().receive_limit_bytes == 17 * mib  # two 8 MiB images and 1 MiB for the rest
    assert ServerSettings(max_input_image_bytes=2 * mib).receive_limit_bytes == 5 * mib
    assert ServerSettings(max_receive_message_bytes=4096).receive_limit_bytes == 4096
    with pytest.raises(ValueError, match="max input pixels must be between"):
        ServerSettings(max_input_pixels=10)
