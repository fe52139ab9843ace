"""A small HTTP client for the gateway tests: JSON calls and Server-Sent Events over real sockets (stdlib only)."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

TIMEOUT_S = 120.0


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def _connection(url: str) -> tuple[http.client.HTTPConnection, str]:
    parts = urlsplit(url)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=TIMEOUT_S), parts.path or "/"


def request(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None,
            raw: bytes | None = None) -> Reply:
    connection, path = _connection(url)
    try:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        all_headers = {"content-type": "application/json", **(headers or {})} if data is not None else dict(headers or {})
        query = urlsplit(url).query
        connection.request(method, path + (f"?{query}" if query else ""), body=data, headers=all_headers)
        response = connection.getresponse()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        connection.close()


def get(url: str, headers: dict[str, str] | None = None) -> Reply:
    return request("GET", url, headers=headers)


def post(url: str, body: Any, headers: dict[str, str] | None = None) -> Reply:
    return request("POST", url, body, headers)


class EventStream:
    """``POST`` (or ``GET``) a streaming call; iterate (event, data) pairs; ``close()`` disconnects."""

    def __init__(self, url: str, body: Any = None, headers: dict[str, str] | None = None) -> None:
        self.connection, path = _connection(url)
        query = urlsplit(url).query
        if body is None:
            self.connection.request("GET", path + (f"?{query}" if query else ""), headers=headers or {})
        else:
            self.connection.request("POST", path, body=json.dumps(body).encode(),
                                    headers={"content-type": "application/json", **(headers or {})})
        self.response = self.connection.getresponse()
        self.status = self.response.status
        self.headers = {k.lower(): v for k, v in self.response.getheaders()}

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        event, data = "message", []
        while line := self.response.readline():
            text = line.decode().rstrip("\r\n")
            if not text:
                if data:
                    yield event, json.loads("\n".join(data))
                event, data = "message", []
            elif text.startswith("event:"):
                event = text[6:].strip()
            elif text.startswith("data:"):
                data.append(text[5:].lstrip())

    def close(self) -> None:
        self.connection.sock and self.connection.sock.close()
        self.connection.close()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
