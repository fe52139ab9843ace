"""uvicorn inside the diffusiond process: on the gRPC server's event loop, stopped by its drain.

The socket is bound here (port 0 picks a free one, and a port in use fails at
start with the address), and uvicorn's own signal handling is left out: the
process's SIGINT/SIGTERM belong to the drain in ``cli``, which stops this
server once every accepted call has been answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Iterator

import uvicorn
from starlette.types import ASGIApp

from diffusiond.server.tls import TlsSettings

log = logging.getLogger(__name__)

# Connections still open this long after the drain are closed.
CLOSE_TIMEOUT_S = 5.0


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the process's signals drain the whole server (cli._serve), not only this listener


def bind(host: str, port: int) -> socket.socket:
    """A listening socket; OSError names the address when it cannot be bound."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise OSError(f"could not bind the HTTP gateway to {host}:{port}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


class HttpGateway:
    def __init__(self, app: ASGIApp, host: str, port: int, tls: TlsSettings | None = None) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self._app = app
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Listen and serve in the background; return the bound port."""
        sock = bind(self.host, self.port)
        tls = self.tls
        config = uvicorn.Config(
            self._app,
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=CLOSE_TIMEOUT_S,
            ssl_certfile=tls.cert if tls else None,
            ssl_keyfile=tls.key if tls else None,
            ssl_ca_certs=tls.client_ca if tls and tls.client_ca else None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls and tls.client_ca else ssl.CERT_NONE,
        )
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)  # its start/stop lines repeat ours
        self._server = _EmbeddedServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="diffusiond-http")
        self._task.add_done_callback(_report_failure)
        self.port = sock.getsockname()[1]
        return self.port

    async def stop(self) -> None:
        """Stop listening, let open responses finish (up to CLOSE_TIMEOUT_S), close the connections."""
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def _report_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the HTTP gateway stopped with an error", exc_info=task.exception())
