"""TLS, mutual TLS, bearer tokens, the metrics interface and reflection v1, over real loopback servers.

Certificates are generated for the session by tests/certs.py (openssl), never committed.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from advface_client import BatchError, GuardClient, TLSConfig
from advface_client.cli import main as client_main
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2

from plugin_service.config import (
    ServerSettings,
    add_settings_arguments,
    settings_from_args,
)
from plugin_service.server.app import StartupError, start_server
from plugin_service.server.auth import TokenFileError, load_tokens
from tests.certs import Pki, make_pki
from tests.helpers import (
    LiveServer,
    feature_source,
    registry_sample,
    run_live_server,
    server_settings,
)

GOOD = "alice-0123456789abcdef"
MONITOR = "monitor-0123456789abcdef"  # may only call GetModelInfo
WRONG = "mallory-0123456789abcdef"
METRICS_HOST = "127.0.0.2"  # another loopback address than the gRPC port's 127.0.0.1
features = feature_source(seed=12)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "tokens"
    path.write_text(f"# issued for the tests\nalice {GOOD}\n\nmonitor {MONITOR} GetModelInfo\n")
    return path


@pytest.fixture(scope="module")
def tls_server(tiny_bundle: Path, pki: Pki, token_file: Path) -> Iterator[LiveServer]:
    """TLS, bearer tokens, and /metrics on another interface than gRPC."""
    yield from run_live_server(server_settings(tiny_bundle, tls_cert=pki.server_cert, tls_key=pki.server_key,
                                      auth_tokens=token_file, metrics_host=METRICS_HOST))


@pytest.fixture(scope="module")
def mtls_server(tiny_bundle: Path, pki: Pki) -> Iterator[LiveServer]:
    yield from run_live_server(server_settings(tiny_bundle, tls_cert=pki.server_cert, tls_key=pki.server_key,
                                      tls_client_ca=pki.ca))


def _local(live: LiveServer) -> str:
    """The server's address by host name, as its certificate names it."""
    return f"localhost:{live.running.port}"


# --- TLS ------------------------------------------------------------------------------------------

def test_tls_with_a_token_protects_and_health_needs_no_token(tls_server: LiveServer, pki: Pki) -> None:
    with GuardClient(_local(tls_server), tls=TLSConfig(ca_cert=pki.ca), token=GOOD) as client:
        result = client.protect(features(1), batch_id="over-tls")
        assert result.features.shape == (1, 64, 77, 77)
        (streamed,) = list(client.protect_stream([("streamed", features(1))]))
        assert streamed.error is None
    with GuardClient(_local(tls_server), tls=TLSConfig(ca_cert=pki.ca)) as anonymous:
        assert anonymous.health() == "SERVING"  # probes carry no token


def test_server_name_override_verifies_a_certificate_for_another_name(tls_server: LiveServer, pki: Pki) -> None:
    # dialled by IP, verified as "localhost"; a name the certificate lacks is refused
    with GuardClient(f"127.0.0.1:{tls_server.running.port}", tls=TLSConfig(pki.ca, server_name="localhost")) as c:
        assert c.health() == "SERVING"
    with GuardClient(f"127.0.0.1:{tls_server.running.port}", tls=TLSConfig(pki.ca, server_name="guard.example"),
                     timeout=5) as c, pytest.raises(grpc.RpcError) as info:
        c.health()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_plaintext_or_untrusting_clients_cannot_talk_to_a_tls_server(tls_server: LiveServer, pki: Pki) -> None:
    for tls in (None, TLSConfig(ca_cert=pki.other_ca)):
        with GuardClient(_local(tls_server), tls=tls, timeout=5) as client, pytest.raises(grpc.RpcError) as info:
            client.health()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_needs_a_client_certificate_the_server_trusts(mtls_server: LiveServer, pki: Pki) -> None:
    for tls in (TLSConfig(ca_cert=pki.ca), TLSConfig(pki.ca, pki.stranger_cert, pki.stranger_key)):
        with GuardClient(_local(mtls_server), tls=tls, timeout=5) as client, pytest.raises(grpc.RpcError) as info:
            client.health()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    with GuardClient(_local(mtls_server), tls=TLSConfig(pki.ca, pki.client_cert, pki.client_key)) as client:
        assert client.info().feature_shape == [64, 77, 77]


def test_a_client_certificate_without_its_key_is_refused_by_the_client() -> None:
    with pytest.raises(ValueError, match="go together"):
        TLSConfig(client_cert=Path("client.pem"))


