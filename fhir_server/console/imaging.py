"""The imaging gallery (DICOM studies and photographs as thumbnails, filtered by patient, site,
modality, eye and quality), the viewer of one image, and the image routes behind them: a
browser's `<img>` cannot send a bearer token, so these fetch DICOMweb `/rendered` or the
`Binary` with the session's token and pass the picture on."""

import asyncio
import base64
import contextlib
import io
import re
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from fhir_server.console import fhir_text, grading
from fhir_server.console.api import Api, ApiError, entries, gather
from fhir_server.console.images import images
from fhir_server.console.render import page
from fhir_server.console.session import PREFIX, Session, SignInNeeded, apply, current
from mappings import retinal

router = APIRouter()
PER_TYPE = 24  # newest images of each kind on one gallery page (more: narrow the filters)
SITE_SYSTEM = retinal.source_system(retinal.SYSTEM, "site")
GRADING = f"{retinal.CODE_SYSTEM}|{retinal.GRADING}"
QUALITIES = grading.QUALITY
EYE_CODES = {"left": "8966001", "right": "18944008"}
MODALITIES = ("OP", "XC", "CT", "MR", "US", "CR", "DX", "photo")
BROWSER_TYPES = {"image/png", "image/jpeg", "image/gif"}
MAX_PIXELS = 60_000_000  # larger photographs are not decoded for a thumbnail
RECORD = re.compile(r"(Media|DocumentReference)/[A-Za-z0-9\-.]{1,64}")
IMAGE_HEADERS = {"Cache-Control": "private, max-age=300"}


def _filters(query: dict[str, str]) -> dict[str, str]:
    found = {k: query[k].strip() for k in ("patient", "site", "modality", "eye", "quality") if query.get(k)}
    if found.get("patient", "").startswith("Patient/"):
        found["patient"] = found["patient"].removeprefix("Patient/")
    if found.get("site") and not found["site"].startswith("Organization/"):
        found["site"] = f"Organization/{found['site']}"
    return found


def _searches(f: dict[str, str]) -> dict[str, dict[str, str] | None]:
    """The search of each kind of imaging record for the filters (None: the kind cannot match)."""
    common: dict[str, str] = {"_count": str(PER_TYPE)}
    if f.get("patient"):
        common["subject"] = f"Patient/{f['patient']}"
    if f.get("site"):
        common["_has:Observation:derived-from:performer"] = f["site"]
    if f.get("quality") in QUALITIES:
        common["_has:Observation:derived-from:component-code-value-concept"] = (
            f"{retinal.CODE_SYSTEM}|{retinal.IMAGE_QUALITY}${retinal.CODE_SYSTEM}|{QUALITIES[f['quality']]}")
    modality, eye = f.get("modality"), f.get("eye")
    study: dict[str, str] | None = {**common, "_sort": "-started", "_include": "ImagingStudy:subject"}
    media: dict[str, str] | None = {**common, "_sort": "-created", "_include": "Media:subject"}
    document: dict[str, str] | None = {**common, "_sort": "-date", "_include": "DocumentReference:subject",
                                       "contenttype": "image/png,image/jpeg,image/gif,image/bmp,image/tiff"}
    if modality == "photo":  # photographs kept as files, whatever their modality
        study = None
    elif modality:  # DICOM studies and Media (a retinal photograph is OP) have a modality; uploads do not
        study["modality"] = modality
        media["modality"] = modality
        document = None
    if eye in EYE_CODES:
        document = None  # uploads do not say which eye
        if media is not None:
            media["site"] = f"http://snomed.info/sct|{EYE_CODES[eye]}"
    return {"ImagingStudy": study, "Media": media, "DocumentReference": document}


@page
async def gallery(request: Request, session: Session, api: Api) -> tuple[str, dict]:
    query = dict(request.query_params)
    filters = _filters(query)
    searches = {t: s for t, s in _searches(filters).items() if s is not None}
    sites, *bundles = await gather(
        api.search("Organization", {"identifier": f"{SITE_SYSTEM}|", "_count": "200", "_sort": "name",
                                    "_elements": "name"}),
        *(api.search(t, s) for t, s in searches.items()))
    errors = [b.message for b in bundles if isinstance(b, ApiError)]
    found: dict[str, list[dict[str, Any]]] = {"ImagingStudy": [], "Media": [], "DocumentReference": []}
    names: dict[str, str] = {}
    totals = 0
    capped = False
    for kind, bundle in zip(searches, bundles, strict=True):
        if isinstance(bundle, ApiError):
            continue
        found[kind] = entries(bundle)
        totals += int(bundle.get("total", len(found[kind])) or 0)
        capped = capped or any(link.get("relation") == "next" for link in bundle.get("link", []))
        names |= {f"Patient/{p['id']}": fhir_text.human_name(p) for p in entries(bundle, "include")
                  if p.get("resourceType") == "Patient"}
    items = images(found["ImagingStudy"], found["Media"], found["DocumentReference"])
    if filters.get("eye"):
        items = [i for i in items if i.eye == filters["eye"]]
    return "gallery.html", {
        "title": "Imaging", "active": "imaging", "query": query, "filters": filters, "items": items, "names": names,
        "errors": errors, "capped": capped, "per_type": PER_TYPE,
        "sites": [] if isinstance(sites, ApiError) else entries(sites),
        "modalities": MODALITIES, "qualities": list(QUALITIES), "eyes": list(EYE_CODES),
        "status": 400 if errors and not items else 200,
    }


