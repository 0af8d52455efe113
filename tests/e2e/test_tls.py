"""
End to end over TLS: a server on Twisted's ssl: endpoint, clients on its
tls: endpoint that verify the server, and servers that only let in clients
holding a certificate from a given authority.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from certificates import Authority
from pytest_twisted import ensureDeferred

from txtask import CheckoutTimeout, RemoteError


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    """
    Two authorities: "ca", which signed the server's certificate and the
    authorised client's, and "stranger", which signed another client's.
    """
    made: dict[str, Path] = {}
    for name in ("ca", "stranger"):
        authority = Authority(tmp_path, name)
        made[f"{name}_roots"] = authority.roots
        made[f"{name}_file"] = authority.path
        made[f"{name}_client"], made[f"{name}_client_key"] = authority.issue(
            f"{name}-client"
        )
        if name == "ca":
            made["server"], made["server_key"] = authority.issue("server")
    return made


def tls_listen(pki: dict[str, Path]) -> str:
    return f"ssl:0:privateKey={pki['server_key']}:certKey={pki['server']}"


def tls_connect(port: int, roots: Path, client: tuple[Path, Path] | None = None) -> str:
    description = f"tls:127.0.0.1:{port}:trustRoots={roots}"
    if client is not None:
        description += f":certificate={client[0]}:privateKey={client[1]}"
    return description


@ensureDeferred
async def test_tls_call_works_and_binds_loopback(start_server, make_client, pki):
    server = await start_server(listen=tls_listen(pki))
    address = (await server.listening).getHost()
    assert address.host == "127.0.0.1"
    client = make_client(tls_connect(address.port, pki["ca_roots"]))
    with client.checkout(timeout=10) as checkout:
        pid = await checkout.pid()
        assert await checkout.echo("one", key=b"\x00") == [["one"], {"key": b"\x00"}]
        assert await checkout.pid() == pid
    assert pid != os.getpid()


@ensureDeferred
async def test_tls_carries_a_large_value_both_ways(start_server, make_client, pki):
    """The relay through the server keeps every byte, in order, both ways."""
    server = await start_server(listen=tls_listen(pki))
    port = (await server.listening).getHost().port
    client = make_client(tls_connect(port, pki["ca_roots"]))
    value = os.urandom(8 * 2**20)
    assert await client.checkout(timeout=30).identity(value) == value


@ensureDeferred
async def test_tls_client_that_distrusts_the_server_is_told_why(
    start_server, make_client, pki
):
    server = await start_server(listen=tls_listen(pki))
    port = (await server.listening).getHost().port
    client = make_client(tls_connect(port, pki["stranger_roots"]))
    with pytest.raises(CheckoutTimeout, match="certificate verify failed"):
        await client.checkout(timeout=1).pid()


@ensureDeferred
async def test_tls_client_certificate_from_the_authority_is_let_in(
    start_server, make_client, pki
):
    server = await start_server(listen=tls_listen(pki), client_ca=str(pki["ca_file"]))
    port = (await server.listening).getHost().port
    client = make_client(
        tls_connect(port, pki["ca_roots"], (pki["ca_client"], pki["ca_client_key"]))
    )
    assert await client.checkout(timeout=10).identity("in") == "in"


@pytest.mark.parametrize("certificate", ["none", "stranger"])
@ensureDeferred
async def test_tls_server_refuses_clients_without_an_authorised_certificate(
    start_server, make_client, pki, events, certificate
):
    """Refused at the handshake, before any worker process starts."""
    server = await start_server(listen=tls_listen(pki), client_ca=str(pki["ca_file"]))
    port = (await server.listening).getHost().port
    identity = None
    if certificate == "stranger":
        identity = (pki["stranger_client"], pki["stranger_client_key"])
    client = make_client(tls_connect(port, pki["ca_roots"], identity))
    with pytest.raises(CheckoutTimeout):
        await client.checkout(timeout=1).pid()
    assert not [e for e in events.events if "started with pid" in e["log_format"]]


@ensureDeferred
async def test_tls_client_leaving_mid_call_gets_its_worker_killed(
    start_server, make_client, pki, events
):
    """
    The server hears a relayed client leave, and kills its busy worker as
    it does for a plain connection.
    """
    server = await start_server(listen=tls_listen(pki))
    port = (await server.listening).getHost().port
    client = make_client(tls_connect(port, pki["ca_roots"]), min_workers=0)
    checkout = client.checkout(timeout=0.5)
    pid = await checkout.pid()
    with pytest.raises(CheckoutTimeout):
        await checkout.sleep(60)
    exited = await events.wait_for(
        lambda event: event.get("pid") == pid and "signal" in event
    )
    assert exited["signal"] == signal.SIGKILL
    assert await client.call("identity", "next") == "next"


@ensureDeferred
async def test_tls_relay_passes_on_what_a_worker_wrote_as_it_exited(
    start_server, make_client, pki, until
):
    """
    A worker that leaves after its checkout says bye first; the relay hands
    that bye on before closing, so the client sees a worker that stopped,
    not one that died.
    """
    server = await start_server(listen=tls_listen(pki), worker_memory_limit=2**28)
    port = (await server.listening).getHost().port
    client = make_client(
        tls_connect(port, pki["ca_roots"]), min_workers=1, refork_after_error=False
    )
    with client.checkout(timeout=10) as checkout:
        with pytest.raises(RemoteError):
            await checkout.allocate(1024)
    await until(lambda: sum(client.stats()["workers_retired"].values()) == 1)
    retired = client.stats()["workers_retired"]
    assert (retired["stopped"], retired["death"]) == (1, 0), retired
