"""TLS and mutual TLS for the gRPC port, from PEM files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from diffusiond.errors import FailedPrecondition


@dataclass(frozen=True)
class TlsSettings:
    cert: str  # the server's certificate chain (PEM)
    key: str  # its private key (PEM)
    client_ca: str = ""  # set: clients must present a certificate this CA signed (mutual TLS)


def _read(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise FailedPrecondition(f"cannot read the {what} {path}: {exc.strerror}") from None
    if b"-----BEGIN" not in data:
        raise FailedPrecondition(f"the {what} {path} is not a PEM file")
    return data


def server_credentials(settings: TlsSettings) -> grpc.ServerCredentials:
    """Credentials for ``add_secure_port``; with a client CA, a client without a valid certificate
    is refused during the handshake, before any RPC."""
    pair = (_read(settings.key, "TLS private key"), _read(settings.cert, "TLS certificate"))
    client_ca = _read(settings.client_ca, "client CA certificate") if settings.client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=client_ca is not None)
