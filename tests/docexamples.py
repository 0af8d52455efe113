"""
Find and run the examples of a Markdown document: its C{# name.py} Python
blocks become files, and its C{twistd} command line serves them.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).parent.parent
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def blocks(document: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", document.read_text(), re.DOTALL)


def files(document: Path) -> dict[str, str]:
    """
    The Python blocks that start with a C{# name.py} line, by name.
    """
    found = {}
    for block in blocks(document, "python"):
        first, _, _ = block.partition("\n")
        if re.fullmatch(r"# \w+\.py", first):
            found[first[2:]] = block
    return found


def twistd_command(text: str) -> list[str]:
    """
    The one C{twistd ...} command in C{text}, to run with this Python.
    """
    commands = re.findall(r"`?(twistd -n txtask [^`\n]*)`?", text)
    assert len(commands) == 1, commands
    return TWISTD + shlex.split(commands[0])[1:]


@contextmanager
def serving(command: list[str], directory: Path) -> Iterator[dict[str, str]]:
    """
    Run a twistd server in C{directory} until it listens; stop it after.

    @return: The environment that finds the example files and txtask.
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(directory), *sys.path]))
    server = subprocess.Popen(
        command,
        cwd=directory,
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
            raise AssertionError("the example's server never listened")
        yield env
    finally:
        server.terminate()
        server.wait(timeout=30)


def run_script(name: str, directory: Path, env: dict[str, str]) -> str:
    """
    Run an example script; return its output, failing if it fails.
    """
    done = subprocess.run(
        [sys.executable, name],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout
