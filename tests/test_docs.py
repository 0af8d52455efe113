"""
The examples in docs/ run as written and print what the docs show.
"""

from __future__ import annotations

import re
import socket
import subprocess
from pathlib import Path

from docexamples import ROOT, blocks, files, run_script, serving, twistd_command

LOGGING = ROOT / "docs" / "logging.md"
README = ROOT / "README.md"


def _shape(output: str) -> list[str]:
    """
    The output with every number made alike: times and pids differ each run.
    """
    return re.sub(r"\d+(\.\d+)?", "N", output).splitlines()


def _pids(output: str) -> list[str]:
    return re.findall(r"pid (\d+)", output)


def test_logging_doc_request_log_example_prints_what_it_shows(tmp_path: Path) -> None:
    examples = files(LOGGING)
    assert sorted(examples) == ["orders.py", "orders_client.py"]
    for name, text in examples.items():
        (tmp_path / name).write_text(text)

    with serving(twistd_command(LOGGING.read_text()), tmp_path) as env:
        output = run_script("orders_client.py", tmp_path, env)

    [shown] = blocks(LOGGING, "text")
    assert _shape(output) == _shape(shown)
    # The same pattern of processes: the client's lines and the worker's.
    assert [_pids(output).index(p) for p in _pids(output)] == [
        _pids(shown).index(p) for p in _pids(shown)
    ]
    times = [float(t) for t in re.findall(r"^log +(\S+)", output, re.MULTILINE)]
    assert times == sorted(times)


SECURITY = ROOT / "docs" / "security.md"


def test_security_doc_tls_example_serves_only_certified_clients(tmp_path: Path) -> None:
    """
    The certificates made as shown, the server run as shown, and the client
    shown print what the page says. Only the port differs: a free one.
    """
    port = str(_free_port())
    setup, serve = blocks(SECURITY, "sh")
    subprocess.run(
        ["sh", "-e", "-c", setup], cwd=tmp_path, check=True, capture_output=True
    )
    examples = {**files(README), **files(SECURITY)}
    for name in ("hasher.py", "tls_client.py"):
        (tmp_path / name).write_text(examples[name].replace("7001", port))

    with serving(twistd_command(serve.replace("7001", port)), tmp_path) as env:
        output = run_script("tls_client.py", tmp_path, env)

    [shown] = blocks(SECURITY, "text")
    assert output == shown


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
