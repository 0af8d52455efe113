"""
Example interface: a sqlite3 database session per worker, in the spirit of
Perl's DBI.

Each worker opens its own connection in L{setup}. A checkout owns that
connection, so a transaction can span several calls; L{rollback} as the
checkout_done hook discards whatever a checkout left uncommitted.

Serve it with::

    twistd -n txtask --interface txtask.examples.dbi \\
        --setup txtask.examples.dbi:setup \\
        --checkout-done txtask.examples.dbi:rollback

The database file is C{$TXTASK_EXAMPLE_DB}, or C{txtask-example.db} in the
system's temporary directory.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from typing import Any

__all__ = ["do", "selectrow", "selectall", "commit", "rollback"]

_connection: sqlite3.Connection | None = None


def database_path() -> str:
    """
    The database file the workers open.
    """
    default = os.path.join(tempfile.gettempdir(), "txtask-example.db")
    return os.environ.get("TXTASK_EXAMPLE_DB", default)


def setup() -> None:
    """
    Open this worker's connection; runs once per worker.
    """
    global _connection
    _connection = sqlite3.connect(database_path())
    _connection.row_factory = sqlite3.Row


def _db() -> sqlite3.Connection:
    if _connection is None:
        raise RuntimeError("no database connection: run the server with --setup")
    return _connection


def do(sql: str, *params: Any) -> int:
    """
    Run one statement; a data change opens a transaction.

    @return: The number of rows changed.
    """
    return _db().execute(sql, params).rowcount


def selectrow(sql: str, *params: Any) -> dict[str, Any] | None:
    """
    The first row of a query as a dict of column to value, or C{None}.
    """
    row = _db().execute(sql, params).fetchone()
    return None if row is None else dict(row)


def selectall(sql: str, *params: Any) -> list[dict[str, Any]]:
    """
    Every row of a query, each a dict of column to value.
    """
    return [dict(row) for row in _db().execute(sql, params).fetchall()]


def commit() -> None:
    """
    Commit the open transaction.
    """
    _db().commit()


def rollback() -> None:
    """
    Roll back the open transaction, if any.
    """
    _db().rollback()
