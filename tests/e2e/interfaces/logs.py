"""
An interface that logs, times, prints and fails, for the logging tests.
"""

import logging
import os
import sys
import time

from txtask.worker import timer

log = logging.getLogger("logs.iface")
log.warning("logs interface imported")


def setup():
    logging.getLogger("logs.setup").info("setup opened the database")


def failing_setup():
    logging.getLogger("logs.setup").warning("setup cannot reach the database")
    raise RuntimeError("no database")


def pid():
    return os.getpid()


def work(n):
    log.debug("below the captured level")
    log.info("working on %s", n)
    with timer("inner"):
        log.warning("inside the inner step")
    return n * 2


def fail():
    log.error("about to fail")
    try:
        divmod(1, 0)
    except ZeroDivisionError:
        log.exception("caught it")
    raise ValueError("bad input")


def chatty():
    print("printed to stdout", flush=True)
    print("printed to stderr", file=sys.stderr, flush=True)
    return "still fine"


def sleep(seconds):
    time.sleep(seconds)
