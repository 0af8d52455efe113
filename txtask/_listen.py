"""
Where a server listens: endpoint descriptions, made safe by default.

Anyone who can connect to a txtask server can run its interface, so a
description that leaves the exposure open gets the narrow choice: a unix
socket is readable and writable by its owner only, and TCP (plain or TLS)
binds to the loopback interface only. A description that says otherwise
(C{mode=}, C{interface=}) is obeyed, and an endpoint object is used as it
is.
"""

from __future__ import annotations

import re

# Descriptions separate their arguments with colons; a backslash escapes one.
_SEPARATOR = re.compile(r"(?<!\\):")

#: Interface bound when a TCP description names none, by endpoint type.
LOOPBACK = {"tcp": "127.0.0.1", "ssl": "127.0.0.1", "tcp6": r"\:\:1"}

# Where each of those takes its interface as a positional argument.
_INTERFACE_POSITION = {"tcp": 1, "ssl": 4, "tcp6": 2}


def _has_option(arguments: list[str], name: str, position: int | None = None) -> bool:
    positional = [argument for argument in arguments if "=" not in argument]
    if position is not None and len(positional) > position:
        return True
    return any(argument.startswith(f"{name}=") for argument in arguments)


def safe_description(description: str) -> str:
    """
    The description with the defaults that keep strangers out.

    @param description: A Twisted server endpoint description, such as
        C{unix:txtask.sock} or C{tcp:7000}.
    @return: The description, with C{mode=600} added to a unix socket and
        the loopback interface added to C{tcp}, C{tcp6} and C{ssl}, unless
        it sets them itself.
    """
    kind, *arguments = _SEPARATOR.split(description)
    if kind == "unix" and not _has_option(arguments, "mode"):
        return f"{description}:mode=600"
    if kind in LOOPBACK and not _has_option(
        arguments, "interface", _INTERFACE_POSITION[kind]
    ):
        return f"{description}:interface={LOOPBACK[kind]}"
    return description


def is_unix(description: str) -> bool:
    """
    Whether a description is of a unix socket.
    """
    return description.split(":", 1)[0] == "unix"
