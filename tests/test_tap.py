"""
Tests for L{txtask.tap}: the options of C{twistd txtask} and the service
they build.
"""

from __future__ import annotations

import pytest
from twisted.application.service import IService
from twisted.python import usage

from txtask._server import TaskServer
from txtask.tap import Options, makeService


def parse(*arguments: str) -> Options:
    options = Options()
    options.parseOptions(list(arguments))
    return options


def test_options_require_an_interface() -> None:
    with pytest.raises(usage.UsageError, match="--interface"):
        parse()


def test_options_defaults() -> None:
    options = parse("--interface", "myapp.hasher")
    assert {key: options[key] for key in options} == {
        "interface": "myapp.hasher",
        "listen": "unix:txtask.sock",
        "setup": None,
        "checkout-done": None,
        "name": None,
        "hung-worker-timeout": 300,
        "max-workers": 64,
        "shutdown-grace": 30,
        "log-level": "INFO",
        "max-frame-size": 64 * 1024 * 1024,
        "worker-memory-limit": None,
        "client-ca": None,
    }


def test_options_parse_every_option() -> None:
    options = parse(
        "--interface=myapp.hasher:Hasher",
        "--listen=tcp:7000:interface=127.0.0.1",
        "--setup=myapp.hasher:setup",
        "--checkout-done=myapp.db:rollback",
        "--name=passwd-hasher",
        "--hung-worker-timeout=12.5",
        "--max-workers=8",
        "--shutdown-grace=0",
        "--log-level=debug",
        "--max-frame-size=1M",
        "--worker-memory-limit=512m",
    )
    assert options["interface"] == "myapp.hasher:Hasher"
    assert options["listen"] == "tcp:7000:interface=127.0.0.1"
    assert options["setup"] == "myapp.hasher:setup"
    assert options["checkout-done"] == "myapp.db:rollback"
    assert options["name"] == "passwd-hasher"
    assert options["hung-worker-timeout"] == 12.5
    assert options["max-workers"] == 8
    assert options["shutdown-grace"] == 0
    assert options["log-level"] == "debug"
    assert options["max-frame-size"] == 2**20
    assert options["worker-memory-limit"] == 512 * 2**20


def test_options_short_names() -> None:
    options = parse("-i", "myapp.hasher", "-l", "unix:/run/app.sock")
    assert (options["interface"], options["listen"]) == (
        "myapp.hasher",
        "unix:/run/app.sock",
    )


@pytest.mark.parametrize(
    "arguments",
    [
        ["--max-workers=0"],
        ["--max-workers=many"],
        ["--shutdown-grace=-1"],
        ["--shutdown-grace=soon"],
        ["--hung-worker-timeout=0"],
        ["--hung-worker-timeout=-3"],
        ["--max-frame-size=0"],
        ["--max-frame-size=big"],
        ["--worker-memory-limit=-1G"],
        ["--worker-memory-limit=1T"],
        ["--unknown-option"],
    ],
    ids=" ".join,
)
def test_options_refuse_bad_values(arguments: list[str]) -> None:
    with pytest.raises(usage.UsageError):
        parse("--interface=myapp.hasher", *arguments)


@pytest.mark.parametrize(
    "listen",
    ["unix:txtask.sock", "ssl:7000:privateKey=k.pem:dhParameters=dh.pem"],
)
def test_options_refuse_client_ca_without_a_plain_ssl_listen(listen: str) -> None:
    with pytest.raises(usage.UsageError, match="--client-ca"):
        parse("--interface=myapp.hasher", f"--listen={listen}", "--client-ca=ca.pem")


def test_options_refuse_a_missing_client_ca_file(tmp_path) -> None:
    listen = "--listen=ssl:7000:privateKey=k.pem"
    with pytest.raises(usage.UsageError, match="no such file"):
        parse("--interface=myapp.hasher", listen, f"--client-ca={tmp_path / 'no.pem'}")
    (tmp_path / "ca.pem").write_text("certificates")
    options = parse(
        "--interface=myapp.hasher", listen, f"--client-ca={tmp_path}/ca.pem"
    )
    assert options["client-ca"] == f"{tmp_path}/ca.pem"


def test_options_refuse_an_unknown_log_level() -> None:
    """Caught here, rather than by every worker failing at start."""
    with pytest.raises(usage.UsageError):
        parse("--interface=myapp.hasher", "--log-level=LOUD")


def test_make_service_builds_a_task_server_from_the_options() -> None:
    service = makeService(
        parse(
            "--interface=myapp.hasher",
            "--listen=unix:/run/app.sock",
            "--setup=myapp.hasher:setup",
            "--checkout-done=myapp.db:rollback",
            "--name=hasher",
            "--hung-worker-timeout=60",
            "--max-workers=3",
            "--shutdown-grace=5",
            "--log-level=warning",
            "--max-frame-size=4096",
            "--worker-memory-limit=1G",
        )
    )
    assert IService.providedBy(service)
    assert isinstance(service, TaskServer)
    assert (service.interface, service.listen) == ("myapp.hasher", "unix:/run/app.sock")
    assert (service.setup, service.checkout_done) == (
        "myapp.hasher:setup",
        "myapp.db:rollback",
    )
    assert service.name == "hasher"
    assert service.hung_worker_timeout == 60
    assert service.max_workers == 3
    assert service.shutdown_grace == 5
    assert service.log_level == "WARNING"
    assert service.max_frame_size == 4096
    assert service.worker_memory_limit == 2**30


def test_make_service_does_not_listen() -> None:
    """twistd starts the service later; building it has no side effects."""
    service = makeService(parse("--interface=myapp.hasher"))
    assert not service.running


def test_plugin_names_the_tap_module() -> None:
    from twisted.plugins.txtask_plugin import txtask

    assert (txtask.tapname, txtask.module) == ("txtask", "txtask.tap")
