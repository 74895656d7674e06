"""TLS: wss:// for devices and operators, certificate checks in the clients, reload on SIGHUP keeping connections."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import ssl
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
import trustme

from device_client import DeviceClient
from device_client.client import InsecureURLError, client_ssl_context, is_loopback
from firmware_sim import cli as sim_cli
from hub import cli as hub_cli
from hub.app import HubHandle, reload_tls
from hub.config import ConfigError, TLSConfig
from hub.edge import ServerTLS, TLSError, certificate_fingerprint, check_tls_files
from hub.fleet import Registry
from hub.operator import ConnectFailed, ctl, open_control
from tests.hubproc import HubProcess, run_hub
from tests.hubtools import add_devices, hub_config, start_hub, telemetry_lines
from tests.waiting import eventually

# ---------------------------------------------------------------------------- certificates


@attrs.frozen
class Issued:
    """A server certificate written to PEM files, and the DER bytes a client sees."""

    cert_file: Path
    key_file: Path
    der: bytes


@attrs.frozen
class Authority:
    """A test CA and its certificate file (what a client trusts)."""

    ca: trustme.CA
    ca_file: Path

    def issue(self, directory: Path, *names: str) -> Issued:
        """A certificate for `names` (default 127.0.0.1 and localhost), in new files under `directory`."""
        directory.mkdir(parents=True, exist_ok=True)
        cert = self.ca.issue_cert(*(names or ("127.0.0.1", "localhost")))
        cert_file, key_file = directory / "cert.pem", directory / "key.pem"
        cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        cert.private_key_pem.write_to_path(str(key_file))
        der = ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())
        return Issued(cert_file, key_file, der)


def authority(directory: Path) -> Authority:
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    ca_file = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return Authority(ca, ca_file)


def install(issued: Issued, cert_file: Path, key_file: Path) -> None:
    """Put a certificate and key in place the way a rotation tool would: each file replaced atomically."""
    for source, target in ((issued.cert_file, cert_file), (issued.key_file, key_file)):
        tmp = target.with_suffix(".new")
        tmp.write_bytes(source.read_bytes())
        os.replace(tmp, target)


async def peer_certificate(port: int, ca_file: Path, host: str = "127.0.0.1") -> bytes:
    """The certificate (DER) the hub presents to a new TLS connection that trusts `ca_file`."""
    context = ssl.create_default_context(cafile=str(ca_file))
    with trio.fail_after(20):
        stream = await trio.open_ssl_over_tcp_stream(host, port, ssl_context=context, https_compatible=True)
        try:
            await stream.do_handshake()
            return stream.getpeercert(binary_form=True)
        finally:
            await stream.aclose()


@attrs.frozen
class TLSHub:
    """A hub in this trio loop serving wss:// with a certificate of `authority`."""

    handle: HubHandle
    data: Path
    authority: Authority
    cert: Issued  # the certificate the hub was started with
    tokens: dict[str, str]
    operator: str

    @property
    def device_url(self) -> str:
        return f"wss://127.0.0.1:{self.handle.port}"

    @property
    def control_url(self) -> str:
        return f"wss://127.0.0.1:{self.handle.port}/v1/control"


@asynccontextmanager
async def tls_hub(tmp_path: Path, *names: str) -> AsyncIterator[TLSHub]:
    ca = authority(tmp_path / "ca1")
    cert = ca.issue(tmp_path / "issued1", *names)
    live = tmp_path / "live"  # the paths in the hub's configuration; rotations replace the files in them
    live.mkdir()
    install(cert, live / "cert.pem", live / "key.pem")
    data = tmp_path / "hub"
    tokens = add_devices(data, "d1", "d2")
    with Registry(data / "registry.sqlite3") as registry:
        operator = registry.add_operator("alice", "operator")
    config = hub_config(data, **{"tls.cert_file": str(live / "cert.pem"), "tls.key_file": str(live / "key.pem")})
    async with trio.open_nursery() as nursery:
        handle = await start_hub(nursery, config)
        yield TLSHub(handle, data, ca, cert, tokens, operator)
        handle.stop()


