"""
The baseline worker of bench.py: the least a blocking worker can do.

It serves C{>I}-framed msgpack calls on file descriptor 3, as a txtask
worker does, and answers each C{["call", method, args, kwargs]} with
C{["ok", args[0]]}. It imports only msgpack and the standard library, never
Twisted, and exits when the connection closes.
"""

from __future__ import annotations

import socket
import struct

import msgpack

#: The connection's file descriptor, as in a txtask worker.
CONNECTION_FD = 3

_FRAME = struct.Struct(">I")

# Twisted's read size. Asking recv() for more than glibc's mmap threshold
# (128 KiB by default) can make every call map and unmap a fresh buffer.
_RECEIVE_SIZE = 64 * 1024


def serve(connection: socket.socket) -> None:
    """
    Answer calls until the peer closes the connection.
    """
    buffer = b""
    while True:
        data = connection.recv(_RECEIVE_SIZE)
        if not data:
            return
        buffer += data

        offset = 0
        while len(buffer) - offset >= 4:
            (size,) = _FRAME.unpack_from(buffer, offset)
            end = offset + 4 + size
            if end > len(buffer):
                break
            _verb, _method, args, _kwargs = msgpack.unpackb(buffer[offset + 4 : end])
            body = msgpack.packb(["ok", args[0]])
            connection.sendall(_FRAME.pack(len(body)) + body)
            offset = end
        buffer = buffer[offset:]


if __name__ == "__main__":
    serve(socket.socket(fileno=CONNECTION_FD))
