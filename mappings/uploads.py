"""Uploaded images (the ophthalmic upload service): the file as a `Binary` and a
`DocumentReference` linking it to its patient. Pure: no I/O.

The type is told by the file's first bytes, never by its name or the Content-Type a browser
guessed; what is not one of the image formats below is refused.
"""

import base64
import hashlib
from typing import Any

from mappings.records import placeholder

# Magic numbers of the accepted formats.
# DICOM first: a Part 10 file's 128-byte preamble may itself be a TIFF header (PS3.10 7.5,
# "dual-personality" files), and such a file is DICOM to us.
SIGNATURES: tuple[tuple[bytes, int, str], ...] = (
    (b"DICM", 128, "application/dicom"),
    (b"\x89PNG\r\n\x1a\n", 0, "image/png"),
    (b"\xff\xd8\xff", 0, "image/jpeg"),
    (b"GIF87a", 0, "image/gif"),
    (b"GIF89a", 0, "image/gif"),
    (b"BM", 0, "image/bmp"),
    (b"II*\x00", 0, "image/tiff"),
    (b"MM\x00*", 0, "image/tiff"),
)
LOINC = "http://loinc.org"
IMAGE_DOCUMENT = {"system": LOINC, "code": "72170-4", "display": "Photographic image"}


class RejectedFile(ValueError):
    """An upload that is not an accepted image, or too large."""


def sniff(data: bytes) -> str | None:
    """The media type the content shows, or None."""
    for magic, offset, media_type in SIGNATURES:
        if data[offset:offset + len(magic)] == magic:
            return media_type
    return None


def check_image(data: bytes, max_bytes: int) -> str:
    """The image's media type; RejectedFile for an empty, too large or unknown file."""
    if not data:
        raise RejectedFile("The file is empty")
    if len(data) > max_bytes:
        raise RejectedFile(f"The file has {len(data)} bytes; at most {max_bytes} are accepted")
    media_type = sniff(data)
    if media_type is None:
        raise RejectedFile("The file is not a PNG, JPEG, GIF, BMP, TIFF or DICOM image (judged by its content)")
    return media_type


def image_entries(
    data: bytes,
    media_type: str,
    patient_reference: str,
    *,
    title: str | None = None,
    date: str | None = None,
    description: str | None = None,
    author_reference: str | None = None,
) -> list[dict[str, Any]]:
    """Transaction entries creating the Binary and the DocumentReference that points at it."""
    binary_url = placeholder()
    binary = {"resourceType": "Binary", "contentType": media_type, "data": base64.b64encode(data).decode(),
              "securityContext": {"reference": patient_reference}}  # whose file it is: who may read it
    attachment: dict[str, Any] = {
        "contentType": media_type,
        "url": binary_url,
        "size": len(data),
        "hash": base64.b64encode(hashlib.sha1(data).digest()).decode(),  # noqa: S324 - FHIR's Attachment.hash is SHA-1
    }
    if title:
        attachment["title"] = title
    if date:
        attachment["creation"] = date
    document: dict[str, Any] = {
        "resourceType": "DocumentReference",
        "status": "current",
        "type": {"coding": [IMAGE_DOCUMENT]},
        "subject": {"reference": patient_reference},
        "content": [{"attachment": attachment}],
    }
    if date:
        document["date"] = date if "T" in date else f"{date}T00:00:00Z"
    if description:
        document["description"] = description
    if author_reference:
        document["author"] = [{"reference": author_reference}]
    return [
        {"fullUrl": binary_url, "resource": binary, "request": {"method": "POST", "url": "Binary"}},
        {"fullUrl": placeholder(), "resource": document, "request": {"method": "POST", "url": "DocumentReference"}},
    ]
