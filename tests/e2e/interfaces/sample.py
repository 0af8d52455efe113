"""
Interfaces used by the end-to-end tests, imported inside real workers.
"""

import os
import sys
from os import getcwd  # noqa: F401  (imported, so never callable remotely)

SETUP_RUNS = 0
CONSTANT = 42


def echo(*args, **kwargs):
    return [list(args), kwargs]


def identity(value):
    return value


def types_of(*args, **kwargs):
    return [type(arg).__name__ for arg in args] + sorted(
        f"{key}={type(value).__name__}" for key, value in kwargs.items()
    )


def pid():
    return os.getpid()


def fail(message):
    raise ValueError(message)


def unencodable():
    return {1, 2, 3}


def twisted_loaded():
    return sorted(name for name in sys.modules if name.split(".")[0] == "twisted")


def setup():
    global SETUP_RUNS
    SETUP_RUNS += 1


def setup_runs():
    return SETUP_RUNS


def broken_setup():
    raise RuntimeError("database is down")


def write_stderr(text):
    sys.stderr.write(text + "\n")
    sys.stderr.flush()
    return True


def sleep(seconds):
    import time

    time.sleep(seconds)
    return seconds


def spin_in_c():
    """A catastrophic regex: C code that holds the GIL and never returns."""
    import re

    return bool(re.match(r"(a+)+$", "a" * 64 + "b"))


def spawn_and_hang():
    """Start a process that holds the connection, then hang in C."""
    import subprocess

    child = subprocess.Popen(["sleep", "600"], pass_fds=(3,))
    with open(os.environ["TXTASK_TEST_CHILD_PID"], "w") as pid_file:
        pid_file.write(str(child.pid))
    return spin_in_c()


def exit_now(status):
    os._exit(status)


def segfault():
    import ctypes

    return ctypes.string_at(0)


def open_fds():
    """The worker's open descriptors and what each one is."""
    return {
        int(name): os.readlink(f"/proc/self/fd/{name}")
        for name in os.listdir("/proc/self/fd")
        if os.path.exists(f"/proc/self/fd/{name}")
    }


def loaded(*names):
    return [name for name in names if name in sys.modules]


def log_after_importing_logging(message):
    import logging

    logging.getLogger("sample.late").warning(message)
    return message


def allocate(megabytes):
    return len(bytearray(megabytes * 2**20))


def slow_identity(value, seconds):
    """A call that takes a while in the worker: the chaos test's workload."""
    sleep(seconds)
    return value
