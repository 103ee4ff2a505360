"""The Gadgetron/MRD streaming protocol: what ``gadgetron`` 1.4.1 lacks or gets wrong, fixed in one place.

Wire format (little-endian): every message is a uint16 id then a payload. 1 config file name (1024 bytes,
NUL-padded) · 2 config text (uint32 length + XML) · 3 ISMRMRD header (uint32 length + XML) · 4 close · 5 text
(uint32 length + text) · 8 error (uint64 length + text) · 1008 acquisition · 1022 image · 1023 ReconData ·
1024 ImageArray · 1026 waveform · 1050 bucket.

Fixes over ``gadgetron.external.Connection`` (see docs/gadgetron.md):

- config as id 1 (a name) or 2 (XML), NUL-terminated text, an optional text message (5) with JSON parameters before
  the header (the python-ismrmrd-server convention);
- XML parsed only without a DOCTYPE (no entity expansion); declared lengths above :data:`MAX_MESSAGE_BYTES` refused
  before any allocation (acquisitions and images checked from their headers); a peer that closes mid-message, or
  sends nothing for ``idle_timeout`` seconds, raises instead of spinning or waiting forever;
- whatever a malformed message makes a reader raise arrives as :class:`ProtocolError` (the one error type a reader
  raises, besides :class:`PeerError` for the peer's own ERROR message);
- unknown message ids logged and skipped when their framing is known, a clear error otherwise (never a silent end);
- every item serialised into memory first (ImageArray/ReconData converted to complex64), then sent in one piece, so a
  failing writer never leaves half a message on the wire;
- :meth:`RobustConnection.fail` sends an ERROR message (id 8) before closing.

The client side (:class:`Peer`) plays Gadgetron's or a client's role: replay and the tests use it.
"""

from __future__ import annotations

import ctypes
import io
import json
import logging
import socket
import struct
import xml.etree.ElementTree as ET

import ismrmrd
import numpy as np
from gadgetron.external import connection as _gconn
from gadgetron.types import acquisition_bucket as _gbucket
from gadgetron.types.image_array import ImageArray, read_image_array, write_image_array
from gadgetron.types.recon_data import ReconData, read_recon_data, write_recon_data

log = logging.getLogger(__name__)

MSG_CONFIG_FILE, MSG_CONFIG_TEXT, MSG_HEADER, MSG_CLOSE, MSG_TEXT, MSG_ERROR = 1, 2, 3, 4, 5, 8
MSG_ACQUISITION, MSG_IMAGE, MSG_RECON_DATA, MSG_IMAGE_ARRAY, MSG_WAVEFORM, MSG_BUCKET = 1008, 1022, 1023, 1024, 1026, 1050
CONFIG_FILE_BYTES = 1024
MAX_TEXT_BYTES = 16 * 2**20          # config, header, text, error, meta
MAX_MESSAGE_BYTES = 2 * 2**30        # any single read (one acquisition's samples, one array's data)

_u16, _u32, _u64 = struct.Struct("<H"), struct.Struct("<I"), struct.Struct("<Q")


class ProtocolError(ValueError):
    """The peer sent something that is not a valid message (bad id, length, XML, truncated stream)."""


class PeerError(RuntimeError):
    """The peer reported an ERROR message (id 8)."""


# ---------------------------------------------------------------------------------------------- reading, bounded
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


def read_text(source, length_struct=_u32, limit: int = MAX_TEXT_BYTES) -> bytes:
    """A length-prefixed text payload with trailing NUL bytes removed."""
    length = length_struct.unpack(source.read(length_struct.size))[0]
    if length > limit:
        raise ProtocolError(f"text message claims {length} bytes, over the limit of {limit}")
    return source.read(length).rstrip(b"\0")


def read_config_file_name(source) -> str:
    return source.read(CONFIG_FILE_BYTES).split(b"\0", 1)[0].decode("utf-8", "replace").strip()


def parse_xml_safely(text: bytes | str, what: str) -> ET.Element:
    """Parse XML refusing DOCTYPE/ENTITY declarations (no entity expansion, no external references)."""
    raw = text.encode() if isinstance(text, str) else bytes(text)
    raw = raw.rstrip(b"\0").strip()
    if b"<!DOCTYPE" in raw.upper() or b"<!ENTITY" in raw.upper():
        raise ProtocolError(f"{what}: XML with DOCTYPE/ENTITY declarations is refused")
    try:
        return ET.fromstring(raw)
    except ET.ParseError as error:
        raise ProtocolError(f"{what} is not valid XML: {error}") from None


