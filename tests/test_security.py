"""Safe to expose: bearer tokens, TLS and mutual TLS, per-client limits, hostile input."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator

import grpc
import pytest
from conftest import running_server
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tls_certs import CertificateAuthority

from diffusiond.client import ClientError, DiffusionClient, build_request, tls_credentials
from diffusiond.errors import FailedPrecondition, ResourceExhausted
from diffusiond.models.sources import ModelSource
from diffusiond.server.app import ServerSettings, ServerThread
from diffusiond.server.auth import TokenStore, parse_tokens
from diffusiond.server.limits import ClientLimits, ClientLimitSettings, peer_address
from diffusiond.server.tls import TlsSettings

ALICE = "alice-0123456789abcdef"
BOB = "bob-0123456789abcdef0000"
WAIT_S = 60.0
MAX_STATUS_BYTES = 8 * 1024


def settings(builtin_dir, **fields) -> ServerSettings:
    return ServerSettings(host="127.0.0.1", port=0, models=[ModelSource("builtin", str(builtin_dir))], **fields)


@pytest.fixture(scope="module")
def auth_server(builtin_dir) -> Iterator[ServerThread]:
    tokens = f"alice:{ALICE}\nbob:{BOB}"
    limits = ClientLimitSettings(max_inflight=2)
    with running_server(settings(builtin_dir, auth_tokens_text=tokens, client_limits=limits)) as thread:
        yield thread


def requests_total(thread: ServerThread, **labels: str) -> float:
    return thread.server.metrics.registry.get_sample_value("diffusiond_requests_total", labels) or 0.0


# -- authentication ----------------------------------------------------------------------


def test_calls_need_a_known_bearer_token(auth_server, caplog):
    with caplog.at_level(logging.INFO, logger="diffusiond"):
        for token in (None, "wrong-token-0123456789"):
            with DiffusionClient(auth_server.address, timeout=WAIT_S, token=token) as c:
                for call in (c.list_models, lambda: c.generate("a fox", steps=1)):
                    with pytest.raises(ClientError) as info:
                        call()
                    assert info.value.code is grpc.StatusCode.UNAUTHENTICATED
        with DiffusionClient(auth_server.address, timeout=WAIT_S, token=ALICE) as c:
            assert c.generate("a fox", steps=1, request_id="by-alice").images
    assert requests_total(auth_server, method="Generate", code="OK", client="alice") >= 1
    assert requests_total(auth_server, method="ListModels", code="UNAUTHENTICATED", client="-") == 2
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "client=alice" in text and ALICE not in text and "wrong-token" not in text


def test_the_cli_passes_tokens(auth_server, monkeypatch, capsys):
    from diffusiond.cli import main

    assert main(["models", "--server", auth_server.address]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert main(["models", "--server", auth_server.address, "--token", ALICE]) == 0
    monkeypatch.setenv("DIFFUSIOND_TOKEN", BOB)
    assert main(["models", "--server", auth_server.address]) == 0
    assert "builtin (default)" in capsys.readouterr().out


def test_health_is_open_and_reflection_is_behind_the_token(auth_server):
    channel = grpc.insecure_channel(auth_server.address)
    try:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        assert check(health_pb2.HealthCheckRequest(), timeout=WAIT_S).status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        ask = [reflection_pb2.ServerReflectionRequest(list_services="")]
        with pytest.raises(grpc.RpcError) as info:
            list(stub.ServerReflectionInfo(iter(ask), timeout=WAIT_S))
        assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
        answers = list(stub.ServerReflectionInfo(iter(ask), timeout=WAIT_S, metadata=[("authorization", f"Bearer {BOB}")]))
        names = [s.name for s in answers[0].list_services_response.service]
        assert "diffusiond.v1.Diffusion" in names
    finally:
        channel.close()


def test_reflection_can_be_turned_off(builtin_dir):
    with running_server(settings(builtin_dir, reflection=False, warmup=False)) as thread:
        channel = grpc.insecure_channel(thread.address)
        try:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            ask = [reflection_pb2.ServerReflectionRequest(list_services="")]
            with pytest.raises(grpc.RpcError) as info:
                list(stub.ServerReflectionInfo(iter(ask), timeout=WAIT_S))
            assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED
        finally:
            channel.close()


def test_a_changed_token_file_is_picked_up_without_a_signal(tmp_path, monkeypatch):
    monkeypatch.setattr("diffusiond.server.auth.RECHECK_S", 0.0)
    path = tmp_path / "tokens"
    path.write_text(f"alice:{ALICE}\n")
    store = TokenStore(path=path)
    path.write_text(f"bob:{BOB}\n")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # a later modification time
    assert store.name_for(BOB) == "bob" and store.name_for(ALICE) is None


def test_token_files_are_checked_and_reread_when_they_change(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"# operators\nalice:{ALICE}\n")
    store = TokenStore(path=path)
    assert store.name_for(ALICE) == "alice" and store.name_for(BOB) is None
    path.write_text(f"bob:{BOB}\n")
    assert store.reload() and store.name_for(BOB) == "bob" and store.name_for(ALICE) is None
    path.write_text("bob has no colon\n")
    assert not store.reload() and store.name_for(BOB) == "bob"  # a broken file keeps the loaded tokens
    for text, problem in [
        ("alice:short", "at least 16"),
        (f"alice:{ALICE}\nalice:{BOB}", "twice"),
        (f"al ice:{ALICE}", "name"),
        ("# nothing\n", "no name:token"),
    ]:
        with pytest.raises(FailedPrecondition, match=problem):
            parse_tokens(text, "tokens")


# -- per-client limits ---------------------------------------------------------------------


def test_a_flooding_client_cannot_starve_a_polite_one(auth_server):
    model = auth_server.server.registry.get("builtin")
    gate, entered = threading.Event(), threading.Event()
    inner = model.pipeline.backend

    class Held:
        def __getattr__(self, name):
            return getattr(inner, name)

        def unet(self, *args):
            entered.set()
            assert gate.wait(WAIT_S)
            return inner.unet(*args)

    model.pipeline.backend = Held()
    flood_results: list[object] = []
    try:
        with DiffusionClient(auth_server.address, timeout=WAIT_S, token=ALICE) as flooder:
            futures = [
                flooder._stub.Generate.future(build_request("flood", steps=1), timeout=WAIT_S, metadata=flooder.metadata)
                for _ in range(8)
            ]
            assert entered.wait(WAIT_S)
            refused = []
            for f in futures:
                try:
                    f.result(timeout=0.5)
                except grpc.FutureTimeoutError:
                    continue  # still running or queued: one of alice's two places
                except grpc.RpcError as error:
                    refused.append(error)
            gate.set()
            with DiffusionClient(auth_server.address, timeout=WAIT_S, token=BOB) as polite:
                for i in range(3):
                    assert polite.generate("polite", steps=1, seed=i).images
            for f in futures:
                try:
                    flood_results.append(f.result(timeout=WAIT_S))
                except grpc.RpcError as error:
                    flood_results.append(error)
    finally:
        gate.set()
        model.pipeline.backend = inner
    errors = [r for r in flood_results if isinstance(r, grpc.RpcError)]
    assert len(errors) == 6 and len(flood_results) - len(errors) == 2
    assert all(e.code() is grpc.StatusCode.RESOURCE_EXHAUSTED for e in errors)
    assert all("--per-client-max-inflight 2" in e.details() for e in errors)


def test_rate_limit_is_a_token_bucket_per_client():
    now = [0.0]
    limits = ClientLimits(ClientLimitSettings(rate=2.0, burst=3), clock=lambda: now[0])
    for _ in range(3):
        limits.acquire("a")
        limits.release("a")
    with pytest.raises(ResourceExhausted, match="--per-client-rate 2 requests/s"):
        limits.acquire("a")
    limits.acquire("b")  # another client has its own bucket
    now[0] += 0.5  # one more call's worth of tokens
    limits.acquire("a")
    with pytest.raises(ResourceExhausted):
        limits.acquire("a")
    assert peer_address("ipv4:10.1.2.3:5000") == "10.1.2.3" and peer_address("ipv6:[::1]:5000") == "::1"


# -- TLS -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority(directory)
    other = CertificateAuthority(directory, "another CA")
    return {
        "ca": ca.pem,
        "server": ca.issue("server", "localhost", server=True),
        "client": ca.issue("client", "a client", server=False),
        "stranger": other.issue("stranger", "a stranger", server=False),
    }


def test_tls_and_mutual_tls(builtin_dir, pki):
    server = pki["server"]
    tls = TlsSettings(cert=str(server.cert), key=str(server.key), client_ca=str(pki["ca"]))
    with running_server(settings(builtin_dir, tls=tls, warmup=False)) as thread:
        client_pem, stranger = pki["client"], pki["stranger"]
        with DiffusionClient(thread.address, timeout=WAIT_S,
                             credentials=tls_credentials(pki["ca"], client_pem.cert, client_pem.key)) as c:
            assert c.generate("a fox", steps=1).images
        for credentials in (
            tls_credentials(pki["ca"]),  # no client certificate
            tls_credentials(pki["ca"], stranger.cert, stranger.key),  # signed by another CA
            None,  # plaintext
        ):
            with DiffusionClient(thread.address, timeout=10, credentials=credentials) as c:
                with pytest.raises(ClientError) as info:
                    c.list_models()
                assert info.value.code is grpc.StatusCode.UNAVAILABLE


def test_tls_without_client_certificates(builtin_dir, pki):
    server = pki["server"]
    with running_server(settings(builtin_dir, tls=TlsSettings(str(server.cert), str(server.key)), warmup=False)) as t:
        with DiffusionClient(t.address, timeout=WAIT_S, credentials=tls_credentials(pki["ca"])) as c:
            assert c.list_models()
        from diffusiond.cli import main

        assert main(["models", "--server", t.address, "--tls-ca", str(pki["ca"])]) == 0
        assert main(["models", "--server", t.address, "--timeout", "10"]) == 1  # plaintext to a TLS port


# -- hostile input -------------------------------------------------------------------------


def raw_call(address: str, method: str, payload: bytes, stream: bool = False):
    channel = grpc.insecure_channel(address)
    try:
        if stream:
            return list(channel.unary_stream(method)(payload, timeout=WAIT_S))
        return channel.unary_unary(method)(payload, timeout=WAIT_S)
    finally:
        channel.close()


TRUNCATED = b"\xff\xff\xff"  # a field tag whose varint never ends
BAD_UTF8_PROMPT = b"\x1a\x02\xff\xfe"  # field 3 (GenerateRequest.prompt) holding bytes that are not UTF-8


@pytest.mark.parametrize(("method", "stream", "type_name", "payload"), [
    ("/diffusiond.v1.Diffusion/Generate", False, "GenerateRequest", TRUNCATED),
    ("/diffusiond.v1.Diffusion/Generate", False, "GenerateRequest", BAD_UTF8_PROMPT),
    ("/diffusiond.v1.Diffusion/StreamProgress", True, "GenerateRequest", TRUNCATED),
    ("/diffusiond.v1.Diffusion/StreamProgress", True, "GenerateRequest", BAD_UTF8_PROMPT),
    ("/diffusiond.v1.Diffusion/ListModels", False, "ListModelsRequest", TRUNCATED),
    ("/grpc.health.v1.Health/Check", False, "HealthCheckRequest", TRUNCATED),
])
def test_bytes_that_are_not_a_message_are_invalid_argument(server, caplog, method, stream, type_name, payload):
    with caplog.at_level(logging.INFO):
        with pytest.raises(grpc.RpcError) as info:
            raw_call(server.address, method, payload, stream)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert f"not a valid {type_name}" in info.value.details()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("field", ["model", "scheduler"])
def test_huge_echoed_values_keep_the_status_small(client, field):
    with pytest.raises(ClientError) as info:
        client.generate("a fox", steps=1, **{field: "x" * 100_000})
    assert info.value.code is grpc.StatusCode.NOT_FOUND
    assert len(info.value.details.encode()) < MAX_STATUS_BYTES and "100000 characters" in info.value.details


def test_request_ids_cannot_forge_log_lines(client, caplog):
    hostile = ["evil\nINFO forged line", "x\r\x1b[31mred", "y" * 200_000]
    with caplog.at_level(logging.INFO, logger="diffusiond"):
        for request_id in hostile:
            with pytest.raises(ClientError) as info:
                client.generate("a fox", steps=1, request_id=request_id)
            assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(ClientError) as info:
            client.generate("a fox", steps=1, metadata=[("x-request-id", "abc req=forged")])
        assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT and "x-request-id" in info.value.details
    for record in caplog.records:
        message = record.getMessage()
        assert "\n" not in message and "\r" not in message and "\x1b" not in message
        assert len(message) < 1000
        assert "req=forged" not in message


def test_log_formatter_escapes_control_characters():
    from diffusiond.server.logs import SafeFormatter

    record = logging.LogRecord("x", logging.INFO, __file__, 1, "value %s", ("a\nb\x1b[0m",), None)
    assert SafeFormatter("%(message)s").format(record) == "value a\\x0ab\\x1b[0m"