@page
async def viewer(request: Request, session: Session, api: Api) -> tuple[str, dict]:
    path = request.path_params["path"].strip("/")
    kind, _, rest = path.partition("/")
    context: dict[str, Any] = {"title": "Image", "active": "imaging", "kind": kind, "record": None, "patient": None,
                               "window": request.query_params.get("window", "")}
    if kind == "dicom" and rest.count("/") == 2:
        study_uid = rest.split("/")[0]
        study = await api.read(f"ImagingStudy/{study_uid}")
        context.update(record=study, image=f"{PREFIX}/images/dicom/{rest}",
                       title=study.get("description") or "DICOM image")
        subject = study.get("subject", {}).get("reference", "")
    elif kind == "binary" and rest and "/" not in rest:
        context.update(image=f"{PREFIX}/images/binary/{rest}", title="Photograph")
        record = request.query_params.get("record", "")
        subject = ""
        if RECORD.fullmatch(record):  # the Media or DocumentReference the gallery came from
            found = await api.read(record)
            context["record"] = found
            subject = found.get("subject", {}).get("reference", "")
            context["title"] = (found.get("content", {}).get("title") if isinstance(found.get("content"), dict)
                                else found.get("description")) or "Photograph"
    else:
        raise ApiError(404, "No such image.")
    if subject:
        with contextlib.suppress(ApiError):
            context["patient"] = await api.read(subject)
    return "viewer.html", context


# -- the pictures ---------------------------------------------------------------------------------


def _size(request: Request) -> int | None:
    text = request.query_params.get("size", "")
    return max(16, min(int(text), 2048)) if text.isdigit() else None


def _picture_error(status: int, message: str) -> Response:
    return Response(message, status, media_type="text/plain", headers={"Cache-Control": "no-store"})


async def _with_session(request: Request) -> Session | Response:
    try:
        return await current(request, renew=False)  # the page that shows the picture renewed the token
    except SignInNeeded:
        return _picture_error(401, "Not signed in, or the session expired: reload the page")


@router.get("/images/dicom/{study}/{series}/{instance}")
async def dicom_picture(request: Request, study: str, series: str, instance: str) -> Response:
    """One DICOM instance rendered by WADO-RS (`viewport` for a thumbnail, `window` passed on)."""
    session = await _with_session(request)
    if isinstance(session, Response):
        return session
    params = {}
    if (size := _size(request)) is not None:
        params["viewport"] = f"{size},{size}"
    if request.query_params.get("window"):
        params["window"] = request.query_params["window"]
    async with Api(request, session.token) as api:
        try:
            answer = await api.call("GET", f"/dicomweb/studies/{study}/series/{series}/instances/{instance}/rendered",
                                    params=params, headers={"Accept": "image/jpeg"})
        except ApiError as exc:
            return apply(_picture_error(exc.status, exc.message), request, session)
    if answer.status_code != 200:
        return apply(_picture_error(answer.status_code, answer.text[:500]), request, session)
    return apply(Response(answer.content, media_type=answer.headers.get("content-type", "image/jpeg"),
                          headers=IMAGE_HEADERS), request, session)


def _shrink(data: bytes, size: int | None) -> tuple[bytes, str]:
    """A photograph as a browser shows it: PNG or JPEG, at most `size` pixels a side."""
    from PIL import Image as Pillow

    with Pillow.open(io.BytesIO(data)) as picture:
        if picture.width * picture.height > MAX_PIXELS:
            raise ValueError("too large to show")
        if size is not None:
            picture.thumbnail((size, size))
        if picture.mode not in ("RGB", "L"):
            picture = picture.convert("RGB")
        out = io.BytesIO()
        picture.save(out, "JPEG", quality=85)
        return out.getvalue(), "image/jpeg"


@router.get("/images/binary/{binary_id}")
async def binary_picture(request: Request, binary_id: str) -> Response:
    """A photograph kept as a Binary: thumbnails (and types a browser cannot show, e.g. TIFF)
    converted with Pillow, off the event loop."""
    session = await _with_session(request)
    if isinstance(session, Response):
        return session
    async with Api(request, session.token) as api:
        try:
            binary = await api.read(f"Binary/{binary_id}")
        except ApiError as exc:
            return apply(_picture_error(exc.status, exc.message), request, session)
    try:
        data = base64.b64decode(binary.get("data", ""), validate=False)
    except ValueError:
        return apply(_picture_error(422, "The Binary holds no readable data"), request, session)
    kind, size = binary.get("contentType", ""), _size(request)
    if kind not in BROWSER_TYPES or size is not None:
        try:
            data, kind = await asyncio.to_thread(_shrink, data, size)
        except Exception as exc:  # noqa: BLE001 - any undecodable picture is a 422, never a crash
            return apply(_picture_error(422, f"This image cannot be shown: {exc}"), request, session)
    return apply(Response(data, media_type=kind, headers=IMAGE_HEADERS), request, session)


router.add_api_route("/imaging", gallery, methods=["GET"])
router.add_api_route("/imaging/view/{path:path}", viewer, methods=["GET"])