# ---------------------------------------------------------------------------- configuration and files


def test_tls_config_needs_cert_and_key_together(tmp_path: Path) -> None:
    assert not hub_config(tmp_path).tls.enabled
    with pytest.raises(ConfigError, match="cert_file and key_file go together"):
        hub_config(tmp_path, **{"tls.cert_file": "/etc/hub/cert.pem"})
    with pytest.raises(ConfigError, match="cert_file and key_file go together"):
        hub_config(tmp_path, **{"tls.key_file": "/etc/hub/key.pem"})
    config = hub_config(tmp_path, **{"tls.cert_file": "c.pem", "tls.key_file": "k.pem"})
    assert config.tls == TLSConfig("c.pem", "k.pem") and config.tls.enabled


def test_bad_tls_files_are_refused_with_a_clear_reason(tmp_path: Path) -> None:
    good = authority(tmp_path / "ca").issue(tmp_path / "a")
    other = authority(tmp_path / "ca2").issue(tmp_path / "b")
    check_tls_files(TLSConfig(str(good.cert_file), str(good.key_file)))
    check_tls_files(TLSConfig())  # no TLS: nothing to check

    with pytest.raises(TLSError, match=r"cannot read the TLS file .*missing\.pem: No such file"):
        ServerTLS(str(tmp_path / "missing.pem"), str(good.key_file))
    with pytest.raises(TLSError, match="the key does not belong to the certificate"):
        ServerTLS(str(good.cert_file), str(other.key_file))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(TLSError, match="not a PEM certificate"):
        ServerTLS(str(garbage), str(good.key_file))

    # An encrypted key is refused at once instead of OpenSSL prompting on the terminal.
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(good.key_file.read_bytes(), None)
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(TLSError, match="encrypted"):
        ServerTLS(str(good.cert_file), str(encrypted))


def test_certificate_fingerprint(tmp_path: Path) -> None:
    import hashlib

    issued = authority(tmp_path / "ca").issue(tmp_path / "a")
    assert certificate_fingerprint(str(issued.cert_file)) == hashlib.sha256(issued.der).hexdigest()
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    assert certificate_fingerprint(str(empty)) == ""


def test_hub_serve_refuses_unloadable_tls_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = ["--data-dir", str(tmp_path / "hub"), "--port", "0", "--metrics-port", "0"]
    missing = ["--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", str(tmp_path / "nope.key")]
    assert hub_cli.main(["serve", *data, *missing]) == 2
    assert "cannot read the TLS file" in capsys.readouterr().err
    assert hub_cli.main(["serve", *data, "--tls-cert", str(tmp_path / "c.pem")]) == 2
    assert "cert_file and key_file go together" in capsys.readouterr().err


