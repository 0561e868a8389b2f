"""STOW-RS: `POST /studies[/{study}]` (PS3.18 10.5), stored through the same path as C-STORE.

The `multipart/related; type="application/dicom"` body is parsed as it arrives (python-multipart,
off the event loop), each part written to its own file in the store's `incoming` folder; once
the body is complete, each file goes through `dicom_node.ingest.accept` (the C-STORE checks,
placing and indexing), and the response waits until FHIR has every stored instance, so the
ImagingStudy is up to date when the client reads it. A malformed or cut-off body stores nothing.
"""

import asyncio
import concurrent.futures
import contextlib
import errno
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from fastapi import APIRouter, Request
from pydicom import Dataset, dcmread
from pymongo.errors import ConnectionFailure
from pynetdicom.presentation import AllStoragePresentationContexts
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.responses import Response

from dicom_node.files import UID
from dicom_node.indexing import DicomIndexer
from dicom_node.ingest import accept
from dicom_node.statuses import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, PROCESSING_FAILURE, SUCCESS
from fhir_server.errors import BadRequest, FhirError, PayloadTooLarge, UnsupportedMediaType
from fhir_server.routes.dicomweb.common import check_uid, dicom_json, dicomweb_base

LOGGER = logging.getLogger(__name__)
router = APIRouter()
DICOM = "application/dicom"
MAX_STOW_BYTES = 4 << 30  # one request's body; its parts are on disk, never in memory
PARSE_CHUNK = 1 << 20  # body bytes handed to the parser's thread at a time
SOP_CLASS_NOT_SUPPORTED = 0x0122
STORAGE_CLASSES = frozenset(str(c.abstract_syntax) for c in AllStoragePresentationContexts)  # the C-STORE SCP's


class InsufficientStorage(FhirError):
    """507 (RFC 4918 11.5): the parts could not be written, the disk being full; the client
    may send them again later."""

    status, code = 507, "transient"


@dataclass
class _Part:
    path: Path
    content_type: str


class _PartFiles:
    """python-multipart callbacks that write each part's body to a file of its own, at most
    `max_parts` of them (each costs a file and, later, a parse: a body of empty parts would
    otherwise make millions)."""

    def __init__(self, folder: Path, default_type: str, max_parts: int) -> None:
        self.folder = folder
        self.default_type = default_type
        self.max_parts = max_parts
        self.parts: list[_Part] = []
        self.finished = False
        self._file: IO[bytes] | None = None
        self._headers: dict[str, str] = {}
        self._field = bytearray()
        self._value = bytearray()

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._begin,
            "on_header_field": lambda data, start, end: self._field.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._value.extend(data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._data,
            "on_part_end": self._end,
            "on_end": self._finish,
        }

    def _begin(self) -> None:
        if len(self.parts) >= self.max_parts:
            raise PayloadTooLarge(f"A STOW-RS request may hold at most {self.max_parts} parts: send the rest in another")
        self._headers = {}

    def _header_end(self) -> None:
        self._headers[self._field.decode("latin-1").strip().lower()] = self._value.decode("latin-1").strip()
        self._field.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        kind, _ = parse_options_header(self._headers.get("content-type", self.default_type))
        handle = tempfile.NamedTemporaryFile(dir=self.folder, prefix="stow-", suffix=".dcm", delete=False)  # noqa: SIM115 - closed at the part's end
        self._file = handle
        self.parts.append(_Part(Path(handle.name), kind.decode("latin-1").lower()))

    def _data(self, data: bytes, start: int, end: int) -> None:
        assert self._file is not None
        self._file.write(data[start:end])

    def _end(self) -> None:
        handle, self._file = self._file, None
        if handle is not None:
            handle.close()

    def _finish(self) -> None:
        self.finished = True

    def discard(self) -> None:
        """Drop every part written (the request failed as a whole), even when the disk is too
        full to close the last one."""
        with contextlib.suppress(OSError):
            self._end()
        for part in self.parts:
            part.path.unlink(missing_ok=True)
        self.parts = []


def _request_type(request: Request) -> tuple[bytes, str]:
    """The body's boundary and part media type: only DICOM files (PS3.18 10.5.1.1) are taken."""
    kind, params = parse_options_header(request.headers.get("content-type", ""))
    part_type = params.get(b"type", DICOM.encode()).decode("latin-1").strip().lower()
    if kind.decode("latin-1").lower() != "multipart/related" or part_type != DICOM:
        raise UnsupportedMediaType(f'STOW-RS takes multipart/related; type="{DICOM}" (DICOM files in parts)')
    boundary = params.get(b"boundary", b"")
    if not boundary or len(boundary) > 70:
        raise BadRequest("The multipart/related Content-Type has no valid boundary parameter")
    return boundary, part_type


