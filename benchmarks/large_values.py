"""
Time and memory of large values: a bytes argument of 1, 10 and 50 MB sent
to a worker that returns it.

Run it from a regular install, as bench.py says; it prints numbers and
asserts nothing:

    /tmp/benchvenv/bin/python benchmarks/large_values.py

For each size, a fresh worker takes the value and returns it, three times;
the figures are the best round trip and the peak memory over what the
process held before: the client's (this process, which also runs the
server, which never touches the bytes), and the worker's. Peaks come from
the kernel's high-water mark of resident memory (C{VmHWM}), reset before
each size. A value costs its size a few times over on each side (the
bytes object, its encoded frame, the received buffer and the decoded copy);
a peak that grew with the square of the size would show here.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred, inlineCallbacks

from txtask import Client, TaskServer

SIZES_MB = (1, 10, 50)
ROUND_TRIPS = 3
INTERFACE_MODULE = "txtask_large_values"
INTERFACE_SOURCE = '''"""The interface the large value benchmark calls."""


def echo(value):
    return value


def peak():
    """This worker's high-water mark of resident memory, in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
'''

MB = 2**20


def memory(field: str) -> int:
    """
    A memory figure of this process, in bytes.
    """
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise LookupError(field)


def reset_peak() -> None:
    # Writing 5 to clear_refs resets the high-water mark to the current RSS.
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


@inlineCallbacks
def measure_size(client: Client, size: int) -> Generator[Deferred[Any], Any, str]:
    value = os.urandom(size * MB)
    checkout = client.checkout(timeout=120)
    worker_before = yield checkout.peak()
    reset_peak()
    client_before = memory("VmRSS")

    best = float("inf")
    for _ in range(ROUND_TRIPS):
        started = time.perf_counter()
        returned = yield checkout.echo(value)
        best = min(best, time.perf_counter() - started)
        if returned != value:
            raise AssertionError(f"the {size} MB value came back changed")
        del returned
    worker_peak = (yield checkout.peak()) - worker_before
    client_peak = memory("VmHWM") - client_before
    checkout.release()

    return (
        f"{size:>5} MB {best * 1000:>12.1f} {size / best:>10.0f} "
        f"{client_peak / MB:>10.1f} ({client_peak / (size * MB):.1f}x) "
        f"{worker_peak / MB:>9.1f} ({worker_peak / (size * MB):.1f}x)"
    )


@inlineCallbacks
def main(reactor: Any) -> Generator[Deferred[Any], Any, None]:
    with tempfile.TemporaryDirectory(prefix="txtask-large-") as directory:
        (Path(directory) / f"{INTERFACE_MODULE}.py").write_text(INTERFACE_SOURCE)
        os.environ["PYTHONPATH"] = os.pathsep.join(
            filter(None, [directory, os.environ.get("PYTHONPATH")])
        )
        server = TaskServer(
            INTERFACE_MODULE,
            listen=f"unix:{directory}/txtask.sock",
            max_frame_size=64 * MB,
        )
        server.startService()
        yield server.listening
        client = Client(f"unix:{directory}/txtask.sock", min_workers=0, max_checkouts=1)
        print(
            f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load "
            f"average {os.getloadavg()[0]:.2f}\n"
        )
        print("   size   round trip ms      MB/s   client peak MB   worker peak MB")
        try:
            for size in SIZES_MB:
                print((yield measure_size(client, size)), flush=True)
        finally:
            yield client.close()
            yield server.stopService()


if __name__ == "__main__":
    task.react(main)
