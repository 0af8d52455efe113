"""
What the tests learn about processes from /proc.
"""

from __future__ import annotations

import os


def children(parent: int | None = None) -> list[tuple[int, str]]:
    """
    The children of a process (this one by default), with their state
    (C{Z} for a zombie).
    """
    wanted = str(os.getpid() if parent is None else parent)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if fields[1] == wanted:
            found.append((int(entry), fields[0]))
    return found
