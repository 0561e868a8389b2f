"""Upload: DICOM files go to STOW-RS (`POST /dicomweb/studies`, the same path as C-STORE), and
PNG/JPEG/TIFF (GIF, BMP) photographs to `Patient/{id}/$upload-image` (Binary +
DocumentReference) for the chosen patient; with a site chosen, a grading Observation too.

One file per request from the page's script (with upload progress, one message per file); the
plain form posts several at once and gets the page back with the same messages."""

import contextlib
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile

from fhir_server.console import grading
from fhir_server.console.api import Api, ApiError, entries, gather, outcome_text
from fhir_server.console.imaging import SITE_SYSTEM
from fhir_server.console.render import HEADERS, page
from fhir_server.console.session import PREFIX, Session, SignInNeeded, apply, current
from mappings.uploads import sniff

router = APIRouter()
PHOTO_TYPES = {"image/png", "image/jpeg", "image/tiff", "image/gif", "image/bmp"}
TEXT_FIELDS = ("patient", "site", "eye", "quality", "anatomy", "over_illuminated", "csrf")
MAX_FILES = 50
# STOW-RS FailureReason codes, as people read them.
FAILURES = {"49152": "cannot be read as DICOM (0xC210)", "43264": "is missing required UIDs, or its file meta "
            "does not match the dataset (0xA900)", "290": "is not a storage SOP class (0x0122)",
            "42752": "could not be stored: the disk is full or the database is unreachable (0xA700)"}


@dataclass
class Outcome:
    """What became of one file, for its message on the page."""

    name: str
    ok: bool
    message: str
    link: str = ""
    kind: str = ""
    size: int = 0


def limits(request: Request) -> dict[str, int]:
    settings = request.app.state.settings
    cap = settings.max_request_bytes or max(settings.max_body_bytes, settings.max_bundle_bytes,
                                            settings.upload_max_bytes)
    return {"photo": settings.upload_max_bytes, "dicom": cap - 64 * 1024}


def _multipart(data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data
            + f"\r\n--{boundary}--\r\n".encode())
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


async def _store_dicom(api: Api, name: str, data: bytes, fields: dict[str, str]) -> Outcome:
    body, content_type = _multipart(data)
    answer = await api.call("POST", "/dicomweb/studies", content=body,
                            headers={"Content-Type": content_type, "Accept": "application/dicom+json"})
    try:
        result = answer.json()
    except ValueError:
        result = None
    if answer.status_code not in (200, 202):
        failed = (result or {}).get("00081198", {}).get("Value", []) if isinstance(result, dict) else []
        if failed:
            reason = str(failed[0].get("00081197", {}).get("Value", ["?"])[0])
            return Outcome(name, False, f"Refused: the file {FAILURES.get(reason, f'failed ({reason})')}.")
        return Outcome(name, False, f"Refused ({answer.status_code}): {outcome_text(result, answer.text[:300])}")
    stored = result.get("00081199", {}).get("Value", []) if isinstance(result, dict) else []
    url = str((stored[0].get("00081190", {}).get("Value") or [""])[0]) if stored else ""
    study = url.split("/studies/")[1].split("/")[0] if "/studies/" in url else ""
    instance = str((stored[0].get("00081155", {}).get("Value") or [""])[0]) if stored else ""
    outcome = Outcome(name, True, "Stored as DICOM.", f"{PREFIX}/imaging", "dicom")
    if study:
        try:
            record = await api.read(f"ImagingStudy/{study}")
        except ApiError as exc:
            return _unread(outcome, study, exc.message, grading.wanted(fields))
        patient = record.get("subject", {}).get("reference", "")
        outcome.link = f"{PREFIX}/patients/{patient.split('/')[-1]}" if patient else f"{PREFIX}/imaging"
        outcome.message = f"Stored as DICOM in study {study}."
        if grading.wanted(fields) and patient:
            await api.fhir("POST", "Observation", json=grading.observation(
                fields, patient, grading.dicom_reference(study, instance), _now()))
            outcome.message += " Grading recorded."
    return outcome


def _unread(outcome: Outcome, study: str, problem: str, graded: bool) -> Outcome:
    """A study stored but not read back: without its patient, a grading asked for could not be
    recorded (the file then counts as failed)."""
    outcome.message = f"Stored as DICOM in study {study}, but the study could not be read back ({problem})"
    outcome.message += ", so the grading was not recorded." if graded else "."
    outcome.ok = not graded
    return outcome


async def _store_photo(api: Api, name: str, data: bytes, fields: dict[str, str]) -> Outcome:
    patient = fields.get("patient", "").removeprefix("Patient/")
    if not patient:
        return Outcome(name, False, "Choose the patient this photograph belongs to.")
    try:
        answer = await api.call("POST", f"/fhir/Patient/{patient}/$upload-image", content=data,
                                params={"title": name[:200]},
                                headers={"Content-Type": "application/octet-stream", "Accept": "application/fhir+json"})
    except ApiError as exc:
        return Outcome(name, False, f"Refused: {exc.message}")
    try:
        body = answer.json()
    except ValueError:
        body = None
    if answer.status_code == 404:
        return Outcome(name, False, f"Refused: there is no patient '{patient}'.")
    if answer.status_code != 201:
        return Outcome(name, False, f"Refused ({answer.status_code}): {outcome_text(body, answer.text[:300])}")
    document = body.get("id", "")
    outcome = Outcome(name, True, "Stored as a photograph of the patient.", f"{PREFIX}/patients/{patient}", "photo")
    if grading.wanted(fields):
        await api.fhir("POST", "Observation", json=grading.observation(
            fields, f"Patient/{patient}", {"reference": f"DocumentReference/{document}"}, _now()))
        outcome.message += " Grading recorded."
    return outcome