def parse_ismrmrd_header(text: bytes | str):
    """The ISMRMRD XML header as ``ismrmrd.xsd.ismrmrdHeader`` (NUL-terminated text accepted; unknown vendor
    elements tolerated with a warning)."""
    from xsdata.formats.dataclass.parsers import XmlParser
    from xsdata.formats.dataclass.parsers.config import ParserConfig

    raw = text.encode() if isinstance(text, str) else bytes(text)
    raw = raw.rstrip(b"\0").strip()
    parse_xml_safely(raw, "ISMRMRD header")  # well-formed, no DOCTYPE
    try:
        return ismrmrd.xsd.CreateFromDocument(raw)
    except Exception as strict_error:  # noqa: BLE001 - xsdata raises several types
        try:
            header = XmlParser(config=ParserConfig(fail_on_unknown_properties=False)).from_bytes(
                raw, ismrmrd.xsd.ismrmrdHeader)
        except Exception as error:  # noqa: BLE001
            raise ProtocolError(f"ISMRMRD header does not parse: {error}") from None
        log.warning("ISMRMRD header has elements outside the schema (ignored): %s", strict_error)
        return header


def _read_bucket(source):
    """gadgetron's bucket reader with its waveform defect fixed (it built waveforms from the wrong header type)."""
    meta = _gbucket.bucket_meta.from_buffer_copy(source.read(ctypes.sizeof(_gbucket.bucket_meta)))
    data = _gbucket.read_acquisitions(source, meta.data)
    data_stats = _gbucket.read_bucketstats(source)
    ref = _gbucket.read_acquisitions(source, meta.reference)
    ref_stats = _gbucket.read_bucketstats(source)
    waveforms = []
    headers = [ismrmrd.WaveformHeader.from_buffer_copy(source.read(ctypes.sizeof(ismrmrd.WaveformHeader)))
               for _ in range(meta.waveforms.count)]
    for head in headers:
        samples = np.frombuffer(source.read(head.channels * head.number_of_samples * 4), dtype=np.uint32)
        waveforms.append(ismrmrd.Waveform(bytes(head), samples))
    return _gbucket.AcquisitionBucket(data, data_stats, ref, ref_stats, waveforms)


MAX_ACQUISITION_VALUES = 2**26  # complex samples × channels in one readout (512 MiB)


def read_acquisition(source) -> ismrmrd.Acquisition:
    """An acquisition whose declared sizes are checked before anything is allocated."""
    head = ismrmrd.AcquisitionHeader.from_buffer_copy(source.read(ctypes.sizeof(ismrmrd.AcquisitionHeader)))
    values = int(head.number_of_samples) * max(int(head.active_channels), int(head.trajectory_dimensions), 1)
    if values > MAX_ACQUISITION_VALUES:
        raise ProtocolError(f"acquisition (scan counter {head.scan_counter}) claims {head.number_of_samples} samples × "
                            f"{head.active_channels} channels, over the limit of {MAX_ACQUISITION_VALUES} values")
    head_bytes = bytes(head)
    return ismrmrd.Acquisition.deserialize_from(
        lambda n, _first=[head_bytes]: _first.pop() if _first and n == len(head_bytes) else source.read(n))


