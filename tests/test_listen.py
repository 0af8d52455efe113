"""
Safe defaults of listening descriptions.
"""

from __future__ import annotations

import pytest

from txtask._listen import (
    check_client_certificate_description,
    is_unix,
    safe_description,
)


@pytest.mark.parametrize(
    ("given", "used"),
    [
        ("unix:txtask.sock", "unix:txtask.sock:mode=600"),
        ("unix:/run/app.sock:mode=660", "unix:/run/app.sock:mode=660"),
        ("tcp:7000", "tcp:7000:interface=127.0.0.1"),
        ("tcp:port=7000", "tcp:port=7000:interface=127.0.0.1"),
        ("tcp:7000:interface=0.0.0.0", "tcp:7000:interface=0.0.0.0"),
        ("tcp:7000:10.0.0.5", "tcp:7000:10.0.0.5"),
        ("tcp:7000:backlog=5", "tcp:7000:backlog=5:interface=127.0.0.1"),
        ("tcp6:7000", r"tcp6:7000:interface=\:\:1"),
        (r"tcp6:7000:interface=\:\:", r"tcp6:7000:interface=\:\:"),
        ("ssl:7000:privateKey=k.pem", "ssl:7000:privateKey=k.pem:interface=127.0.0.1"),
        ("ssl:7000:k.pem:c.pem:SSLv23_METHOD:10.0.0.5", None),
        ("systemd:domain=UNIX:index=0", None),
    ],
)
def test_safe_description_narrows_only_what_is_left_open(given: str, used: str | None):
    assert safe_description(given) == (used or given)


def test_is_unix():
    assert is_unix("unix:a.sock")
    assert not is_unix("tcp:7000")
    assert not is_unix("ssl:7000:privateKey=unix.pem")


@pytest.mark.parametrize(
    "description",
    [
        "ssl:7000:privateKey=k.pem:certKey=c.pem",
        "ssl:7000:k.pem:c.pem",
        "ssl:port=7000:privateKey=k.pem:interface=0.0.0.0:backlog=5",
    ],
)
def test_client_certificates_accept_a_plain_ssl_description(description: str):
    check_client_certificate_description(description)


@pytest.mark.parametrize(
    ("description", "complaint"),
    [
        ("tcp:7000", "needs an ssl: listen description"),
        ("unix:txtask.sock", "needs an ssl: listen description"),
        ("ssl:7000:privateKey=k.pem:dhParameters=dh.pem", "'dhParameters'"),
        ("ssl:7000:k.pem:c.pem:TLSv1_2_METHOD", "as name=value"),
    ],
)
def test_client_certificates_refuse_other_descriptions(description, complaint):
    with pytest.raises(ValueError, match=complaint):
        check_client_certificate_description(description)
