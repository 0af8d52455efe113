"""
The examples in docs/ run as written and print what the docs show.
"""

from __future__ import annotations

import re
from pathlib import Path

from docexamples import ROOT, blocks, files, run_script, serving, twistd_command

LOGGING = ROOT / "docs" / "logging.md"


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
