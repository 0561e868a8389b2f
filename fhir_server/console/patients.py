"""Patients: a searchable, paged list with per-patient counts and summary statistics, and one
patient's longitudinal record (`$everything`), with trend charts of repeated measurements."""

from collections import defaultdict
from datetime import date
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request

from fhir_server.console import fhir_text, images, trends
from fhir_server.console.api import Api, ApiError, entries, gather
from fhir_server.console.interactions import labels_of
from fhir_server.console.paging import links
from fhir_server.console.render import page
from fhir_server.console.session import PREFIX, Session

router = APIRouter()
PAGE_SIZE = 20
MAX_COUNTED = 1000  # records fetched per count search; more shows as "1000+"
# Each count: the type searched, its patient parameter, any other criteria.
COUNTS = {
    "encounters": [("Encounter", "subject", {})],
    "labs": [("Observation", "subject", {"category": "laboratory"})],
    "imaging": [("ImagingStudy", "subject", {}), ("DocumentReference", "subject", {}), ("Media", "subject", {})],
    "allergies": [("AllergyIntolerance", "patient", {})],
}
GENDERS = ("female", "male", "other", "unknown")
AGE_GROUPS = (("0–17", 0, 18), ("18–39", 18, 40), ("40–64", 40, 65), ("65+", 65, 200))


def _years_ago(years: int, today: date) -> str:
    try:
        return today.replace(year=today.year - years).isoformat()
    except ValueError:  # 29 February
        return today.replace(year=today.year - years, day=28).isoformat()


def _criteria(query: dict[str, str]) -> dict[str, str]:
    found = {}
    if query.get("name"):
        found["name"] = query["name"]
    if query.get("identifier"):
        found["identifier"] = query["identifier"]
    if query.get("gender") in GENDERS:
        found["gender"] = query["gender"]
    return found


async def _counts(api: Api, ids: list[str]) -> dict[str, dict[str, str]]:
    """Per patient id, each count: one search per type for the whole page, not one per patient.
    A search by 20 subjects reads every record of theirs of the type (the category is checked
    after): for laboratory results, of which patients have few and gradings many, all of them
    are read at once instead while they number fewer than a page of them (a count first)."""
    searches = [(name, t, param, extra) for name, specs in COUNTS.items() for t, param, extra in specs]
    subjects = ",".join(f"Patient/{i}" for i in ids)
    few_labs = await api.count("Observation", [("category", "laboratory")]) <= MAX_COUNTED

    def search(t: str, param: str, extra: dict[str, str]) -> Any:
        criteria = extra if extra and few_labs and t == "Observation" else {param: subjects, **extra}
        return api.search(t, {**criteria, "_elements": param, "_count": str(MAX_COUNTED)})

    bundles = await gather(*(search(t, param, extra) for _, t, param, extra in searches))
    numbers: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    capped: set[str] = set()
    for (name, _, param, _), bundle in zip(searches, bundles, strict=True):
        if isinstance(bundle, ApiError):
            capped.add(name)
            continue
        if any(link.get("relation") == "next" for link in bundle.get("link", [])):
            capped.add(name)
        for resource in entries(bundle):
            numbers[fhir_text.reference_id(resource.get(param))][name] += 1
    return {i: {name: f"{numbers[i][name]}{'+' if name in capped else ''}" for name in COUNTS} for i in ids}


@page
async def patient_list(request: Request, session: Session, api: Api) -> tuple[str, dict]:
    """The list and its counts; the statistics come after (their fragment route): eight counts
    over every matching patient."""
    query = dict(request.query_params)
    criteria = _criteria(query)
    params = {**criteria, "_count": str(PAGE_SIZE), "_sort": "family,given", "_total": "accurate"}
    if query.get("page"):
        params["_page"] = query["page"]
    context: dict[str, Any] = {"title": "Patients", "active": "patients", "query": query, "error": "",
                               "patients": [], "counts": {}, "total": None, "links": {}, "genders": GENDERS,
                               "statistics": f"{PREFIX}/statistics/patients?{urlencode(criteria)}"}
    try:
        bundle = await api.search("Patient", params)
    except ApiError as exc:  # a bad search is shown next to the form
        context.update(error=exc.message, status=400 if exc.status < 500 else exc.status)
        return "patients.html", context
    context["patients"] = entries(bundle)
    context["total"] = bundle.get("total")
    context["links"] = links(bundle, f"{PREFIX}/patients", query)
    if context["patients"]:
        context["counts"] = await _counts(api, [p["id"] for p in context["patients"]])
    return "patients.html", context


