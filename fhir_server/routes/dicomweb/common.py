"""What the DICOMweb routes share: UIDs in paths, content negotiation, DICOM JSON responses,
absolute URLs and locating files in the DICOM node's store.

Errors are the server's `FhirError`s (an OperationOutcome body): PS3.18 leaves the payload of
an error response to the implementation.
"""

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from fastapi import Request
from python_multipart.multipart import parse_options_header
from starlette.responses import Response

from dicom_node.files import UID, FileStore
from fhir_server.context import base_url
from fhir_server.errors import BadRequest, NotAcceptable, NotFound

DICOM_JSON = "application/dicom+json"
JSON_TYPES = (DICOM_JSON, "application/json")


def check_uid(value: str, what: str = "UID") -> str:
    """A UID from a path (digits and dots, at most 64): nothing else ever reaches the file system."""
    if len(value) > 64 or not UID.fullmatch(value):
        raise BadRequest(f"{what} {value[:70]!r} is not a valid UID")
    return value


def dicomweb_base(request: Request) -> str:
    """This service's root as clients reach it (the ImagingStudy Endpoint's address)."""
    return base_url(request).removesuffix("/fhir") + "/dicomweb"


def store_of(request: Request) -> FileStore:
    return request.app.state.dicom.files


def dicom_json(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A DICOM JSON body (PS3.18 F.2), its media type without a charset parameter: some
    clients (dicomweb-client) compare it whole."""
    return Response(orjson.dumps(content), status, headers=headers, media_type=DICOM_JSON)


# -- content negotiation ----------------------------------------------------------------------


@dataclass(frozen=True)
class MediaRange:
    """One entry of an Accept header: `multipart/related; type="application/dicom"; q=0.5`."""

    type: str
    params: dict[str, str] = field(default_factory=dict)
    q: float = 1.0

    def matches(self, media_type: str) -> bool:
        return _matches(self.type, media_type)

    @property
    def part_type(self) -> str | None:
        return self.params.get("type")

    @property
    def transfer_syntax(self) -> str | None:
        return self.params.get("transfer-syntax")

    @property
    def specificity(self) -> int:
        """How closely the range names a type: `*/*` < `image/*` < `image/png` < with parameters
        (RFC 9110 12.5.1: the most specific range that matches a type gives its quality)."""
        kind, _, sub = self.type.partition("/")
        return (kind != "*") + (sub != "*") + len(self.params)

    def covers(self, media_type: str, params: dict[str, str]) -> bool:
        """The range matches `media_type` with `params`: every parameter it names, alike."""
        return self.matches(media_type) and all(params.get(k, "").lower() == v.lower() for k, v in self.params.items())


def _matches(pattern: str, media_type: str) -> bool:
    """`*/*`, `image/*` or an exact media type (case-insensitive)."""
    kind, _, sub = pattern.partition("/")
    want_kind, _, want_sub = media_type.partition("/")
    return (kind == "*" or kind == want_kind) and (sub == "*" or sub == want_sub)


def _media_range(text: str) -> MediaRange | None:
    kind, raw = parse_options_header(text)
    media_type = kind.decode("latin-1").strip().lower()
    if media_type.count("/") != 1:
        return None
    params = {k.decode("latin-1").lower(): v.decode("latin-1").strip() for k, v in raw.items()}
    try:
        q = float(params.pop("q", "1"))
    except ValueError:
        return None  # a malformed range is ignored, neither accepted nor refused
    return MediaRange(media_type, params, q) if 0 <= q <= 1 else None


def _ranges(request: Request) -> list[MediaRange]:
    """Every media range of the Accept header (or of the `accept` query parameter, PS3.18
    8.3.3.1), as given; `*/*` when there is none."""
    values = request.query_params.getlist("accept") or [request.headers.get("accept", "")]
    if not any(v.strip() for v in values):
        return [MediaRange("*/*")]
    return [r for value in values for item in value.split(",") if item.strip() if (r := _media_range(item)) is not None]


def accepted(request: Request) -> list[MediaRange]:
    """The media ranges the client accepts (q > 0), best first."""
    return sorted((r for r in _ranges(request) if r.q > 0), key=lambda r: -r.q)


def _refused(request: Request, media_type: str, params: dict[str, str], offered_by: MediaRange) -> bool:
    """A `q=0` range refuses what it covers (RFC 9110 12.5.1: `*/*, image/jpeg;q=0` is anything
    but JPEG), unless a more specific range than it offered the type."""
    return any(r.q == 0 and r.covers(media_type, params) and r.specificity >= offered_by.specificity
               for r in _ranges(request))


def negotiate(request: Request, offers: Sequence[str]) -> str:
    """The first of `offers` (single-part media types) the client accepts, or 406."""
    for media_range in accepted(request):
        for offer in offers:
            if media_range.matches(offer) and not _refused(request, offer, {}, media_range):
                return offer
    raise NotAcceptable(f"This resource is available as {', '.join(offers)}; the request accepts none of them")


def negotiate_multipart(
    request: Request, part_types: Sequence[str], fits: Callable[[MediaRange], bool] = lambda _: True
) -> MediaRange:
    """The best accepted `multipart/related` range whose `type` is one of `part_types` (the
    first when the client names none) and that `fits` (its transfer syntax, say); its `type`
    parameter is set to the part type chosen."""
    for media_range in accepted(request):
        if not media_range.matches("multipart/related"):
            continue
        wanted = (media_range.part_type or part_types[0]).lower()
        chosen = next((t for t in part_types if _matches(wanted, t)), None)
        if chosen is not None:
            candidate = MediaRange("multipart/related", {**media_range.params, "type": chosen}, media_range.q)
            if fits(candidate) and not _refused(request, candidate.type, candidate.params, media_range):
                return candidate
    offered = ", ".join(f'multipart/related; type="{t}"' for t in part_types)
    raise NotAcceptable(f"This resource is available as {offered}; the request accepts none of them")


# -- the file store ---------------------------------------------------------------------------


def study_files(store: FileStore, study: str) -> list[Path]:
    """The instances of a study, by series (blocking: call in a thread); 404 if none."""
    files = sorted((store.root / "store" / check_uid(study, "Study Instance UID")).glob("*/*.dcm"))
    if not files:
        raise NotFound(f"Study {study} is not known")
    return files


def series_files(store: FileStore, study: str, series: str) -> list[Path]:
    folder = store.root / "store" / check_uid(study, "Study Instance UID") / check_uid(series, "Series Instance UID")
    files = sorted(folder.glob("*.dcm"))
    if not files:
        raise NotFound(f"Series {series} of study {study} is not known")
    return files


def instance_file(store: FileStore, study: str, series: str, instance: str) -> Path:
    path = store.path_of(
        check_uid(study, "Study Instance UID"), check_uid(series, "Series Instance UID"),
        check_uid(instance, "SOP Instance UID"),
    )
    if not path.is_file():
        raise NotFound(f"Instance {instance} of series {series} of study {study} is not known")
    return path


def files_at(store: FileStore, study: str, series: str | None = None, instance: str | None = None) -> list[Path]:
    """The files a study, series or instance URL names."""
    if series is None:
        return study_files(store, study)
    if instance is None:
        return series_files(store, study, series)
    return [instance_file(store, study, series, instance)]


def uids_of(path: Path) -> tuple[str, str, str]:
    """(study, series, instance) of a stored file, from where it is stored."""
    return path.parent.parent.name, path.parent.name, path.stem


def instance_url(base: str, path: Path) -> str:
    study, series, instance = uids_of(path)
    return f"{base}/studies/{study}/series/{series}/instances/{instance}"


def multipart_header(boundary: str, headers: Iterable[tuple[str, str]]) -> bytes:
    """The delimiter and headers that open one part of a multipart/related body."""
    lines = [f"--{boundary}", *(f"{name}: {value}" for name, value in headers), "", ""]
    return "\r\n".join(lines).encode("latin-1")
