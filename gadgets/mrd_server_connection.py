"""The server side of a stream from Siemens OpenRecon/FIRE or a python-ismrmrd-server client (``cdl-lambda serve
--openrecon``), on :class:`gadgets.connection.RobustConnection` with the conventions of python-ismrmrd-server:

- the config name (id 1) the client sends picks the chain, unless the parameters carry ``config``;
- parameters arrive in the ISMRMRD header's ``userParameters`` (OpenRecon: the label's parameters, see
  :mod:`gadgets.openrecon_label`) and in an optional JSON text message right after the header
  (python-ismrmrd-server's "configAdditional": ``{"parameters": {...}}``), which wins;
- a failure reaches the client as a logging text message (id 5, ``"ERROR    <message>"``, NUL-terminated) followed
  by a clean CLOSE: these clients do not read ERROR messages (id 8) and would stop on one, losing the images that
  came before. Images that stand in for a slice that could not be reconstructed are announced the same way (a
  ``WARNING`` text) before the CLOSE; the images themselves are marked (comment ``NOT RECONSTRUCTED``, meta
  ``CDL_NotReconstructed``).
- magnitude images go out as 16-bit integers scaled to 0 … 2^BitsStored − 1 (``BitsStored`` from the header's user
  parameters, 12 by default), each image by its own maximum, as python-ismrmrd-server's examples send them to the
  scanner's image injector; the factor is in meta ``CDL_PixelScale`` and the display window is scaled with it.
"""

from __future__ import annotations

import json
import logging
import socket

import ismrmrd
import numpy as np

from cdl_lambda.gadgets.connection import RobustConnection
from cdl_lambda.gadgets.openrecon_label import known_name, settings_from_values
from cdl_lambda.gadgets.transport import DRAIN_SECONDS, drain_and_close
from cdl_lambda.gadgets.wire import MSG_TEXT, U16, encode_close, encode_text, read_text

log = logging.getLogger(__name__)

# python-ismrmrd-server's logging levels (constants.MRD_LOGGING_*): the level padded to 8 characters, a space, text
LOGGING_ERROR, LOGGING_WARNING, LOGGING_INFO = "ERROR   ", "WARNING ", "INFO    "


def logging_text(level: str, text: str) -> bytes:
    """A text message (id 5) as python-ismrmrd-server's ``send_logging`` writes it (NUL-terminated)."""
    return encode_text(MSG_TEXT, f"{level} {text}\0")


def failure_reply(message: str) -> bytes:
    """What a client gets when the scan fails: an ERROR logging text, then CLOSE."""
    return logging_text(LOGGING_ERROR, message) + encode_close()


def scanner_image(image: ismrmrd.Image, bits_stored: int) -> ismrmrd.Image:
    """A float32 magnitude image as int16 scaled to 0 … 2^bits − 1 by its maximum (other images unchanged); the
    factor goes into meta ``CDL_PixelScale``, the window is scaled with it."""
    if image.data.dtype != np.float32 or image.image_type != ismrmrd.IMTYPE_MAGNITUDE:
        return image
    top = 2 ** bits_stored - 1
    peak = float(np.nanmax(image.data)) if image.data.size else 0.0
    scale = top / peak if peak > 0 and np.isfinite(peak) else 1.0
    pixels = np.clip(np.rint(np.nan_to_num(image.data) * scale), 0, top).astype(np.int16)
    out = ismrmrd.Image.from_array(pixels, transpose=False)
    head = image.getHead()
    head.data_type = ismrmrd.DATATYPE_SHORT
    out.setHead(head)
    meta = ismrmrd.Meta.deserialize(image.attribute_string)
    for key in ("WindowCenter", "WindowWidth", "GADGETRON_WindowCenter", "GADGETRON_WindowWidth"):
        if key in meta:
            try:
                meta[key] = f"{float(meta[key]) * scale:.6g}"
            except (TypeError, ValueError):
                pass
    meta["CDL_PixelScale"] = f"{scale:.9g}"
    out.attribute_string = meta.serialize()
    return out