# --- bearer tokens --------------------------------------------------------------------------------

def test_missing_and_unknown_tokens_are_unauthenticated_on_every_service_method(tls_server: LiveServer,
                                                                                pki: Pki) -> None:
    before = registry_sample(tls_server, "advface_requests_total", method="GetModelInfo", code="UNAUTHENTICATED")
    for token in (None, WRONG):
        with GuardClient(_local(tls_server), tls=TLSConfig(ca_cert=pki.ca), token=token, max_retries=0) as client:
            with pytest.raises(grpc.RpcError) as info:
                client.info()
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "Bearer" in info.value.details() and WRONG not in info.value.details()
            with pytest.raises(BatchError) as unary:
                client.protect(features(1))
            assert unary.value.code == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as streamed:
                list(client.protect_stream([("s", features(1))]))
            assert streamed.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert registry_sample(tls_server, "advface_requests_total", method="GetModelInfo", code="UNAUTHENTICATED") == before + 2


def test_a_token_limited_to_some_methods_is_permission_denied_elsewhere(tls_server: LiveServer, pki: Pki) -> None:
    with GuardClient(_local(tls_server), tls=TLSConfig(ca_cert=pki.ca), token=MONITOR) as client:
        assert client.info().model_version
        with pytest.raises(BatchError) as info:
            client.protect(features(1))
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED and "may not call Protect" in info.value.detail


