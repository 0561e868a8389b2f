"""Imaging records as the gallery and the patient page show them: one item per image, whether a
DICOM instance of an ImagingStudy (its thumbnail from DICOMweb `/rendered`) or a photograph kept
as a Binary behind a Media or DocumentReference. Pure."""

from dataclasses import dataclass
from typing import Any

from fhir_server.console import fhir_text
from fhir_server.console.session import PREFIX

EYES = {"8966001": "left", "18944008": "right", "419161000": "left", "419465000": "right", "7771000": "left",
        "24028007": "right", "L": "left", "R": "right"}  # eye structures, lateralities (SNOMED CT), DICOM


@dataclass(frozen=True)
class Image:
    kind: str  # dicom or photo
    key: str  # the viewer's address after /console/imaging/view/
    thumbnail: str
    full: str
    title: str
    when: str
    modality: str
    eye: str
    patient: str  # Patient/<id>
    record: str  # the FHIR resource, Type/id
    site: str = ""


def binary_id(url: str | None) -> str:
    """The id of `Binary/<id>` (relative or absolute); empty for another URL."""
    parts = (url or "").rstrip("/").split("/")
    return parts[-1] if len(parts) >= 2 and parts[-2] == "Binary" else ""


def _eye(concept: dict[str, Any] | None) -> str:
    """The eye a CodeableConcept (Media.bodySite) or a Coding (ImagingStudy.series.laterality) names."""
    concept = concept or {}
    for coding in [concept, *(concept.get("coding", []) or [])]:
        if coding.get("code") in EYES:
            return EYES[coding["code"]]
    return ""


def from_study(study: dict[str, Any]) -> list[Image]:
    items = []
    for series in study.get("series", []) or []:
        eye = _eye(series.get("laterality")) or _eye(series.get("bodySite"))
        for instance in series.get("instance", []) or []:
            path = f"{study['id']}/{series.get('uid', '')}/{instance.get('uid', '')}"
            items.append(Image(
                "dicom", f"dicom/{path}", f"{PREFIX}/images/dicom/{path}?size=256", f"{PREFIX}/images/dicom/{path}",
                study.get("description") or series.get("description") or instance.get("title") or "DICOM image",
                study.get("started", ""), series.get("modality", {}).get("code", ""), eye,
                study.get("subject", {}).get("reference", ""), f"ImagingStudy/{study['id']}"))
    return items


def from_media(media: dict[str, Any]) -> list[Image]:
    binary = binary_id(media.get("content", {}).get("url"))
    if not binary:
        return []
    return [Image("photo", f"binary/{binary}", f"{PREFIX}/images/binary/{binary}?size=256",
                  f"{PREFIX}/images/binary/{binary}", media.get("content", {}).get("title") or "Photograph",
                  media.get("createdDateTime", ""), fhir_text.code(media.get("modality")) or "photo",
                  _eye(media.get("bodySite")), media.get("subject", {}).get("reference", ""), f"Media/{media['id']}",
                  site=media.get("operator", {}).get("reference", ""))]


def from_document(document: dict[str, Any]) -> list[Image]:
    items = []
    for content in document.get("content", []) or []:
        attachment = content.get("attachment", {})
        binary = binary_id(attachment.get("url"))
        if binary and str(attachment.get("contentType", "image/")).startswith("image/"):
            items.append(Image("photo", f"binary/{binary}", f"{PREFIX}/images/binary/{binary}?size=256",
                               f"{PREFIX}/images/binary/{binary}",
                               attachment.get("title") or document.get("description") or "Image",
                               document.get("date", ""), "photo", "",
                               document.get("subject", {}).get("reference", ""), f"DocumentReference/{document['id']}"))
    return items


def images(studies: list[dict[str, Any]], media: list[dict[str, Any]], documents: list[dict[str, Any]]) -> list[Image]:
    """Every image, newest first."""
    found = [i for s in studies for i in from_study(s)] + [i for m in media for i in from_media(m)]
    found += [i for d in documents for i in from_document(d)]
    return sorted(found, key=lambda i: i.when or "", reverse=True)
