"""Doctor–patient interactions: looked up by the patient's insurance number and filtered by
label, and one interaction with its metrics, Q&A, remarks and next steps (the Encounter and what
refers to it, in one search)."""

from typing import Any

from fastapi import APIRouter, Request

from fhir_server.console.api import Api, ApiError, entries, gather
from fhir_server.console.dashboard import included
from fhir_server.console.paging import links
from fhir_server.console.render import page
from fhir_server.console.session import PREFIX, Session
from mappings.interactions import INSURANCE_SYSTEM, LABEL_SYSTEM

router = APIRouter()
PAGE_SIZE = 25
REVINCLUDES = ("Observation:encounter", "QuestionnaireResponse:encounter", "CarePlan:encounter",
               "ClinicalImpression:encounter")


def labels_of(resource: dict[str, Any]) -> list[str]:
    return [t.get("code", "") for t in resource.get("meta", {}).get("tag", []) if t.get("system") == LABEL_SYSTEM]


@page
async def interaction_list(request: Request, session: Session, api: Api) -> tuple[str, dict]:
    query = dict(request.query_params)
    params: dict[str, str] = {"_tag": f"{LABEL_SYSTEM}|{query['label']}" if query.get("label") else f"{LABEL_SYSTEM}|",
                              "_sort": "-date", "_count": str(PAGE_SIZE), "_include": "Encounter:subject"}
    number = query.get("insurance", "").strip()
    if number:
        params["patient.identifier"] = f"{INSURANCE_SYSTEM}|{number}"
    if query.get("page"):
        params["_page"] = query["page"]
    found, every = await gather(api.search("Encounter", params),
                                api.search("Encounter", {"_tag": f"{LABEL_SYSTEM}|", "_count": "500", "_elements": "id"}))
    labels = sorted({label for e in ([] if isinstance(every, ApiError) else entries(every)) for label in labels_of(e)})
    context: dict[str, Any] = {"title": "Interactions", "active": "interactions", "query": query, "labels": labels,
                               "error": "", "encounters": [], "refs": {}, "links": {}, "total": None}
    if isinstance(found, ApiError):
        context.update(error=found.message, status=400 if found.status < 500 else found.status)
    else:
        context.update(encounters=entries(found), refs=included(found), total=found.get("total"),
                       links=links(found, f"{PREFIX}/interactions", query))
        if number and not context["encounters"]:
            context["error"] = f"No interaction of a patient with insurance number {number}" + (
                f" labelled {query['label']}." if query.get("label") else ".")
    return "interactions.html", context


def _symptom(observation: dict[str, Any]) -> bool:
    """A symptom (category exam); the rest are the interaction's metrics and health status."""
    return any(c.get("code") == "exam" for cat in observation.get("category", []) for c in cat.get("coding", []))


@page
async def interaction(request: Request, session: Session, api: Api) -> tuple[str, dict]:
    encounter_id = request.path_params["encounter_id"]
    bundle = await api.search("Encounter", [("_id", encounter_id), ("_include", "Encounter:subject"),
                                            *(("_revinclude", r) for r in REVINCLUDES)])
    found = entries(bundle)
    if not found:
        raise ApiError(404, f"There is no interaction '{encounter_id}'.")
    encounter = found[0]
    related: dict[str, list[dict[str, Any]]] = {}
    for resource in entries(bundle, "include"):
        related.setdefault(resource["resourceType"], []).append(resource)
    patient = next(iter(related.get("Patient", [])), None)
    observations = related.get("Observation", [])
    return "interaction.html", {
        "title": f"Interaction: {encounter.get('reasonCode', [{}])[0].get('text') or 'visit'}",
        "active": "interactions", "encounter": encounter, "patient": patient, "labels": labels_of(encounter),
        "metrics": [o for o in observations if not _symptom(o)],
        "other_observations": [o for o in observations if _symptom(o)],
        "answers": related.get("QuestionnaireResponse", []), "plans": related.get("CarePlan", []),
        "impressions": related.get("ClinicalImpression", []),
        "insurance": next((i.get("value") for i in (patient or {}).get("identifier", [])
                           if i.get("system") == INSURANCE_SYSTEM), ""),
    }


router.add_api_route("/interactions", interaction_list, methods=["GET"])
router.add_api_route("/interactions/{encounter_id}", interaction, methods=["GET"])