async def store(request: Request, api: Api, name: str, data: bytes, fields: dict[str, str]) -> Outcome:
    """One file: its type judged by content, its size checked, then stored; every refusal is a
    message, never an exception."""
    name = (name or "file").rsplit("/", 1)[-1][:200]
    kind = sniff(data) if data else None
    caps = limits(request)
    if not data:
        return Outcome(name, False, "Refused: the file is empty.")
    problem = grading.check(fields)
    if problem:
        return Outcome(name, False, f"Not stored: {problem}", size=len(data))
    try:
        if kind == "application/dicom":
            if len(data) > caps["dicom"]:
                return Outcome(name, False, f"Refused: {len(data)} bytes, more than the {caps['dicom']} accepted.")
            outcome = await _store_dicom(api, name, data, fields)
        elif kind in PHOTO_TYPES:
            if len(data) > caps["photo"]:
                return Outcome(name, False, f"Refused: {len(data)} bytes; photographs may have at most "
                                            f"{caps['photo']} bytes.", size=len(data))
            outcome = await _store_photo(api, name, data, fields)
        else:
            return Outcome(name, False, "Refused: not a DICOM file or a PNG, JPEG, TIFF, GIF or BMP image "
                                        "(judged by its content).", size=len(data))
    except ApiError as exc:
        return Outcome(name, False, f"Stored, but the grading was refused: {exc.message}", size=len(data))
    outcome.size = len(data)
    return outcome


async def _read_form(request: Request) -> tuple[dict[str, str], list[UploadFile]] | str:
    """The form's text fields and files, or what is wrong with it."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return "Send the files as a form (multipart/form-data)."
    try:
        form = await request.form(max_files=MAX_FILES, max_fields=50)
    except Exception as exc:  # noqa: BLE001 - a malformed or oversized form is a message
        return f"The form could not be read: {exc}"
    fields = {k: str(form.get(k) or "").strip() for k in TEXT_FIELDS}
    files = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
    return fields, files


async def _patients(api: Api, chosen: str) -> list[dict[str, Any]]:
    params = {"_count": "200", "_sort": "family,given", "_elements": "name,birthDate,identifier"}
    bundle = await api.search("Patient", params)
    found = entries(bundle)
    if any(link.get("relation") == "next" for link in bundle.get("link", [])):
        found.append({"id": "", "more": True})  # the list is not all of them: the template says how to choose
    if chosen and all(p.get("id") != chosen for p in found):
        with contextlib.suppress(ApiError):
            found.insert(0, await api.read(f"Patient/{chosen}"))
    return found


async def _context(request: Request, api: Api, fields: dict[str, str], outcomes: list[Outcome],
                   error: str = "") -> dict[str, Any]:
    patients, sites = await gather(
        _patients(api, fields.get("patient", "")),
        api.search("Organization", {"identifier": f"{SITE_SYSTEM}|", "_count": "200", "_sort": "name",
                                    "_elements": "name"}))
    return {"title": "Upload images", "active": "upload", "fields": fields, "outcomes": outcomes, "error": error,
            "patients": [] if isinstance(patients, ApiError) else patients,
            "sites": [] if isinstance(sites, ApiError) else entries(sites), "limits": limits(request),
            "eyes": list(grading.EYES), "qualities": list(grading.QUALITY), "anatomies": list(grading.ANATOMY)}


@page
async def upload_page(request: Request, session: Session, api: Api) -> tuple[str, dict]:
    fields = {"patient": request.query_params.get("patient", "")}
    return "upload.html", await _context(request, api, fields, [])


@page
async def upload_form(request: Request, session: Session, api: Api) -> tuple[str, dict]:
    """The plain form (no script): every file stored in turn, the page shown with their messages."""
    read = await _read_form(request)
    if isinstance(read, str):
        return "upload.html", {**await _context(request, api, {}, [], read), "status": 400}
    fields, files = read
    if not session.check_csrf(fields.get("csrf")):
        return "upload.html", {**await _context(request, api, fields, [], "The form was out of date: reload the "
                                                "page and send the files again."), "status": 403}
    if not files or all(not f.filename for f in files):
        return "upload.html", {**await _context(request, api, fields, [], "Choose at least one file."), "status": 400}
    outcomes = [await store(request, api, f.filename or "file", await f.read(), fields) for f in files]
    status = 200 if any(o.ok for o in outcomes) else 400  # some stored: the page says which were not
    return "upload.html", {**await _context(request, api, fields, outcomes), "status": status}


@router.post("/upload/file")
async def upload_one(request: Request) -> Response:
    """One file from the page's script: the outcome as JSON (status 200 stored, 4xx refused)."""
    try:
        session = await current(request)
    except SignInNeeded:
        return JSONResponse({"ok": False, "message": "You are signed out: sign in again."}, 401, headers=HEADERS)
    read = await _read_form(request)
    if isinstance(read, str):
        return apply(JSONResponse({"ok": False, "message": read}, 400, headers=HEADERS), request, session)
    fields, files = read
    if not session.check_csrf(fields.get("csrf")):
        return apply(JSONResponse({"ok": False, "message": "The page is out of date: reload it."}, 403,
                                  headers=HEADERS), request, session)
    if len(files) != 1:
        return apply(JSONResponse({"ok": False, "message": "Send one file."}, 400, headers=HEADERS), request, session)
    async with Api(request, session.token) as api:
        outcome = await store(request, api, files[0].filename or "file", await files[0].read(), fields)
    return apply(JSONResponse(asdict(outcome), 200 if outcome.ok else 422, headers=HEADERS), request, session)


router.add_api_route("/upload", upload_page, methods=["GET"])
router.add_api_route("/upload", upload_form, methods=["POST"])
