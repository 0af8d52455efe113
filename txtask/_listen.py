"""
Where a server listens: endpoint descriptions, made safe by default.

Anyone who can connect to a txtask server can run its interface, so a
description that leaves the exposure open gets the narrow choice: a unix
socket is readable and writable by its owner only, and TCP (plain or TLS)
binds to the loopback interface only. A description that says otherwise
(C{mode=}, C{interface=}) is obeyed, and an endpoint object is used as it
is.

A server that must also know its clients (mutual TLS) takes an C{ssl:}
description and a file of certificate authorities:
L{endpoint_requiring_client_certificates} builds that endpoint.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet.interfaces import IStreamServerEndpoint

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


# What endpoint_requiring_client_certificates understands of an ssl:
# description, in Twisted's positional order.
_TLS_ARGUMENTS = ("port", "privateKey", "certKey", "interface", "backlog")
_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)


def _tls_arguments(description: str) -> dict[str, str]:
    kind, *arguments = _SEPARATOR.split(safe_description(description))
    if kind != "ssl":
        raise ValueError(
            f"a server that requires client certificates needs an ssl: listen "
            f"description, not {description!r}"
        )
    found: dict[str, str] = {}
    positional = ("port", "privateKey", "certKey")
    for index, argument in enumerate(arguments):
        name, equals, value = argument.partition("=")
        if not equals:
            if index >= len(positional):
                raise ValueError(
                    f"give {argument!r} in {description!r} as name=value to use "
                    f"it with client certificates"
                )
            name, value = positional[index], argument
        if name not in _TLS_ARGUMENTS:
            raise ValueError(
                f"{name!r} in {description!r} is not supported with client "
                f"certificates (only {', '.join(_TLS_ARGUMENTS)}); build a "
                f"twisted.internet.endpoints.SSL4ServerEndpoint and pass it as "
                f"listen instead"
            )
        found[name] = value.replace("\\:", ":")
    return found


def check_client_certificate_description(description: str) -> None:
    """
    Check, without reading any file, that a description suits
    L{endpoint_requiring_client_certificates}.

    @raise ValueError: It does not; the message says why.
    """
    _tls_arguments(description)


def endpoint_requiring_client_certificates(
    reactor: Any, description: str, client_ca: str
) -> IStreamServerEndpoint:
    """
    A TLS endpoint that accepts only clients with a certificate signed by
    one of the authorities in C{client_ca}.

    @param description: An C{ssl:} description: C{port}, C{privateKey},
        C{certKey}, C{interface} (loopback by default) and C{backlog}.
    @param client_ca: Path of a PEM file of one or more CA certificates.
    @raise ValueError: The description is not C{ssl:}, uses other
        arguments, or C{client_ca} holds no certificate.
    @raise OSError: A key or certificate file cannot be read.
    """
    from twisted.internet.endpoints import SSL4ServerEndpoint
    from twisted.internet.ssl import Certificate, PrivateCertificate

    arguments = _tls_arguments(description)
    private_key = arguments.get("privateKey", "server.pem")
    with open(arguments.get("certKey", private_key), "rb") as certificate:
        pem = certificate.read()
    with open(private_key, "rb") as key:
        pem += b"\n" + key.read()
    with open(client_ca, "rb") as authorities_file:
        authorities = [
            Certificate.loadPEM(block)
            for block in _CERTIFICATE.findall(authorities_file.read())
        ]
    if not authorities:
        raise ValueError(f"{client_ca!r} holds no PEM certificate")

    # With authorities, the options verify the peer and require that it
    # presents a certificate.
    options = PrivateCertificate.loadPEM(pem).options(*authorities)
    return SSL4ServerEndpoint(
        reactor,
        int(arguments["port"]),
        options,
        backlog=int(arguments.get("backlog", 50)),
        interface=arguments["interface"],
    )
