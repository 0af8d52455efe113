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
