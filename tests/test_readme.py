"""
The README's examples run as written: its server command serves its
interface, and both of its clients print what they should.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.DOTALL)


def _files() -> dict[str, str]:
    """
    The Python blocks that start with a C{# name.py} line, by name.
    """
    files = {}
    for block in _blocks("python"):
        first, _, _ = block.partition("\n")
        if re.fullmatch(r"# \w+\.py", first):
            files[first[2:]] = block
    return files


def _server_command() -> list[str]:
    lines = [
        line
        for block in _blocks("sh")
        for line in block.splitlines()
        if line.startswith("twistd ")
    ]
    assert len(lines) == 1, lines
    return TWISTD + shlex.split(lines[0])[1:]


def test_readme_examples_run(tmp_path: Path) -> None:
    files = _files()
    assert sorted(files) == ["client_async.py", "client_inline.py", "hasher.py"]
    for name, text in files.items():
        (tmp_path / name).write_text(text)

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path]))
    server = subprocess.Popen(
        _server_command(),
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for line in server.stdout:
            if "txtask server listening" in line:
                break
        else:
            raise AssertionError("the README's server never listened")

        outputs = {
            name: subprocess.run(
                [sys.executable, name],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=30,
            )
            for name in ("client_inline.py", "client_async.py")
        }
    finally:
        server.terminate()
        server.wait(timeout=30)

    inline, async_ = outputs["client_inline.py"], outputs["client_async.py"]
    assert inline.returncode == 0, inline.stderr
    assert inline.stdout.splitlines() == ["inline: verified True"]
    assert async_.returncode == 0, async_.stderr
    assert async_.stdout.splitlines() == [
        "async: verified True",
        "async: remote AttributeError",
    ]
