"""Appointments: the list with status badges and counts, the scheduling form (whose refusals,
such as double booking, are shown on the form), and the laboratory results in date order."""

from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Request

from fhir_server.console.api import Api, ApiError, entries, gather
from fhir_server.console.dashboard import OPEN_STATUSES, included
from fhir_server.console.paging import links
from fhir_server.console.render import page
from fhir_server.console.session import PREFIX, Session

router = APIRouter()
PAGE_SIZE = 25
STATUSES = ("proposed", "pending", "booked", "arrived", "fulfilled", "cancelled", "noshow", "checked-in", "waitlist")
COUNTED = (("total", None), ("upcoming", OPEN_STATUSES), ("completed", "fulfilled"), ("cancelled", "cancelled"),
           ("no-show", "noshow"))
MAX_MINUTES = 24 * 60


async def _none() -> None:
    return None


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def _context(api: Api, query: dict[str, str]) -> dict[str, Any]:
    patient = query.get("patient", "").removeprefix("Patient/")
    scope = [("patient", f"Patient/{patient}")] if patient else []
    params: dict[str, str] = {"_sort": "-date", "_count": str(PAGE_SIZE), "_include": "Appointment:actor"}
    if patient:
        params["patient"] = f"Patient/{patient}"
    if query.get("status") in STATUSES:
        params["status"] = query["status"]
    if query.get("page"):
        params["_page"] = query["page"]
    now = _now()
    counts = [api.count("Appointment", scope + ([("status", s)] if s else [])
                        + ([("date", f"ge{now}")] if name == "upcoming" else [])) for name, s in COUNTED]
    labs = {"category": "laboratory", "_sort": "-date", "_count": "30", "_include": "Observation:subject"}
    if patient:
        labs["subject"] = f"Patient/{patient}"
    chosen, found, lab_bundle, practitioners, patients, *numbers = await gather(
        api.read(f"Patient/{patient}") if patient else _none(),
        api.search("Appointment", params), api.search("Observation", labs),
        api.search("Practitioner", {"_count": "200", "_elements": "name"}),
        api.search("Patient", {"_count": "200", "_sort": "family,given", "_elements": "name,birthDate,identifier"}),
        *counts)
    if isinstance(patients, dict) and isinstance(chosen, dict) and all(p.get("id") != patient
                                                                       for p in entries(patients)):
        patients.setdefault("entry", []).insert(0, {"resource": chosen})  # one beyond the list's first page
    errors = [x.message for x in (found, lab_bundle) if isinstance(x, ApiError)]
    return {
        "title": "Appointments", "active": "appointments", "query": query, "patient_id": patient,
        "errors": errors,
        "appointments": [] if isinstance(found, ApiError) else entries(found),
        "refs": {} if isinstance(found, ApiError) else included(found),
        "links": {} if isinstance(found, ApiError) else links(found, f"{PREFIX}/appointments", query),
        "labs": [] if isinstance(lab_bundle, ApiError) else entries(lab_bundle),
        "lab_refs": {} if isinstance(lab_bundle, ApiError) else included(lab_bundle),
        "counts": [(name, n if isinstance(n, int) else "?") for (name, _), n in zip(COUNTED, numbers, strict=True)],
        "practitioners": [] if isinstance(practitioners, ApiError) else entries(practitioners),
        "patients": [] if isinstance(patients, ApiError) else entries(patients),
        "patients_capped": not isinstance(patients, ApiError) and any(
            link.get("relation") == "next" for link in patients.get("link", [])),
        "statuses": STATUSES, "form": {"patient": patient, "duration": "30"}, "form_error": "", "booked": None,
    }


@page
async def appointments(request: Request, session: Session, api: Api) -> tuple[str, dict]:
    return "appointments.html", await _context(api, dict(request.query_params))


def appointment(form: dict[str, str]) -> dict[str, Any] | str:
    """The Appointment the scheduling form asks for, or what is wrong with the form. The time
    is UTC (the form says so)."""
    if not form.get("patient") or not form.get("practitioner"):
        return "Choose the patient and the practitioner."
    try:
        start = datetime.fromisoformat(form.get("start", "")).replace(tzinfo=UTC)
    except ValueError:
        return "The start must be a date and time (YYYY-MM-DDTHH:MM)."
    try:
        minutes = int(form.get("duration", ""))
    except ValueError:
        return "The duration must be a number of minutes."
    if not 5 <= minutes <= MAX_MINUTES:
        return f"The duration must be between 5 and {MAX_MINUTES} minutes."
    end = start + timedelta(minutes=minutes)
    stamp = "%Y-%m-%dT%H:%M:%SZ"
    resource: dict[str, Any] = {
        "resourceType": "Appointment", "status": "booked",
        "start": start.strftime(stamp), "end": end.strftime(stamp), "minutesDuration": minutes,
        "participant": [
            {"actor": {"reference": f"Patient/{form['patient'].removeprefix('Patient/')}"}, "status": "accepted"},
            {"actor": {"reference": f"Practitioner/{form['practitioner'].removeprefix('Practitioner/')}"},
             "status": "accepted"},
        ],
    }
    if form.get("description", "").strip():
        resource["description"] = form["description"].strip()[:500]
    return resource


async def _book(session: Session, api: Api, form: dict[str, str]) -> tuple[dict[str, Any] | None, str, int]:
    """The booked Appointment, or why the form was refused and the page's status."""
    if not session.check_csrf(form.get("csrf")):
        return None, "The form was out of date: reload the page and try again.", 403
    made = appointment(form)
    if isinstance(made, str):
        return None, made, 400
    try:
        booked = await api.fhir("POST", "Appointment", json=made, headers={"Prefer": "return=representation"})
    except ApiError as exc:
        refused = "Not booked: this practitioner already has an appointment then. " if exc.status == 409 else "Not booked: "
        return None, refused + exc.message, exc.status if exc.status < 500 else 502
    return booked, "", 200


@page
async def schedule(request: Request, session: Session, api: Api) -> tuple[str, dict]:
    """Book an appointment; a refusal (a slot taken: 409; a bad reference: 400/404) is shown on the form.
    The page is built after the booking, so that its list and counts include it."""
    form = {k: str(v) for k, v in (await request.form()).items()}
    booked, refused, status = await _book(session, api, form)
    context = await _context(api, {"patient": form.get("patient", "")})
    if booked is None:
        context.update(form=form, form_error=refused, status=status)
    else:
        context["booked"] = booked
    return "appointments.html", context


router.add_api_route("/appointments", appointments, methods=["GET"])
router.add_api_route("/appointments", schedule, methods=["POST"])