@page
async def patient_statistics(request: Request, session: Session, api: Api) -> tuple[str, dict]:
    """Sex and age groups of the patients a search finds: the list's fragment (`?fragment=1`)."""
    criteria = _criteria(dict(request.query_params))
    today = date.today()
    age_counts = [api.count("Patient", [*criteria.items(), ("birthdate", f"gt{_years_ago(high, today)}"),
                                        ("birthdate", f"le{_years_ago(low, today)}")])
                  for _, low, high in AGE_GROUPS]
    others = [(k, v) for k, v in criteria.items() if k != "gender"]
    gender_counts = [api.count("Patient", [*others, ("gender", g)]) for g in GENDERS]
    gender_counts.append(api.count("Patient", [*others, ("gender:missing", "true")]))
    age_counts.append(api.count("Patient", [*criteria.items(), ("birthdate:missing", "true")]))
    stats = await gather(*gender_counts, *age_counts)
    errors = sorted({s.message for s in stats if isinstance(s, ApiError)})
    numbers = [s if isinstance(s, int) else None for s in stats]
    split = len(GENDERS) + 1
    genders = list(zip([*GENDERS, "not recorded"], numbers[:split], strict=True))
    ages = list(zip([label for label, _, _ in AGE_GROUPS] + ["no birth date"], numbers[split:], strict=True))
    context = {"title": "Patient statistics", "active": "patients", "errors": errors, "genders": genders, "ages": ages,
               "charts": {"sex": trends.bar([g for g, _ in genders], [n or 0 for _, n in genders]),
                          "age": trends.bar([a for a, _ in ages], [n or 0 for _, n in ages])}}
    fragment = request.query_params.get("fragment") == "1"
    return ("statistics_fragment.html" if fragment else "statistics.html"), context


# -- one patient -----------------------------------------------------------------------------------

# What the record shows ($everything's `_type`: not the Binary files, whose thumbnails come apart).
SECTIONS = ("Encounter", "Observation", "ImagingStudy", "Media", "DocumentReference", "AllergyIntolerance",
            "MedicationRequest", "MedicationStatement", "Condition", "Appointment")


def _by_date(resources: list[dict[str, Any]], key: Any) -> list[dict[str, Any]]:
    return sorted(resources, key=lambda r: str(key(r) or ""), reverse=True)


async def patient_record(request: Request, session: Session, api: Api) -> tuple[str, dict]:
    patient_id = request.path_params["patient_id"]
    patient, everything = await gather(api.read(f"Patient/{patient_id}"),
                                       api.read(f"Patient/{patient_id}/$everything",
                                                {"_count": "1000", "_type": ",".join(SECTIONS)}))
    if isinstance(patient, ApiError):
        raise patient
    record: dict[str, list[dict[str, Any]]] = defaultdict(list)
    others: dict[str, dict[str, Any]] = {}
    error = everything.message if isinstance(everything, ApiError) else ""
    more = False
    if not isinstance(everything, ApiError):
        more = any(link.get("relation") == "next" for link in everything.get("link", []))
        for entry in everything.get("entry", []):
            resource = entry.get("resource", {})
            kind = resource.get("resourceType", "")
            if entry.get("search", {}).get("mode") == "include":
                others[f"{kind}/{resource.get('id')}"] = resource
            elif kind != "Patient":
                record[kind].append(resource)
    observations = _by_date(record["Observation"], fhir_text.effective)
    encounters = _by_date(record["Encounter"], lambda r: r.get("period", {}).get("start"))
    labels = {f"Encounter/{e['id']}": labels_of(e) for e in encounters}
    context = {
        "title": fhir_text.human_name(patient), "active": "patients", "patient": patient, "error": error,
        "more": more, "age": fhir_text.age(patient.get("birthDate")),
        "encounters": encounters, "labels": labels,
        "observations": observations,
        "trends": trends.trend_charts(observations),
        "images": images.images(record["ImagingStudy"], record["Media"], record["DocumentReference"]),
        "allergies": record["AllergyIntolerance"],
        "medications": record["MedicationRequest"] + record["MedicationStatement"],
        "conditions": record["Condition"],
        "appointments": _by_date(record["Appointment"], lambda r: r.get("start")),
        "others": others,
        "counts": {k: len(record[k]) for k in SECTIONS},
    }
    return "patient.html", context


router.add_api_route("/patients", patient_list, methods=["GET"])
router.add_api_route("/statistics/patients", patient_statistics, methods=["GET"])
router.add_api_route("/patients/{patient_id}", page(patient_record), methods=["GET"])
