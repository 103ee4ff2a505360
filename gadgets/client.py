"""The client side of a stream: what Gadgetron or ``gadgetron_ismrmrd_client`` does; replay and the tests use it."""

from __future__ import annotations

import json
import socket
import struct

import ismrmrd

from cdl_lambda.gadgets.errors import ProtocolError
from cdl_lambda.gadgets.transport import BoundedSocket
from cdl_lambda.gadgets.wire import (MSG_ACQUISITION, MSG_CLOSE, MSG_CONFIG_TEXT, MSG_ERROR, MSG_HEADER, MSG_IMAGE,
                          MSG_IMAGE_ARRAY, MSG_RECON_DATA, MSG_TEXT, MSG_WAVEFORM, U64 as _u64, encode_close,
                          encode_config_file, encode_item, encode_text, read_acquisition, read_image,
                          read_image_array, read_recon_data, read_text)


class Peer:
    """The client side of a stream (what Gadgetron or ``gadgetron_ismrmrd_client`` does): send config, header,
    items, close; read back images, image arrays, text and errors until CLOSE.

    Replies come back from :meth:`replies` as ``(message_id, item)``: images (ismrmrd.Image), ImageArray, text (str),
    error (str, id 8). A blocking reader: run sends in another thread for large streams.
    """

    def __init__(self, sock: socket.socket):
        self.socket = BoundedSocket(sock)

    @classmethod
    def connect(cls, host: str, port: int, timeout: float = 30.0) -> "Peer":
        return cls(socket.create_connection((host, port), timeout=timeout))

    def send_raw(self, data: bytes):
        self.socket.write(data)

    def send_config_name(self, name: str):
        self.send_raw(encode_config_file(name))

    def send_config_text(self, xml: str | bytes, nul_terminated: bool = False):
        data = xml.encode() if isinstance(xml, str) else bytes(xml)
        self.send_raw(encode_text(MSG_CONFIG_TEXT, data + (b"\0" if nul_terminated else b"")))

    def send_parameters(self, parameters: dict):
        self.send_raw(encode_text(MSG_TEXT, json.dumps({"parameters": parameters})))

    def send_header(self, xml: str | bytes, nul_terminated: bool = False):
        data = xml.encode() if isinstance(xml, str) else bytes(xml)
        self.send_raw(encode_text(MSG_HEADER, data + (b"\0" if nul_terminated else b"")))

    def send(self, item):
        self.send_raw(encode_item(item))

    def send_close(self):
        self.send_raw(encode_close())

    def replies(self):
        """Yield ``(message_id, item)`` until CLOSE or the peer closes the socket."""
        while True:
            mid = self.socket.read_message_id()
            if mid is None or mid == MSG_CLOSE:
                return
            if mid == MSG_IMAGE:
                yield mid, read_image(self.socket)
            elif mid == MSG_IMAGE_ARRAY:
                yield mid, read_image_array(self.socket)
            elif mid == MSG_RECON_DATA:
                yield mid, read_recon_data(self.socket)
            elif mid == MSG_ACQUISITION:
                yield mid, read_acquisition(self.socket)
            elif mid == MSG_WAVEFORM:
                yield mid, ismrmrd.Waveform.deserialize_from(self.socket.read)
            elif mid == MSG_TEXT:
                yield mid, read_text(self.socket).decode("utf-8", "replace")
            elif mid == MSG_ERROR:
                yield mid, read_text(self.socket, _u64).decode("utf-8", "replace")
            else:
                raise ProtocolError(f"unexpected message id {mid} from the server")

    def close(self):
        self.socket.close()

    def abort(self):
        """Close with a reset (SO_LINGER 0) instead of a clean end: the server sees at once that nobody waits for
        the images."""
        try:
            self.socket.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.socket.close()
