"""Encoding in one pass what pynetdicom encodes through pydicom, element by element: about half
a millisecond of Python per DIMSE message, more than the work behind most of them.

- C-FIND response identifiers, straight from the catalog's DICOM JSON: a match is text
  elements only (dates, times, codes, names, UIDs, counts). Encoded for the context's transfer
  syntax (implicit or explicit VR little endian, which every query SCU offers) and handed to
  pynetdicom already encoded. A match holding anything else (a sequence, a binary VR, a number
  to format, text the character set cannot hold) goes the pydicom way, as does any other syntax.
- Command sets (implicit VR little endian, PS3.7 6.3.1): US, UL and text elements; pynetdicom
  encodes each message's twice (once for its group length).
- C-FIND, C-MOVE and C-GET responses (pending and final) whole, as the P-DATA-TF PDUs that
  carry them (command set, then a C-FIND's match: PS3.8 9.3.5, E.2), for `dicom_node/direct.py`
  to write at once.

Both give pydicom's bytes (tested); `install` puts them in pynetdicom's place.
"""

import struct
from typing import Any

from pydicom import Dataset
from pydicom.multival import MultiValue
from pynetdicom import dimse_messages, service_class

from dicom_node.matching import pn_text

IMPLICIT_LE, EXPLICIT_LE = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"
# Text VRs: values joined by backslashes, padded to an even length (UIDs with NUL).
TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "IS", "LO", "PN", "SH", "TM", "UI", "DS"})
UTF8 = "ISO_IR 192"


class EncodedIdentifier:
    """A response identifier already encoded for one transfer syntax (and its DICOM JSON), which
    pynetdicom's C-FIND SCP hands to its `encode` (replaced by `install`) and nothing else: no
    Dataset is made for it (a Dataset's attributes cost more than the encoding)."""

    __slots__ = ("json", "encoded", "syntax")

    def __init__(self, json: dict[str, Any], encoded: bytes, syntax: str) -> None:
        self.json = json
        self.encoded = encoded
        self.syntax = syntax


def _text(vr: str, values: list[Any]) -> str | None:
    """The element's value as DICOM text; None for what only pydicom formats."""
    parts = []
    for value in values:
        if vr == "PN":
            if not isinstance(value, dict):
                return None
            part = pn_text(value)
        elif isinstance(value, str):
            part = value
        elif vr == "IS" and isinstance(value, int) and not isinstance(value, bool):
            part = str(value)
        else:
            return None  # a DS number, a null: pydicom's formatting
        parts.append(part)
    return "\\".join(parts)


def encode(json: dict[str, Any], syntax: str) -> bytes | None:
    """`json` (a match: {tag hex: {vr, Value}}) encoded for `syntax`; None when it is not one
    of the two little-endian syntaxes or holds an element only pydicom encodes."""
    if syntax not in (IMPLICIT_LE, EXPLICIT_LE):
        return None
    charset = json.get("00080005", {}).get("Value") or []
    if charset and charset != [UTF8]:
        return None
    codec = "utf-8" if charset else "ascii"
    implicit = syntax == IMPLICIT_LE
    out = bytearray()
    for tag in sorted(json):
        element = json[tag]
        vr = element.get("vr")
        if vr not in TEXT_VRS or len(tag) != 8:
            return None
        text = _text(vr, element.get("Value") or [])
        if text is None:
            return None
        try:
            value = text.encode(codec)
        except UnicodeEncodeError:
            return None
        if len(value) % 2:
            value += b"\0" if vr == "UI" else b" "
        if len(value) > 0xFFFF:
            return None
        number = int(tag, 16)
        out += struct.pack("<HH", number >> 16, number & 0xFFFF)
        out += struct.pack("<I", len(value)) if implicit else vr.encode() + struct.pack("<H", len(value))
        out += value
    return bytes(out)


def identifier(json: dict[str, Any], syntax: str) -> Dataset | EncodedIdentifier:
    """What the C-FIND handler yields for one match."""
    encoded = encode(json, syntax)
    return EncodedIdentifier(json, encoded, syntax) if encoded is not None else Dataset.from_json(json)


def command_set(ds: Dataset) -> bytes | None:
    """A command set in implicit VR little endian; None when it holds an element of another VR."""
    out = bytearray()
    for element in ds:
        value = element.value
        values = list(value) if isinstance(value, MultiValue | list | tuple) else [] if value is None else [value]
        if element.VR in ("US", "UL"):
            if not all(isinstance(v, int) for v in values):
                return None
            encoded = struct.pack(f"<{len(values)}{'H' if element.VR == 'US' else 'I'}", *values)
        elif element.VR in ("UI", "AE", "CS", "SH", "LO") and all(isinstance(v, str) for v in values):
            try:
                encoded = "\\".join(values).encode("ascii")
            except UnicodeEncodeError:
                return None
            if len(encoded) % 2:
                encoded += b"\0" if element.VR == "UI" else b" "
        else:
            return None
        out += _command_element(element.tag.element, encoded, element.tag.group)
    return bytes(out)


def _command_element(element: int, value: bytes, group: int = 0x0000) -> bytes:
    """One element in implicit VR little endian (a command set's encoding): tag, length, value."""
    return struct.pack("<HHI", group, element, len(value)) + value