def header_user_parameters(header) -> dict:
    """``{name: value}`` of the header's userParameterString/Long/Double (values as strings)."""
    user = getattr(header, "userParameters", None)
    values = {}
    if user is None:
        return values
    for kind in ("userParameterLong", "userParameterDouble", "userParameterString"):
        for parameter in getattr(user, kind, None) or []:
            if parameter.name:
                values[str(parameter.name)] = str(parameter.value)
    return values


class MRDServerConnection(RobustConnection):
    """A :class:`RobustConnection` that speaks python-ismrmrd-server's conventions (module docstring)."""

    failure_reply = staticmethod(failure_reply)

    def _handshake(self):
        super()._handshake()
        values = header_user_parameters(self.header)
        additional = self._config_additional()
        values.update(additional)
        chain, properties = settings_from_values(values)
        if chain:
            log.info("chain %r from the parameters (config name sent: %r)", chain, self.config_name)
            self.config_name = chain
        if properties:
            log.info("parameters from the header/JSON: %s", properties)
        self.parameters.update(properties)
        self.not_reconstructed: list[str] = []
        try:
            self.bits_stored = min(max(int(values.get("BitsStored", 12)), 8), 15)
        except ValueError:
            self.bits_stored = 12

    def _config_additional(self) -> dict:
        """The ``parameters`` of a JSON text message that directly follows the header, if one does."""
        sock = self.socket.socket
        try:
            head = sock.recv(2, socket.MSG_PEEK | socket.MSG_WAITALL)
        except (socket.timeout, OSError):
            return {}
        if len(head) < 2 or U16.unpack(head)[0] != MSG_TEXT:
            return {}
        self.socket.read_message_id()
        raw = read_text(self.socket)
        try:
            document = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            log.warning("ignoring a text message after the header (not JSON): %.200r", raw)
            return {}
        parameters = document.get("parameters") if isinstance(document, dict) else None
        if not isinstance(parameters, dict):
            log.warning("ignoring JSON after the header without a 'parameters' object: %.200r", raw)
            return {}
        log.info("additional config (JSON): %s", parameters)
        values = {str(k): str(v) for k, v in parameters.items() if k != "customconfig"}
        unknown = sorted(k for k in values if not known_name(k))
        if unknown:
            log.warning("ignoring JSON parameters that CDL-Lambda does not know: %s", ", ".join(unknown))
        custom = str(parameters.get("customconfig") or "").strip()
        if custom:
            values["config"] = custom
        return values

    def send(self, item):
        if isinstance(item, ismrmrd.Image):
            try:
                reason = ismrmrd.Meta.deserialize(item.attribute_string).get("CDL_NotReconstructed")
            except Exception:  # noqa: BLE001 - unparsable meta: nothing to announce, the image goes as it is
                reason = None
            if reason:
                self.not_reconstructed.append(f"image {item.image_index} (slice {item.slice}): {reason}")
            item = scanner_image(item, self.bits_stored)
        super().send(item)

    def send_logging(self, level: str, text: str) -> None:
        self.socket.write(logging_text(level, text))

    def close(self):
        """Normal end: a WARNING text naming the images marked NOT RECONSTRUCTED (if any), then CLOSE."""
        if not self.closed and getattr(self, "not_reconstructed", None):
            try:
                self.send_logging(LOGGING_WARNING, f"{len(self.not_reconstructed)} image(s) NOT RECONSTRUCTED: "
                                  + " | ".join(self.not_reconstructed[:20]))
            except OSError as error:
                log.warning("could not send the warning to the client: %s", error)
        super().close()

    def fail(self, message: str):
        """The scan failed: an ERROR logging text (the client logs it), then a clean CLOSE."""
        if self.closed:
            return
        log.error("scan failed: %s", message)
        try:
            self.socket.write(failure_reply(message))
        except OSError as error:
            log.error("could not send the error to the client: %s", error)
        self.closed = True
        drain_and_close(self.socket.socket, min(self.socket.timeout or DRAIN_SECONDS, DRAIN_SECONDS))