async def _receive(request: Request, folder: Path, boundary: bytes, part_type: str, max_parts: int) -> list[_Part]:
    """Stream the body into part files; all of them or none (400, 413, 507 when the disk is full)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_STOW_BYTES:
        raise PayloadTooLarge(f"A STOW-RS request may hold at most {MAX_STOW_BYTES} bytes")
    files = _PartFiles(folder, part_type, max_parts)
    parser = MultipartParser(boundary, files.callbacks())
    pending, total = bytearray(), 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > MAX_STOW_BYTES:
                raise PayloadTooLarge(f"A STOW-RS request may hold at most {MAX_STOW_BYTES} bytes")
            pending += chunk
            if len(pending) >= PARSE_CHUNK:
                await asyncio.to_thread(parser.write, bytes(pending))
                pending.clear()
        if pending:
            await asyncio.to_thread(parser.write, bytes(pending))
        if not files.finished:
            raise BadRequest("The multipart body ends before its closing delimiter")
    except MultipartParseError as exc:
        await asyncio.to_thread(files.discard)
        raise BadRequest(f"The multipart body is malformed: {exc}") from exc
    except OSError as exc:
        await asyncio.to_thread(files.discard)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InsufficientStorage("The parts cannot be written: the server's disk is full") from exc
        raise
    except BaseException:
        await asyncio.to_thread(files.discard)
        raise
    if not files.parts:
        raise BadRequest("The multipart body holds no part")
    return files.parts


@dataclass
class _Outcome:
    sop_class: str
    sop_instance: str
    status: int
    study: str = ""
    series: str = ""
    indexed: concurrent.futures.Future[None] | None = None


def _valid_uid(value: object) -> str:
    text = str(value or "").strip()
    return text if len(text) <= 64 and UID.fullmatch(text) else ""


def _identify(path: Path) -> tuple[str, str]:
    """SOP Class and Instance UIDs of a part, as far as they can be read (refused parts are
    reported with them)."""
    try:
        ds = dcmread(path, force=True, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
        return _valid_uid(ds.get("SOPClassUID")), _valid_uid(ds.get("SOPInstanceUID"))
    except Exception:  # noqa: BLE001 - anything unreadable has no UIDs to report
        return "", ""


def _store_part(
    indexer: DicomIndexer, part: _Part, study: str | None, fsync: bool, loop: asyncio.AbstractEventLoop
) -> _Outcome:
    """One part through the C-STORE path (blocking: runs in a thread). Its file leaves
    `incoming` whatever happens: placed in the store, or removed (refused, an error, or the
    request cancelled while this thread runs)."""
    outcome = None
    try:
        outcome = _check_and_accept(indexer, part, study, fsync, loop)
        return outcome
    finally:
        if outcome is None or outcome.status != SUCCESS:
            with contextlib.suppress(OSError):
                part.path.unlink(missing_ok=True)


def _check_and_accept(
    indexer: DicomIndexer, part: _Part, study: str | None, fsync: bool, loop: asyncio.AbstractEventLoop
) -> _Outcome:
    """The STOW-RS checks, then the C-STORE path; the file is the caller's to remove unless stored."""
    if part.content_type != DICOM:
        LOGGER.warning("STOW-RS part refused: of type %r, not %s", part.content_type, DICOM)
        return _Outcome("", "", CANNOT_UNDERSTAND)
    sop_class, sop_instance = _identify(part.path)
    if sop_class and sop_class not in STORAGE_CLASSES:
        LOGGER.warning("STOW-RS instance refused: %s is not a storage SOP class", sop_class)
        return _Outcome(sop_class, sop_instance, SOP_CLASS_NOT_SUPPORTED)
    accepted = accept(indexer, part.path, None, fsync=fsync, loop=loop, study=study, check_meta=True)
    if accepted.status != SUCCESS or accepted.facts is None:
        return _Outcome(sop_class, sop_instance, accepted.status)  # logged by accept
    facts = accepted.facts
    return _Outcome(facts["instance"]["sopClass"], facts["instance"]["uid"], SUCCESS,
                    study=facts["study"]["uid"], series=facts["series"]["uid"], indexed=accepted.indexed)


async def _await_indexing(outcome: _Outcome) -> None:
    """A stored instance FHIR could not take is reported failed (it stays stored and marked,
    and is indexed on reconcile; sending it again is harmless)."""
    if outcome.indexed is None:
        return
    try:
        await asyncio.wrap_future(outcome.indexed)
    except ConnectionFailure:
        outcome.status = OUT_OF_RESOURCES
    except Exception:  # noqa: BLE001 - reported to the client, logged by the indexer
        outcome.status = PROCESSING_FAILURE


def _response(outcomes: list[_Outcome], base: str, study: str | None) -> Response:
    """PS3.18 10.5.3: 200 all stored, 202 some, 409 none."""
    stored = [o for o in outcomes if o.status == SUCCESS]
    failed = [o for o in outcomes if o.status != SUCCESS]
    body = Dataset()
    studies = {o.study for o in stored}
    if study is not None or len(studies) == 1:
        body.RetrieveURL = f"{base}/studies/{study or studies.pop()}"
    if failed:
        body.FailedSOPSequence = [_item(o.sop_class, o.sop_instance, FailureReason=o.status) for o in failed]
    if stored:
        body.ReferencedSOPSequence = [
            _item(o.sop_class, o.sop_instance,
                  RetrieveURL=f"{base}/studies/{o.study}/series/{o.series}/instances/{o.sop_instance}")
            for o in stored
        ]
    status = 200 if not failed else 202 if stored else 409
    return dicom_json(body.to_json_dict(), status)


def _item(sop_class: str, sop_instance: str, **more: Any) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    for keyword, value in more.items():
        setattr(item, keyword, value)
    return item


@router.post("/studies")
@router.post("/studies/{study}")
async def store_instances(request: Request, study: str | None = None) -> Response:
    if study is not None:
        check_uid(study, "Study Instance UID")
    boundary, part_type = _request_type(request)
    indexer: DicomIndexer = request.app.state.dicom
    settings = request.app.state.settings
    loop = asyncio.get_running_loop()
    parts = await _receive(request, indexer.files.incoming, boundary, part_type, settings.dicomweb_max_parts)
    outcomes: list[_Outcome] = []
    try:
        for part in parts:
            outcomes.append(await asyncio.to_thread(_store_part, indexer, part, study, settings.dicom_fsync, loop))
    finally:
        # Cancelled or failed midway: the parts after the one at hand (which its thread removes)
        for part in parts[len(outcomes) + 1:]:
            with contextlib.suppress(OSError):
                part.path.unlink(missing_ok=True)
    await asyncio.gather(*(_await_indexing(o) for o in outcomes))
    return _response(outcomes, dicomweb_base(request), study)