def store_request(message_id: int, sop_class: str, sop_instance: str, originator_aet: str | None = None,
                  originator_id: int | None = None, priority: int = 2) -> bytes:
    """A C-STORE-RQ's command set (PS3.7 9.3.1.1), a data set to follow; pynetdicom's
    `send_c_store` priority (low) by default."""
    body = (_command_element(0x0002, _uid(sop_class)) + _command_element(0x0100, struct.pack("<H", 0x0001))
            + _command_element(0x0110, struct.pack("<H", message_id)) + _command_element(0x0700, struct.pack("<H", priority))
            + _command_element(0x0800, struct.pack("<H", 0x0001)) + _command_element(0x1000, _uid(sop_instance)))
    if originator_aet:
        title = originator_aet.encode("ascii")
        body += _command_element(0x1030, title + b" " * (len(title) % 2))
    if originator_id is not None:
        body += _command_element(0x1031, struct.pack("<H", originator_id))
    return _command_element(0x0000, struct.pack("<I", len(body))) + body


def _uid(uid: str) -> bytes:
    value = uid.encode("ascii")
    return value + b"\0" * (len(value) % 2)


def pdata(context_id: int, header: int, fragment: bytes) -> bytes:
    """A P-DATA-TF PDU of one PDV: `header` 0x03 a command's last fragment, 0x02 a data set's."""
    return packed(context_id, [(header, fragment)])


def packed(context_id: int, pdvs: list[tuple[int, bytes]]) -> bytes:
    """One P-DATA-TF PDU of these PDVs, (header, fragment) each: a PDU holds one or more
    (PS3.8 9.3.5), as a whole response's command and data set."""
    items = b"".join(struct.pack(">IBB", len(fragment) + 2, context_id, header) + fragment for header, fragment in pdvs)
    return struct.pack(">BBI", 0x04, 0, len(items)) + items


# The response's CommandField per query/retrieve primitive (PS3.7 E.1).
RESPONSE_FIELDS = {"C_FIND": 0x8020, "C_GET": 0x8010, "C_MOVE": 0x8021}
SUB_OPERATIONS = ((0x1020, "NumberOfRemainingSuboperations"), (0x1021, "NumberOfCompletedSuboperations"),
                  (0x1022, "NumberOfFailedSuboperations"), (0x1023, "NumberOfWarningSuboperations"))


PENDING_STATUSES = frozenset({0xFF00, 0xFF01})


def response(primitive: Any, context_id: int, max_pdu_length: int) -> bytes | None:
    """A C-FIND (a pending one with its match), C-MOVE or C-GET response (with its
    sub-operation counts), pending or final, as pynetdicom would send it but in one PDU when
    the peer's maximum length allows (pynetdicom sends the command and the data set in one
    each); None for any other, one with an error comment or offending element, or one that
    must be fragmented (a fragment is at most `max_pdu_length` - 6 bytes)."""
    field = RESPONSE_FIELDS.get(type(primitive).__name__)
    status, identifier = primitive.Status, primitive.Identifier
    if field is None or status is None or primitive.MessageIDBeingRespondedTo is None:
        return None
    if primitive.OffendingElement is not None or primitive.ErrorComment is not None:
        return None
    data = identifier.getvalue() if identifier is not None else None
    if data == b"" or (data is None and field == 0x8020 and status in PENDING_STATUSES):  # a pending C-FIND carries its match
        return None
    body = bytearray()
    if primitive.AffectedSOPClassUID is not None:
        body += _command_element(0x0002, _uid(str(primitive.AffectedSOPClassUID)))
    body += _command_element(0x0100, struct.pack("<H", field))  # CommandField
    body += _command_element(0x0120, struct.pack("<H", primitive.MessageIDBeingRespondedTo))
    body += _command_element(0x0800, struct.pack("<H", 0x0001 if data else 0x0101))  # CommandDataSetType
    body += _command_element(0x0900, struct.pack("<H", status))
    for element, name in SUB_OPERATIONS if field != 0x8020 else ():
        count = getattr(primitive, name)
        if count is not None:
            body += _command_element(element, struct.pack("<H", count))
    command = _command_element(0x0000, struct.pack("<I", len(body))) + bytes(body)  # CommandGroupLength
    if max_pdu_length and max(len(command), len(data or b"")) > max_pdu_length - 6:
        return None
    pdvs = [(0x03, command), *([(0x02, data)] if data else [])]
    if not max_pdu_length or sum(len(fragment) + 6 for _, fragment in pdvs) <= max_pdu_length:
        return packed(context_id, pdvs)  # the peer reads one PDU a response, not two
    return b"".join(pdata(context_id, header, fragment) for header, fragment in pdvs)


_service_class_encode = service_class.encode
_messages_encode = dimse_messages.encode


def _encode(ds: Dataset | EncodedIdentifier, is_implicit_vr: bool, is_little_endian: bool, deflated: bool = False) -> bytes | None:
    if isinstance(ds, EncodedIdentifier):
        if is_little_endian and not deflated and is_implicit_vr == (ds.syntax == IMPLICIT_LE):
            return ds.encoded
        ds = Dataset.from_json(ds.json)  # asked for another syntax than its context's: never, but exact
    return _service_class_encode(ds, is_implicit_vr, is_little_endian, deflated)


def _encode_command_set(ds: Dataset, is_implicit_vr: bool, is_little_endian: bool, deflated: bool = False) -> bytes | None:
    if is_implicit_vr and is_little_endian and not deflated:
        encoded = command_set(ds)
        if encoded is not None:
            return encoded
    return _messages_encode(ds, is_implicit_vr, is_little_endian, deflated)


def install() -> None:
    """Let pynetdicom send an EncodedIdentifier as it is (its service classes' `encode`) and
    encode command sets here (its DIMSE messages' `encode`, used for nothing else)."""
    service_class.encode = _encode  # type: ignore[assignment]
    dimse_messages.encode = _encode_command_set  # type: ignore[assignment]
