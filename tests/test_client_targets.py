"""Client addressing: host names and IP literals, several addresses balanced, flags after the sub-command."""

from __future__ import annotations

import time

import grpc
import pytest
from advface_client import GuardClient
from advface_client.cli import build_parser
from advface_client.cli import main as client_main
from advface_client.targets import channel_target

from tests.helpers import LiveServer, registry_sample


@pytest.mark.parametrize(("spec", "target", "authority"), [
    ("guard.internal:50051", "dns:///guard.internal:50051", None),
    ("10.0.0.5:50051", "dns:///10.0.0.5:50051", None),
    ("[fd00::5]:50051", "dns:///[fd00::5]:50051", None),
    ("dns:///guard-headless:50051", "dns:///guard-headless:50051", None),
    ("unix:/run/advface.sock", "unix:/run/advface.sock", None),
    ("10.0.0.5:1, 10.0.0.6:2", "ipv4:10.0.0.5:1,10.0.0.6:2", "10.0.0.5"),
    ("[fd00::5]:1,[fd00::6]:1", "ipv6:[fd00::5]:1,[fd00::6]:1", "fd00::5"),
    ("10.0.0.5:1,[fd00::6]:1", "ipv6:[::ffff:a00:5]:1,[fd00::6]:1", "10.0.0.5"),
    ("10.0.0.5:1,10.0.0.5:1", "ipv4:10.0.0.5:1", "10.0.0.5"),
])
def test_addresses_become_one_grpc_target(spec: str, target: str, authority: str | None) -> None:
    resolved = channel_target(spec)
    assert (resolved.target, resolved.authority) == (target, authority)


def test_several_host_names_are_resolved_to_their_addresses() -> None:
    resolved = channel_target("localhost:7001,127.0.0.1:7002")
    assert "127.0.0.1:7001" in resolved.target and "127.0.0.1:7002" in resolved.target
    assert resolved.authority == "localhost"


@pytest.mark.parametrize(("spec", "problem"), [
    ("guard.internal", "is not HOST:PORT"),
    ("fd00::5:50051", "in brackets"),
    (" , ", "no service address"),
    ("no-such-host.invalid:1,localhost:2", "cannot resolve 'no-such-host.invalid'"),
])
def test_bad_addresses_are_named(spec: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        channel_target(spec)


def test_several_host_names_balance_over_every_replica(live_server: LiveServer, start_live_server) -> None:  # noqa: ANN001
    other = start_live_server()
    servers = (live_server, other)

    def served(live: LiveServer) -> float:
        return registry_sample(live, "advface_requests_total", method="GetModelInfo", code="OK")

    before = [served(s) for s in servers]
    target = ",".join(f"localhost:{s.running.port}" for s in servers)
    with GuardClient(target, timeout=10) as client:
        # round robin sends each call to the next ready replica; both connect within the deadline
        deadline = time.monotonic() + 60
        while not all(served(s) > b for s, b in zip(servers, before, strict=True)):
            assert time.monotonic() < deadline, "one replica never got a call"
            client.info()


def test_an_ipv6_literal_target_reaches_a_server_listening_on_it(start_live_server) -> None:  # noqa: ANN001
    try:
        live = start_live_server(host="::1")
    except (RuntimeError, OSError) as e:
        pytest.skip(f"no IPv6 loopback here: {e}")
    with GuardClient(f"[::1]:{live.running.port}", timeout=10) as client:
        assert client.health() == "SERVING"


def test_target_and_timeout_are_accepted_after_the_sub_command(live_server: LiveServer,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert client_main(["health", "--target", live_server.address]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    # after the command wins over before it; a flag given only before it is kept
    assert client_main(["--target", "127.0.0.1:1", "health", "--target", live_server.address, "--timeout", "10"]) == 0
    assert client_main(["--target", live_server.address, "health"]) == 0
    args = build_parser().parse_args(["--timeout", "3", "--server-name", "guard", "info"])
    assert (args.timeout, args.server_name, args.tls) == (3.0, "guard", False)


def test_the_target_default_comes_from_the_environment(live_server: LiveServer,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADVFACE_TARGET", live_server.address)
    assert client_main(["health"]) == 0


def test_an_unreachable_target_fails_with_its_code(capsys: pytest.CaptureFixture[str]) -> None:
    assert client_main(["health", "--target", "127.0.0.1:1", "--timeout", "3"]) == 1
    assert grpc.StatusCode.UNAVAILABLE.name in capsys.readouterr().err
