"""The byte stream under the messages: exact, bounded, time-limited reads and a careful close."""

from __future__ import annotations

import socket

from cdl_lambda.gadgets.errors import ProtocolError
from cdl_lambda.gadgets.wire import MAX_MESSAGE_BYTES, U16 as _u16


class BoundedSocket:
    """A socket wrapper with ``read(n)`` exactly n bytes: refuses n > ``limit`` before allocating and raises
    :class:`ProtocolError` when the peer closes mid-message (gadgetron's wrapper loops forever there), resets the
    connection, or sends nothing for ``timeout`` seconds (None = wait forever)."""

    def __init__(self, sock: socket.socket, limit: int = MAX_MESSAGE_BYTES, timeout: float | None = None):
        self.socket = sock
        self.limit = limit
        self.timeout = timeout
        sock.settimeout(timeout)

    def _recv(self, nbytes: int) -> bytes:
        try:
            return self.socket.recv(nbytes)
        except socket.timeout:
            raise ProtocolError(f"no data from the peer for {self.timeout:g} s; giving up on the connection") from None
        except ConnectionError as error:
            raise ProtocolError(f"connection lost: {error}") from None

    def read(self, nbytes: int) -> bytes:
        nbytes = int(nbytes)
        if nbytes < 0 or nbytes > self.limit:
            raise ProtocolError(f"message claims {nbytes} bytes, over the limit of {self.limit}; refusing it")
        buffer = bytearray()
        while len(buffer) < nbytes:
            chunk = self._recv(min(nbytes - len(buffer), 1 << 20))
            if not chunk:
                raise ProtocolError(f"connection closed in the middle of a message ({len(buffer)} of {nbytes} bytes)")
            buffer += chunk
        return bytes(buffer)

    def read_message_id(self) -> int | None:
        """The next message id, or None when the peer closed cleanly between messages."""
        first = self._recv(2)
        if not first:
            return None
        if len(first) < 2:
            first += self.read(1)
        return _u16.unpack(first)[0]

    def write(self, data) -> None:
        self.socket.sendall(data)

    def close(self) -> None:
        try:
            self.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.socket.close()


DRAIN_SECONDS = 30.0  # after a failure: how long to wait for more input from the peer before hanging up


def drain_and_close(sock: socket.socket, quiet_seconds: float = DRAIN_SECONDS) -> None:
    """Half-close (our replies are complete), read and discard what the peer still sends until it closes or is
    quiet for ``quiet_seconds``, then close. Closing with unread input would reset the connection, and a peer still
    sending (Gadgetron mid-scan) could lose the ERROR message it has not read yet."""
    try:
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(quiet_seconds)
        while sock.recv(1 << 16):
            pass
    except OSError:
        pass
    finally:
        sock.close()