# ---------------------------------------------------------------------------- what the clients refuse


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("localhost.", True),
        ("192.0.2.1", False),
        ("10.0.0.1", False),
        ("0.0.0.0", False),
        ("2001:db8::1", False),
        ("localhost.example.com", False),
        ("127.0.0.1.nip.io", False),
        ("hub", False),
        ("", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection fails the test (trio-websocket connects through these)."""

    async def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"a network connection was attempted: {args}")

    monkeypatch.setattr(trio, "open_tcp_stream", refuse)
    monkeypatch.setattr(trio, "open_ssl_over_tcp_stream", refuse)


def test_device_client_refuses_plain_ws_to_a_remote_host(no_network: None) -> None:
    with pytest.raises(InsecureURLError, match=r"refusing plain ws:// to '192\.0\.2\.1'.*use wss://"):
        DeviceClient("ws://192.0.2.1:8765", "d1.secret")
    with pytest.raises(InsecureURLError):
        DeviceClient("ws://hub.example:8765/v1/device", "d1.secret")
    assert isinstance(InsecureURLError("x"), ValueError)  # callers that check URLs with ValueError still work
    # Allowed when asked for, and always to loopback; wss:// needs nothing.
    assert DeviceClient("ws://192.0.2.1:8765", "d1.secret", allow_insecure=True).url == "ws://192.0.2.1:8765/v1/device"
    DeviceClient("ws://localhost:8765", "d1.secret")
    DeviceClient("wss://192.0.2.1:8765", "d1.secret")


async def test_control_client_refuses_plain_ws_before_connecting(no_network: None) -> None:
    with pytest.raises(InsecureURLError, match="refusing plain ws://"):
        async with open_control("ws://192.0.2.1:8765", "op.alice.x"):
            pass  # pragma: no cover
    # The guard is real: when plain ws:// is allowed, the client does try to connect.
    with pytest.raises(AssertionError, match="network connection was attempted"):
        async with open_control("ws://192.0.2.1:8765", "op.alice.x", allow_insecure=True):
            pass  # pragma: no cover


def test_ca_file_problems_are_value_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"cannot load the CA file .*missing\.pem"):
        client_ssl_context("wss://hub:8765", ca_file=tmp_path / "missing.pem")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("nothing here\n")
    with pytest.raises(ValueError, match="cannot load the CA file"):
        DeviceClient("wss://hub:8765", "d1.secret", ca_file=garbage)
    ca = authority(tmp_path / "ca")
    with pytest.raises(ValueError, match="a CA file is for wss:// URLs"):
        client_ssl_context("ws://127.0.0.1:8765", ca_file=ca.ca_file)
    context = client_ssl_context("wss://hub:8765", ca_file=ca.ca_file)
    assert context is not None and context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert client_ssl_context("ws://127.0.0.1:8765") is None


def test_hubctl_and_firmware_sim_refuse_plain_ws_to_a_remote_host(
    no_network: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv(ctl.TOKEN_ENV, "op.alice.x")
    assert ctl.main(["--url", "ws://192.0.2.1:8765", "devices"]) == ctl.ExitCode.USAGE
    err = capsys.readouterr().err
    assert "refusing plain ws://" in err and "wss://" in err
    assert ctl.main(["--url", "ws://127.0.0.1:1", "--ca-file", "ca.pem", "status"]) == ctl.ExitCode.USAGE
    assert "a CA file is for wss://" in capsys.readouterr().err

    tokens = tmp_path / "tokens.txt"
    tokens.write_text("d1.secret\n")
    with pytest.raises(SystemExit) as exited:
        sim_cli.main(["--hub", "ws://192.0.2.1:8765", "--tokens", str(tokens)])
    assert exited.value.code == 2
    assert "refusing plain ws://" in capsys.readouterr().err
    parser = sim_cli.build_parser()
    args = parser.parse_args(["--hub", "wss://h:1", "--tokens", "t", "--ca-file", "ca.pem", "--insecure-plain-ws"])
    assert (args.ca_file, args.insecure_plain_ws) == ("ca.pem", True)


# ---------------------------------------------------------------------------- against a real hub over wss://


async def test_device_streams_over_wss(tmp_path: Path) -> None:
    async with tls_hub(tmp_path) as hub:
        async with DeviceClient(hub.device_url, hub.tokens["d1"], ca_file=hub.authority.ca_file) as client:
            for i in range(20):
                await client.send("env", {"t": 20.0 + i}, ts=1_764_000_000_000 + i)
            with trio.fail_after(30):
                await client.wait_acked()
            assert client.stats.points_acked == 20 and client.stats.connects == 1
        # The same certificate for "localhost", also on the HTTP port (/metrics, /healthz, REST, the console).
        assert await peer_certificate(hub.handle.port, hub.authority.ca_file, "localhost") == hub.cert.der
        assert hub.handle.metrics_port is not None
        assert await peer_certificate(hub.handle.metrics_port, hub.authority.ca_file) == hub.cert.der
        context = ssl.create_default_context(cafile=str(hub.authority.ca_file))
        async with httpx.AsyncClient(verify=context) as client:
            reply = await client.get(f"https://127.0.0.1:{hub.handle.metrics_port}/healthz")
        assert reply.status_code == 200 and reply.json()["status"] == "ok"
    assert len(telemetry_lines(hub.data)) == 20


async def test_control_over_wss_and_certificate_problems(tmp_path: Path) -> None:
    async with tls_hub(tmp_path) as hub:
        async with open_control(hub.control_url, hub.operator, ca_file=hub.authority.ca_file) as control:
            names = {d["name"] for d in await control.devices()}
        assert names == {"d1", "d2"}

        # Another CA's certificate: refused at once (not after the 60 s connect timeout), with the reason.
        stranger = authority(tmp_path / "stranger")
        with trio.fail_after(30), pytest.raises(ConnectFailed, match="certificate was not accepted") as refused:
            async with open_control(hub.control_url, hub.operator, ca_file=stranger.ca_file, connect_timeout=60):
                pass  # pragma: no cover
        assert "unable to get local issuer certificate" in str(refused.value)
        # The system CAs do not know the test CA either.
        with trio.fail_after(30), pytest.raises(ConnectFailed, match="certificate was not accepted"):
            async with open_control(hub.control_url, hub.operator, connect_timeout=60):
                pass  # pragma: no cover


async def test_hostname_mismatch_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with tls_hub(tmp_path, "hub.example") as hub:
        with trio.fail_after(30), pytest.raises(ConnectFailed, match="mismatch"):
            async with open_control(hub.control_url, hub.operator, ca_file=hub.authority.ca_file, connect_timeout=60):
                pass  # pragma: no cover
        caplog.set_level(logging.INFO, logger="device_client")
        client = DeviceClient(
            hub.device_url, hub.tokens["d1"], ca_file=hub.authority.ca_file, connect_timeout=60, close_timeout=0.5
        )
        async with client:
            await eventually(lambda: client.stats.connect_failures >= 1, 30, what="a refused connection attempt")
            assert client.stats.connects == 0 and not client.stats.connected
    errors = [r.getMessage() for r in caplog.records if r.name == "device_client" and r.levelno == logging.ERROR]
    assert any("certificate was not accepted" in e and "mismatch" in e for e in errors), errors


async def test_device_with_the_wrong_ca_never_connects(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="device_client")
    async with tls_hub(tmp_path) as hub:
        stranger = authority(tmp_path / "stranger")
        client = DeviceClient(
            hub.device_url,
            hub.tokens["d1"],
            ca_file=stranger.ca_file,
            connect_timeout=60,
            close_timeout=0.5,
            backoff_initial=0.05,
            backoff_max=0.2,
        )
        async with client:
            await client.send("env", {"t": 1.0})
            await eventually(lambda: client.stats.connect_failures >= 2, 30, what="two refused connection attempts")
            assert client.stats.connects == 0 and client.pending + client.buffered > 0
        assert hub.handle.stats.points_in == 0
    assert any("unable to get local issuer certificate" in r.getMessage() for r in caplog.records)


async def test_hubctl_and_firmware_sim_over_wss(tmp_path: Path) -> None:
    async with tls_hub(tmp_path) as hub:
        env = {k: v for k, v in os.environ.items() if k not in (ctl.TOKEN_ENV, ctl.URL_ENV, ctl.CA_FILE_ENV)}
        env[ctl.TOKEN_ENV] = hub.operator

        async def hubctl(*args: str, **extra_env: str) -> trio.Process:
            argv = [sys.executable, "-m", "hub.operator.ctl", "--url", hub.control_url, *args]
            with trio.fail_after(60):
                return await trio.run_process(
                    argv, env={**env, **extra_env}, capture_stdout=True, capture_stderr=True, check=False
                )

        done = await hubctl("--ca-file", str(hub.authority.ca_file), "devices", "--json")
        assert done.returncode == 0, done.stderr
        assert {d["name"] for d in json.loads(done.stdout)} == {"d1", "d2"}
        done = await hubctl("status", **{ctl.CA_FILE_ENV: str(hub.authority.ca_file)})
        assert done.returncode == 0, done.stderr
        done = await hubctl("status")  # the system CAs do not know the test CA
        assert done.returncode == ctl.ExitCode.CONNECT
        assert b"certificate was not accepted" in done.stderr

        token_file = tmp_path / "tokens.txt"
        token_file.write_text(hub.tokens["d2"] + "\n")
        argv = [sys.executable, "-m", "firmware_sim.cli", "--hub", hub.device_url, "--tokens", str(token_file)]
        argv += ["--ca-file", str(hub.authority.ca_file), "--duration", "1.5", "--interval", "0.2"]
        with trio.fail_after(60):
            sim = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
        assert sim.returncode == 0, sim.stderr  # 0: everything it sent was acked
        assert b"done:" in sim.stderr and hub.handle.stats.points_in > 0


# ---------------------------------------------------------------------------- certificate reload


async def test_reload_serves_the_new_certificate_and_keeps_connections(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hub.tls")
    async with tls_hub(tmp_path) as hub:
        port = hub.handle.port
        tls = hub.handle.tls
        assert tls is not None
        live_cert, live_key = Path(tls.cert_file), Path(tls.key_file)
        # This device trusts only the first CA: if its connection dropped, it could not come back.
        async with DeviceClient(hub.device_url, hub.tokens["d1"], ca_file=hub.authority.ca_file) as old:
            await old.send("env", {"t": 1.0}, ts=1_764_000_000_000)
            with trio.fail_after(30):
                await old.wait_acked()

            new_ca = authority(tmp_path / "ca2")
            rotated = new_ca.issue(tmp_path / "issued2")
            install(rotated, live_cert, live_key)
            assert await peer_certificate(port, hub.authority.ca_file) == hub.cert.der  # not before the reload
            assert reload_tls(hub.handle) is True

            assert await peer_certificate(port, new_ca.ca_file) == rotated.der
            assert hub.handle.metrics_port is not None  # the HTTP port shares the context: reloaded with it
            assert await peer_certificate(hub.handle.metrics_port, new_ca.ca_file) == rotated.der
            async with open_control(hub.control_url, hub.operator, ca_file=new_ca.ca_file) as control:
                assert {d["name"] for d in await control.devices()} == {"d1", "d2"}
            with trio.fail_after(30), pytest.raises(ConnectFailed, match="certificate was not accepted"):
                async with open_control(hub.control_url, hub.operator, ca_file=hub.authority.ca_file):
                    pass  # pragma: no cover

            # The connection made before the reload carries on.
            await old.send("env", {"t": 2.0}, ts=1_764_000_000_001)
            with trio.fail_after(30):
                await old.wait_acked()
            assert old.stats.connects == 1 and old.stats.points_acked == 2

            # Files that do not load keep the current certificate.
            third = new_ca.issue(tmp_path / "issued3")
            live_cert.write_bytes(third.cert_file.read_bytes())  # a new certificate with the current key: mismatch
            assert reload_tls(hub.handle) is False
            assert await peer_certificate(port, new_ca.ca_file) == rotated.der
            live_cert.unlink()
            assert reload_tls(hub.handle) is False
            assert await peer_certificate(port, new_ca.ca_file) == rotated.der
            await old.send("env", {"t": 3.0}, ts=1_764_000_000_002)
            with trio.fail_after(30):
                await old.wait_acked()
            assert old.stats.connects == 1
    messages = [r.getMessage() for r in caplog.records if r.name == "hub.tls"]
    assert messages.count("tls certificate reloaded") == 1
    assert messages.count("tls reload failed: keeping the current certificate") == 2
    assert len(telemetry_lines(hub.data)) == 3


async def test_reload_without_tls_does_nothing(tmp_path: Path) -> None:
    data = tmp_path / "hub"
    async with trio.open_nursery() as nursery:
        handle = await start_hub(nursery, hub_config(data))
        assert handle.tls is None
        assert reload_tls(handle) is False
        handle.stop()


async def test_sighup_reloads_the_certificate_of_a_hub_process(tmp_path: Path) -> None:
    first_ca = authority(tmp_path / "ca1")
    first = first_ca.issue(tmp_path / "issued1")
    live = tmp_path / "live"
    live.mkdir()
    install(first, live / "cert.pem", live / "key.pem")
    data = tmp_path / "hub"
    tokens = add_devices(data, "d1")
    hub = HubProcess(data, "--tls-cert", str(live / "cert.pem"), "--tls-key", str(live / "key.pem"))
    hub.start()
    try:
        url = f"wss://127.0.0.1:{hub.port}"
        assert await peer_certificate(hub.port, first_ca.ca_file) == first.der
        async with DeviceClient(url, tokens["d1"], ca_file=first_ca.ca_file) as old:
            await old.send("env", {"t": 1.0}, ts=1_764_000_000_000)
            with trio.fail_after(30):
                await old.wait_acked()

            second_ca = authority(tmp_path / "ca2")
            second = second_ca.issue(tmp_path / "issued2")
            install(second, live / "cert.pem", live / "key.pem")
            hub.signal(signal.SIGHUP)

            async def rotated() -> bool:
                try:
                    return await peer_certificate(hub.port, second_ca.ca_file) == second.der
                except trio.BrokenResourceError:  # the old certificate, not trusted by the new CA: not yet
                    return False

            await eventually(rotated, 30, what="the new certificate after SIGHUP")
            http_port = int(re.findall(r'msg="metrics listening" host=\S+ port=(\d+)', hub.log())[-1])
            assert await peer_certificate(http_port, second_ca.ca_file) == second.der  # the HTTP port's too
            await old.send("env", {"t": 2.0}, ts=1_764_000_000_001)
            with trio.fail_after(30):
                await old.wait_acked()
            assert old.stats.connects == 1
        hub.signal(signal.SIGTERM)
        assert hub.wait() == 0
    finally:
        hub.kill()
    log = hub.log()
    assert "tls certificate reloaded" in log and "SIGHUP" in log
    assert "Traceback" not in log
    assert len(telemetry_lines(data)) == 2


def test_demo_over_tls(tmp_path: Path) -> None:
    """`hub demo --tls-cert/--tls-key`: the in-process fleet trusts the hub's certificate file and streams over wss://."""
    ca = authority(tmp_path / "ca")
    issued = ca.issue(tmp_path / "issued")
    # The demo's devices trust the certificate file itself: with the CA in it, like a self-signed certificate.
    issued.cert_file.write_bytes(issued.cert_file.read_bytes() + ca.ca_file.read_bytes())
    args = ["demo", "--devices", "2", "--duration", "2", "--port", "0", "--data-dir", str(tmp_path / "hub")]
    result = run_hub(*args, "--tls-cert", str(issued.cert_file), "--tls-key", str(issued.key_file), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "hub listening on wss://127.0.0.1:" in result.stdout
    assert re.search(r"^web console: https://127\.0\.0\.1:\d+/$", result.stdout, re.MULTILINE), result.stdout
    match = re.search(r"done: all (\d+) points acked and durable", result.stdout)
    assert match and int(match.group(1)) > 0, result.stdout


async def test_a_refusal_before_the_handshake_is_answered_over_tls(tmp_path: Path) -> None:
    """Past max_handshakes a wss:// client reads its 503 + Retry-After through TLS, like a ws:// one in plain."""
    async with tls_hub(tmp_path) as hub:
        hub.handle.edge.admission.max_pending = 0  # every place taken
        context = ssl.create_default_context(cafile=str(hub.authority.ca_file))
        with trio.fail_after(20):
            stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", hub.handle.port, ssl_context=context)
            await stream.send_all(b"GET /v1/device HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            answer = b""
            try:
                while chunk := await stream.receive_some():
                    answer += chunk
            except trio.BrokenResourceError:
                pass  # the hub closed without close_notify: what was read is the answer
            await trio.aclose_forcefully(stream)
        assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n") and b"\r\nretry-after: " in answer
        assert hub.handle.stats.admission_refused == 1
