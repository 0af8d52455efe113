"""
Example interface: bcrypt password hashing in worker processes.

bcrypt at cost 10 holds the CPU for tens of milliseconds, which would stall a
reactor; in a worker it costs the Twisted process nothing.

Serve it with::

    twistd -n txtask --interface txtask.examples.passwords
"""

from __future__ import annotations

import bcrypt

__all__ = ["hash", "verify"]

#: bcrypt's cost factor: 2**10 rounds.
COST = 10


def hash(plaintext: str) -> str:
    """
    Hash a password with a fresh random salt.

    @return: The crypted password, C{$2b$10$...}.
    """
    salt = bcrypt.gensalt(rounds=COST)
    return bcrypt.hashpw(plaintext.encode("utf-8"), salt).decode("ascii")


def verify(crypted: str, plaintext: str) -> bool:
    """
    Whether C{plaintext} is the password C{crypted} was made from.
    """
    return bcrypt.checkpw(plaintext.encode("utf-8"), crypted.encode("ascii"))
