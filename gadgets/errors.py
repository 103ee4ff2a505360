"""The errors the gadget layer raises, each naming what was wrong.

:class:`InputError` — the scan cannot be reconstructed as sent (header, acquisitions, properties);
:class:`ProtocolError` — the peer sent something that is not a valid message; :class:`PeerError` — the peer
reported an ERROR (id 8); :class:`ChainError` — the chain registry is malformed.
"""

from __future__ import annotations


class InputError(ValueError):
    """The scan cannot be reconstructed as sent (header or acquisitions); the message names what was wrong."""


class ProtocolError(ValueError):
    """The peer sent something that is not a valid message (bad id, length, XML, truncated stream)."""


class PeerError(RuntimeError):
    """The peer reported an ERROR message (id 8)."""


class ChainError(ValueError):
    """The registry is malformed or names something invalid."""


class UsageError(ValueError):
    """A command-line argument that cannot work; reported in one line with exit status 2."""