def test_tokens_never_reach_a_log_line_but_callers_are_named(tls_server: LiveServer, pki: Pki,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for token in (GOOD, WRONG):
        with GuardClient(_local(tls_server), tls=TLSConfig(ca_cert=pki.ca), token=token, max_retries=0) as client:
            try:
                client.info()
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "caller alice calls /advface.v1.AdvFaceGuard/GetModelInfo" in caplog.text
    assert "refused /advface.v1.AdvFaceGuard/GetModelInfo: an unknown bearer token" in caplog.text
    assert GOOD not in caplog.text and WRONG not in caplog.text and MONITOR not in caplog.text


def test_the_client_cli_takes_tls_and_token_flags_after_the_command(tls_server: LiveServer, pki: Pki,
                                                                    tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    token = tmp_path / "token"
    token.write_text(GOOD + "\n")
    assert client_main(["info", "--target", _local(tls_server), "--ca-cert", str(pki.ca),
                        "--token-file", str(token)]) == 0
    assert '"feature_shape"' in capsys.readouterr().out
    assert client_main(["info", "--target", _local(tls_server), "--ca-cert", str(pki.ca)]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err


def test_the_client_cli_reads_the_token_from_the_environment(tls_server: LiveServer, pki: Pki,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADVFACE_TOKEN", GOOD)
    monkeypatch.setenv("ADVFACE_CA_CERT", str(pki.ca))
    assert client_main(["--target", _local(tls_server), "info"]) == 0


@pytest.mark.parametrize(("content", "problem"), [
    ("alice short\n", "shorter than 16"),
    (f"alice {GOOD}\nbob {GOOD}\n", "repeats the token"),
    (f"alice {GOOD}\nalice {WRONG}\n", "used twice"),
    (f"alice {GOOD} Protect,Delete\n", "unknown method(s) ['Delete']"),
    ("# nothing\n", "holds no token"),
])
def test_bad_token_files_are_refused_naming_the_line_not_the_token(tmp_path: Path, content: str,
                                                                   problem: str) -> None:
    path = tmp_path / "tokens"
    path.write_text(content)
    with pytest.raises(TokenFileError) as info:
        load_tokens(path, ["Protect", "ProtectStream", "GetModelInfo"])
    assert problem in str(info.value) and GOOD not in str(info.value) and "short " not in str(info.value)


def test_a_bad_token_file_stops_the_start_before_the_bundle_loads(tmp_path: Path, tiny_bundle: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("too-short\n")
    with pytest.raises(StartupError, match="cannot use the token file: .* line 1: token of caller 'line-1'"):
        asyncio.run(start_server(server_settings(tiny_bundle, auth_tokens=path)))


# --- settings --------------------------------------------------------------------------------------

def test_security_settings_come_from_flags_and_environment(pki: Pki, token_file: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    monkeypatch.setenv("ADVFACE_TLS_CERT", str(pki.server_cert))
    monkeypatch.setenv("ADVFACE_TLS_KEY", str(pki.server_key))
    monkeypatch.setenv("ADVFACE_METRICS_HOST", "127.0.0.1")
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    settings = settings_from_args(parser.parse_args(["--tls-client-ca", str(pki.ca), "--auth-tokens", str(token_file)]))
    assert (settings.tls_cert, settings.tls_key, settings.tls_client_ca, settings.auth_tokens) == (
        pki.server_cert, pki.server_key, pki.ca, token_file)
    assert settings.metrics_host == "127.0.0.1"


@pytest.mark.parametrize(("fields", "problem"), [
    ({"tls_cert": "cert"}, "--tls-cert and --tls-key go together"),
    ({"tls_client_ca": "ca"}, "needs --tls-cert"),
    ({"auth_tokens": "."}, "--auth-tokens: . is a directory"),
    ({"tls_cert": "missing.pem", "tls_key": "missing.key"}, "--tls-cert: missing.pem does not exist"),
])
def test_half_a_security_setup_is_refused(fields: dict[str, str], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        replace(ServerSettings(), **{k: Path(v) for k, v in fields.items()}).validate()  # type: ignore[arg-type]


# --- metrics interface ---------------------------------------------------------------------------

def test_metrics_listen_on_their_own_interface(tls_server: LiveServer) -> None:
    port = _metrics_port(tls_server)
    text = urllib.request.urlopen(f"http://{METRICS_HOST}:{port}/metrics", timeout=10).read().decode()
    assert "advface_requests_total" in text
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10)


def _metrics_port(live: LiveServer) -> int:
    return int(live.metrics_url.rsplit(":", 1)[1].split("/")[0])


# --- reflection -------------------------------------------------------------------------------------

def _reflect(channel: grpc.Channel, version: str, request: reflection_pb2.ServerReflectionRequest,
             metadata: tuple[tuple[str, str], ...]) -> reflection_pb2.ServerReflectionResponse:
    call = channel.stream_stream(f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                                 request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                 response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
    (response,) = list(call(iter([request]), timeout=10, metadata=metadata))
    return response


def test_reflection_v1_and_v1alpha_list_the_service_for_token_holders(tls_server: LiveServer, pki: Pki) -> None:
    credentials = grpc.ssl_channel_credentials(pki.ca.read_bytes())
    auth = (("authorization", f"Bearer {GOOD}"),)
    with grpc.secure_channel(_local(tls_server), credentials) as channel:
        for version in ("v1", "v1alpha"):
            listed = _reflect(channel, version, reflection_pb2.ServerReflectionRequest(list_services=""), auth)
            names = {s.name for s in listed.list_services_response.service}
            assert {"advface.v1.AdvFaceGuard", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
                    "grpc.reflection.v1alpha.ServerReflection"} <= names
        described = _reflect(channel, "v1", reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="grpc.reflection.v1.ServerReflection"), auth)
        (raw,) = described.file_descriptor_response.file_descriptor_proto
        assert descriptor_pb2.FileDescriptorProto.FromString(raw).package == "grpc.reflection.v1"
        with pytest.raises(grpc.RpcError) as info:  # the schema is for token holders too
            _reflect(channel, "v1", reflection_pb2.ServerReflectionRequest(list_services=""), ())
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_reflection_v1_answers_on_a_plain_server(live_server: LiveServer) -> None:
    with grpc.insecure_channel(live_server.address) as channel:
        listed = _reflect(channel, "v1", reflection_pb2.ServerReflectionRequest(list_services=""), ())
    assert "advface.v1.AdvFaceGuard" in {s.name for s in listed.list_services_response.service}


@pytest.mark.slow  # the demo: a server subprocess and 40 PGD steps
def test_the_demo_runs_secured_end_to_end(tiny_bundle: Path, pki: Pki, token_file: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    from plugin_service.cli import main as advface_main

    token = tmp_path / "token"
    token.write_text(GOOD)
    common = ["demo", "--bundle", str(tiny_bundle), "--out", str(tmp_path / "out"), "--tls-cert", str(pki.server_cert),
              "--tls-key", str(pki.server_key), "--tls-client-ca", str(pki.ca), "--auth-tokens", str(token_file),
              "--ca-cert", str(pki.ca), "--client-cert", str(pki.client_cert), "--client-key", str(pki.client_key)]
    assert advface_main([*common, "--token-file", str(token)]) == 0
    out = capsys.readouterr().out
    assert "[demo] enrolled " in out and "server drained and exited with code 0" in out
    assert advface_main(common) == 2  # a secured server and no token: refused before anything starts
    assert "give the client --token-file or ADVFACE_TOKEN" in capsys.readouterr().err