def read_image(source) -> ismrmrd.Image:
    """An image whose declared size and meta are checked before anything is allocated (``ismrmrd.Image`` allocates
    its pixels from the header first) and whose meta carries no DOCTYPE."""
    head_bytes = source.read(ctypes.sizeof(ismrmrd.ImageHeader))
    head = ismrmrd.ImageHeader.from_buffer_copy(head_bytes)
    try:
        itemsize = np.dtype(ismrmrd.image.get_dtype_from_data_type(head.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        raise ProtocolError(f"image (index {head.image_index}) has an unknown data type {head.data_type}") from None
    values = int(head.channels) * int(np.prod([int(v) for v in head.matrix_size]))
    if values * itemsize > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"image (index {head.image_index}) claims {head.channels} channels × "
                            f"{tuple(head.matrix_size)} pixels, over the limit of {MAX_MESSAGE_BYTES} bytes")
    meta = read_text(source, _u64)
    if b"<!DOCTYPE" in meta.upper() or b"<!ENTITY" in meta.upper():
        raise ProtocolError(f"image (index {head.image_index}): meta XML with DOCTYPE/ENTITY declarations is refused")
    image = ismrmrd.Image(head_bytes, meta.decode("utf-8", "replace"))
    image.data.ravel()[:] = np.frombuffer(source.read(values * itemsize), dtype=image.data.dtype)
    return image


def read_checked(reader, source, message_id: int):
    """``reader(source)`` with anything but :class:`ProtocolError` / :class:`PeerError` turned into a
    ProtocolError naming the message (gadgetron's and ismrmrd's readers raise struct, numpy and ctypes errors on
    malformed input)."""
    try:
        return reader(source)
    except (ProtocolError, PeerError):
        raise
    except Exception as error:  # noqa: BLE001 - malformed input: one documented error type for the caller
        raise ProtocolError(f"message id {message_id} is malformed: {type(error).__name__}: {error}") from None


def _skip_text(source):
    text = read_text(source)
    log.warning("skipping a text message (id 5) from the peer: %.200s", text.decode("utf-8", "replace"))
    return None


def _read_error(source):
    raise PeerError(read_text(source, _u64).decode("utf-8", "replace"))


# ------------------------------------------------------------------------------------------------ writing, whole
class _Buffer:
    def __init__(self):
        self.stream = io.BytesIO()

    def write(self, data):
        self.stream.write(data)


def _as_complex64_image_array(array: ImageArray) -> ImageArray:
    return ImageArray(data=np.asarray(array.data, dtype=np.complex64), headers=array.headers, meta=array.meta,
                      waveform=array.waveform, acq_headers=array.acq_headers)


def encode_item(item) -> bytes:
    """One message (id + payload) for an Acquisition, Image, Waveform, ImageArray or ReconData, in memory."""
    buffer = _Buffer()
    if isinstance(item, ImageArray):
        write_image_array(buffer, _as_complex64_image_array(item))
    elif isinstance(item, ReconData):
        for bit in item.bits:
            for part in (bit.data, bit.ref):
                if part is not None:
                    part.data = np.asarray(part.data, dtype=np.complex64)
        write_recon_data(buffer, item)
    elif isinstance(item, ismrmrd.Image):
        buffer.write(_u16.pack(MSG_IMAGE))
        item.serialize_into(buffer.write)
    elif isinstance(item, ismrmrd.Acquisition):
        buffer.write(_u16.pack(MSG_ACQUISITION))
        item.serialize_into(buffer.write)
    elif isinstance(item, ismrmrd.Waveform):
        buffer.write(_u16.pack(MSG_WAVEFORM))
        item.serialize_into(buffer.write)
    else:
        raise TypeError(f"no writer for an item of type {type(item).__name__}")
    return buffer.stream.getvalue()


def encode_text(message_id: int, text: str | bytes, length_struct=_u32) -> bytes:
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return _u16.pack(message_id) + length_struct.pack(len(data)) + data


def encode_error(text: str) -> bytes:
    return encode_text(MSG_ERROR, text, _u64)


def encode_config_file(name: str) -> bytes:
    data = name.encode("utf-8")
    if len(data) >= CONFIG_FILE_BYTES:
        raise ValueError(f"config name longer than {CONFIG_FILE_BYTES - 1} bytes")
    return _u16.pack(MSG_CONFIG_FILE) + data.ljust(CONFIG_FILE_BYTES, b"\0")


def encode_close() -> bytes:
    return _u16.pack(MSG_CLOSE)


# -------------------------------------------------------------------------------------------- the gadget's side
class RobustConnection(_gconn.Connection):
    """``gadgetron.external.Connection`` with the defects of 1.4.1 fixed (see the module docstring).

    Attributes after the handshake: ``config`` (ElementTree element or None), ``config_name`` (str or None, from a
    config-file message or the config's ``chain`` property), ``parameters`` (dict of str from JSON text overrides),
    ``header`` (ismrmrdHeader), ``raw_bytes.header``, ``ended_with_close`` (the stream ended with CLOSE, not a
    dropped connection).
    """

    def __init__(self, sock: socket.socket, idle_timeout: float | None = None):  # noqa: D107 - no super(): it asserts
        self._init_state(sock, idle_timeout)
        self._handshake()

    @classmethod
    def adopt(cls, connection) -> "RobustConnection":
        """Take over a ``gadgetron.external.Connection`` that already did the handshake (Gadgetron's active mode):
        its socket, config and header (re-parsed robustly from the raw bytes)."""
        robust = cls.__new__(cls)
        robust._init_state(connection.socket.socket)
        raw = connection.raw_bytes
        if raw.config is not None:
            robust.raw_bytes.config = bytes(raw.config).rstrip(b"\0")
            robust.config = robust._parse_config(robust.raw_bytes.config)
        robust.raw_bytes.header = bytes(raw.header).rstrip(b"\0")
        robust.header = connection.header if connection.header is not None else parse_ismrmrd_header(
            robust.raw_bytes.header)
        return robust

    def _init_state(self, sock, idle_timeout: float | None = None):
        self.socket = BoundedSocket(sock, timeout=idle_timeout)
        self.readers = dict(_gconn.Connection._default_readers())
        self.readers.update({
            MSG_ACQUISITION: read_acquisition,
            MSG_IMAGE: read_image,
            MSG_TEXT: _skip_text,
            MSG_ERROR: _read_error,
            MSG_IMAGE_ARRAY: read_image_array,
            MSG_RECON_DATA: read_recon_data,
            MSG_BUCKET: _read_bucket,
        })
        self.writers = []
        self.filters = []
        self.closed = False
        self.raw_bytes = _gconn.Connection.Struct(config=None, header=None)
        self.config = None
        self.config_name = None
        self.parameters: dict[str, str] = {}
        self.header = None
        self.ended_with_close = False  # True once the peer's CLOSE (id 4) arrived

    # -- handshake: config (1 or 2), optional JSON text (5), header (3)
    def _handshake(self):
        while self.header is None:
            mid = self.socket.read_message_id()
            if mid is None:
                raise ProtocolError("peer closed the connection before sending the ISMRMRD header")
            if mid == MSG_CONFIG_FILE:
                self.config_name = read_config_file_name(self.socket)
                log.info("config requested by name: %r", self.config_name)
            elif mid == MSG_CONFIG_TEXT:
                self.raw_bytes.config = read_text(self.socket)
                self.config = self._parse_config(self.raw_bytes.config)
            elif mid == MSG_TEXT:
                self._parameters_from_text(read_text(self.socket))
            elif mid == MSG_HEADER:
                self.raw_bytes.header = read_text(self.socket)
                self.header = parse_ismrmrd_header(self.raw_bytes.header)
            elif mid == MSG_CLOSE:
                raise ProtocolError("peer closed the stream before sending the ISMRMRD header")
            else:
                raise ProtocolError(f"expected config (1/2) and header (3) first, got message id {mid}")

    def _parse_config(self, raw: bytes):
        text = raw.strip()
        if not text or text.endswith(b"?>") and b"<" not in text[text.find(b"?>"):][2:]:
            return None  # Gadgetron sends only the XML declaration when the node has no <configuration>
        try:
            element = parse_xml_safely(text, "gadget configuration")
        except ProtocolError as error:
            log.warning("%s; using defaults", error)
            return None
        chain = element.find("./property[@name='chain']")
        if chain is not None and chain.get("value"):
            self.config_name = chain.get("value")
        return element

    def _parameters_from_text(self, raw: bytes):
        try:
            values = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            log.warning("ignoring a text message before the header (not JSON): %.200r", raw)
            return
        if not isinstance(values, dict):
            log.warning("ignoring JSON parameters that are not an object: %.200r", raw)
            return
        parameters = values.get("parameters", values)
        if isinstance(parameters, dict):
            self.parameters.update({str(k): str(v) for k, v in parameters.items()})
            if "config" in values and isinstance(values["config"], str):
                self.config_name = values["config"]

    # -- items
    def _read_item(self):
        while True:
            mid = self.socket.read_message_id()
            if mid is None:
                log.warning("peer closed the connection without a CLOSE message")
                raise StopIteration()
            if mid == MSG_CLOSE:
                log.debug("connection closed normally")
                self.ended_with_close = True
                raise StopIteration()
            reader = self.readers.get(mid)
            if reader is None:
                if mid in (MSG_CONFIG_TEXT, MSG_HEADER):
                    read_text(self.socket)
                    log.warning("skipping a repeated config/header message (id %d)", mid)
                    continue
                if mid == MSG_CONFIG_FILE:
                    read_config_file_name(self.socket)
                    log.warning("skipping a repeated config-file message (id 1)")
                    continue
                raise ProtocolError(f"unknown message id {mid}: its length is not known, so the stream cannot "
                                    "be resynchronised")
            item = read_checked(reader, self.socket, mid)
            if item is None:  # skipped (text)
                continue
            return mid, item

    def send(self, item):
        """Serialise ``item`` whole (complex64 for arrays), then send it in one piece."""
        self.socket.write(encode_item(item))

    def send_text(self, message_id: int, text: str):
        self.socket.write(encode_text(message_id, text))

    def fail(self, message: str):
        """Tell the peer the gadget failed (ERROR, id 8) and close the stream."""
        if self.closed:
            return
        log.error("gadget failed: %s", message)
        try:
            self.socket.write(encode_error(message) + encode_close())
        except OSError as error:
            log.error("could not send the ERROR message to the peer: %s", error)
        self.closed = True
        drain_and_close(self.socket.socket, min(self.socket.timeout or DRAIN_SECONDS, DRAIN_SECONDS))

    def close(self):
        """Normal end: CLOSE message, then close the socket."""
        if self.closed:
            return
        try:
            self.socket.write(encode_close())
        except OSError as error:
            log.warning("could not send CLOSE: %s", error)
        self._close_socket()

    def _close_socket(self):
        self.closed = True
        self.socket.close()

    def __exit__(self, exc_type, exc, traceback):
        if exc is not None:
            self.fail(f"{type(exc).__name__}: {exc}")
        else:
            self.close()


# ---------------------------------------------------------------------------------------------- the client side
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


