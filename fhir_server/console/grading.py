"""The grading Observation a technician records with an uploaded retinal image, shaped as the
retinal image manager's import makes it (mappings/retinal.py), so that `$ai-readiness` counts
the image at its site. Pure."""

from typing import Any

from mappings import retinal
from mappings.dicom import DICOM_UID_SYSTEM

QUALITY = {"low": "quality-low", "acceptable": "quality-acceptable", "high": "quality-high"}
ANATOMY = {"poor": "anatomy-poor", "acceptable": "anatomy-acceptable", "good": "anatomy-good"}
EYES = {"left": "LEFT", "right": "RIGHT"}


def _score(code: str) -> dict[str, str]:
    return {"system": retinal.CODE_SYSTEM, "code": code, "display": retinal.DISPLAY[code]}


def wanted(fields: dict[str, str]) -> bool:
    """Whether the form asks for a grading (a site is chosen)."""
    return bool(fields.get("site"))


def check(fields: dict[str, str]) -> str | None:
    """What is wrong with the form's grading fields, or None."""
    if not wanted(fields):
        return None
    if not fields["site"].startswith("Organization/"):
        return "The site must be one of the list."
    if fields.get("quality") not in QUALITY or fields.get("anatomy") not in ANATOMY:
        return "A grading needs the image quality and the anatomy visibility."
    if fields.get("eye") not in EYES:
        return "A grading needs the eye."
    return None


def observation(fields: dict[str, str], patient: str, derived_from: dict[str, Any], when: str) -> dict[str, Any]:
    """The grading of one image (`derived_from`: the DocumentReference, or the ImagingStudy with
    the instance UID as the Reference's identifier)."""
    structure, laterality, _ = retinal.EYES[EYES[fields["eye"]]]
    over = fields.get("over_illuminated") in ("on", "yes", "true", "Y")

    def component(code: str, value: dict[str, str]) -> dict[str, Any]:
        return {"code": {"coding": [_score(code)]}, "valueCodeableConcept": {"coding": [value]}}

    return {
        "resourceType": "Observation",
        "status": "final",
        "category": [{"coding": [retinal.IMAGING]}],
        "code": {"coding": [_score(retinal.GRADING)]},
        "subject": {"reference": patient},
        "effectiveDateTime": when,
        "performer": [{"reference": fields["site"]}],
        "bodySite": {"extension": [{"url": retinal.LATERALITY_EXTENSION, "valueCoding": laterality}],
                     "coding": [structure], "text": f"{fields['eye'].capitalize()} eye (retina)"},
        "derivedFrom": [derived_from],
        "component": [
            component(retinal.IMAGE_QUALITY, _score(QUALITY[fields["quality"]])),
            component(retinal.ANATOMY_SCORE, _score(ANATOMY[fields["anatomy"]])),
            component(retinal.OVER_ILLUMINATED, retinal.YES if over else retinal.NO),
        ],
    }


def dicom_reference(study: str, sop_instance: str) -> dict[str, Any]:
    return {"reference": f"ImagingStudy/{study}",
            "identifier": {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{sop_instance}"}}
