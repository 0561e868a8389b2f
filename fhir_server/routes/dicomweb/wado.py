"""WADO-RS: studies, series, instances, metadata, rendered images, frames and bulk data
(PS3.18 10.4), streamed from the file store.

Instances go out as stored, byte for byte: a multipart/related body of the files as they were
when the request came, each mapped in memory and handed to the server whole: it is sent from
the page cache (no study is read into the process, no copy made on the way), with its length
known up front (no chunked encoding). They are never transcoded: without a
`transfer-syntax` parameter (or with `*`) each file goes in its own syntax, named in its part's
Content-Type; a request for one named syntax that some file is not in gets 406.
"""

import asyncio
import errno
import logging
import mmap
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import orjson
from fastapi import APIRouter, Request
from pydicom import DataElement, Dataset, dcmread
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_partial
from pydicom.hooks import hooks
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import DeflatedExplicitVRLittleEndian
from starlette.responses import Response, StreamingResponse

from dicom_node.files import PIXEL_TAGS, meta_transfer_syntax
from fhir_server.errors import BadRequest, NotAcceptable, NotFound, Unavailable
from fhir_server.routes.dicomweb import pixels
from fhir_server.routes.dicomweb.common import (
    DICOM_JSON,
    JSON_TYPES,
    dicomweb_base,
    files_at,
    instance_file,
    instance_url,
    multipart_header,
    negotiate,
    negotiate_multipart,
    store_of,
)

LOGGER = logging.getLogger(__name__)
router = APIRouter()
DICOM = "application/dicom"
OCTETS = "application/octet-stream"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
CHUNK = 1 << 20
BULK_THRESHOLD = 1024  # binary values longer than this go by BulkDataURI, shorter ones inline
DEFER_SIZE = BULK_THRESHOLD  # values longer than this stay in the file when it is parsed
BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN", "OB or OW", "US or OW", "US or SS or OW"})
MAX_FRAMES = 10_000
RETRY_AFTER_S = 5


def _multipart(parts: AsyncIterator[bytes | memoryview], part_type: str, boundary: str) -> StreamingResponse:
    return StreamingResponse(parts, media_type=f'multipart/related; type="{part_type}"; boundary={boundary}')


@dataclass
class _Stored:
    """A stored file as it was when the request came: its content mapped (what a later store or
    deletion of the instance leaves alone: a file is only ever replaced or removed whole), so
    that the body's length is known before it is sent and its parts are sent from the page
    cache with no copy made here."""

    syntax: str
    content: mmap.mmap | bytes


def _stored(path: Path) -> _Stored | None:
    """The file's transfer syntax and content; None when it is gone. Unavailable (503) when the
    process can map or open no more files for now: each retrieval in progress holds a mapping
    per file, and the kernel allows some 65,000 a process (`vm.max_map_count`)."""
    try:
        with open(path, "rb") as handle:
            if not os.fstat(handle.fileno()).st_size:
                return _Stored(_syntax(handle, b""), b"")
            content = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            return _Stored(_syntax(handle, content), content)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno not in (errno.ENOMEM, errno.EMFILE, errno.ENFILE):
            raise
        LOGGER.warning("WADO-RS: %s not mapped (%s); the request is answered 503", path.name, exc.strerror)
        raise Unavailable("The server cannot open more files for now; try again shortly",
                          headers={"Retry-After": str(RETRY_AFTER_S)}) from exc


def _syntax(handle: BinaryIO, content: mmap.mmap | bytes) -> str:
    """The file's transfer syntax, from its File Meta group; "" when it has none to read."""
    syntax = meta_transfer_syntax(content)
    if syntax is not None:
        return syntax
    try:  # a layout the node does not write itself: pydicom's reading
        return str(read_partial(handle, stop_when=lambda *_: True).file_meta.get("TransferSyntaxUID", "") or "")
    except (OSError, ValueError, EOFError, InvalidDicomError) as exc:
        LOGGER.warning("unreadable file meta of %s: %s", handle.name, exc)
        return ""


def _read_ahead(stored: _Stored) -> None:
    """Start reading the file into the page cache (asynchronously), so that sending it from the
    event loop does not wait on the disk."""
    if isinstance(stored.content, mmap.mmap):
        stored.content.madvise(mmap.MADV_WILLNEED)


async def _files(request: Request, study: str, series: str | None, instance: str | None) -> list[Path]:
    return await asyncio.to_thread(files_at, store_of(request), study, series, instance)


# -- instances --------------------------------------------------------------------------------


def _part_header(boundary: str, stored: _Stored) -> bytes:
    content_type = f"{DICOM}; transfer-syntax={stored.syntax}" if stored.syntax else DICOM
    return multipart_header(boundary, [("Content-Type", content_type), ("Content-Length", str(len(stored.content)))])


async def _instances(parts: list[tuple[bytes, _Stored]], closing: bytes) -> AsyncIterator[bytes | memoryview]:
    """Each file in a part of its own (after its header), handed to the server whole (it sends
    as the client reads), the next one read ahead meanwhile."""
    if parts:
        _read_ahead(parts[0][1])
    for i, (header, stored) in enumerate(parts):
        if i + 1 < len(parts):
            _read_ahead(parts[i + 1][1])
        yield header
        yield memoryview(stored.content)
        yield b"\r\n"
    yield closing


async def _retrieve(request: Request, study: str, series: str | None = None, instance: str | None = None) -> Response:
    negotiate_multipart(request, [DICOM])  # 406 before looking at files when nothing could do
    paths = await _files(request, study, series, instance)
    files = [f for f in await asyncio.to_thread(lambda: [_stored(p) for p in paths]) if f is not None]  # gone meanwhile: left out
    stored = {f.syntax for f in files}
    try:
        negotiate_multipart(request, [DICOM], lambda r: r.transfer_syntax in (None, "*") or stored == {r.transfer_syntax})
    except NotAcceptable:
        raise NotAcceptable(f"Instances are sent as stored (never transcoded), here in {', '.join(sorted(stored))}: "
                            "not a transfer syntax the request accepts (transfer-syntax=* takes any)") from None
    boundary = uuid.uuid4().hex
    parts, closing = [(_part_header(boundary, f), f) for f in files], f"--{boundary}--\r\n".encode()
    length = sum(len(header) + len(f.content) + 2 for header, f in parts) + len(closing)
    response = _multipart(_instances(parts, closing), DICOM, boundary)
    response.headers["Content-Length"] = str(length)
    return response


@router.get("/studies/{study}")
async def retrieve_study(request: Request, study: str) -> Response:
    return await _retrieve(request, study)


@router.get("/studies/{study}/series/{series}")
async def retrieve_series(request: Request, study: str, series: str) -> Response:
    return await _retrieve(request, study, series)


@router.get("/studies/{study}/series/{series}/instances/{instance}")
async def retrieve_instance(request: Request, study: str, series: str, instance: str) -> Response:
    return await _retrieve(request, study, series, instance)


# -- metadata ---------------------------------------------------------------------------------


def _bulk_paths(ds: Dataset, prefix: str, found: dict[int, str]) -> None:
    """Where each binary value sits in the dataset (`tag[/item/tag...]`), for its BulkDataURI."""
    for element in ds:
        path = f"{prefix}{element.tag:08X}"
        if element.VR == "SQ":
            for index, item in enumerate(element.value):
                _bulk_paths(item, f"{path}/{index}/", found)
        elif element.VR in BULK_VRS:
            found[id(element)] = path


def _element_json(element: DataElement, handler: Callable[[DataElement], str]) -> dict[str, Any] | None:
    try:
        return element.to_json_dict(handler, BULK_THRESHOLD)
    except Exception as exc:  # noqa: BLE001 - one malformed value must not cost the others
        LOGGER.info("element %s left out of the metadata: %s", element.tag, exc)
        return None


def _deferred(ds: Dataset, tag: int) -> RawDataElement | None:
    """The element as read when its value was left in the file (longer than DEFER_SIZE)."""
    raw = ds.get_item(tag, keep_deferred=True)
    return raw if isinstance(raw, RawDataElement) and raw.value is None and raw.length else None


def _raw_vr(ds: Dataset, raw: RawDataElement) -> str:
    """The VR pydicom will give an element, found without reading its value (an implicit VR
    file's from the dictionary); an ambiguous one (`OB or OW`) is only settled by reading it."""
    found: dict[str, Any] = {}
    try:
        hooks.raw_element_vr(raw, found, ds=ds)
    except (KeyError, ValueError) as exc:  # no VR to be had: the value is read as any other
        LOGGER.info("no VR for element %s: %s", raw.tag, exc)
        return ""
    return str(found["VR"])


def _top_level_json(ds: Dataset, tag: int, url: str) -> dict[str, Any] | None:
    """One top-level element as DICOM JSON: a binary value left in the file becomes its
    BulkDataURI unread; anything else is read (a sequence with its items)."""
    raw = _deferred(ds, tag)
    if raw is not None and (vr := _raw_vr(ds, raw)) in BULK_VRS and " " not in vr:
        return {"vr": vr, "BulkDataURI": f"{url}/bulkdata/{tag:08X}"}
    try:
        element = ds[tag]
    except Exception as exc:  # noqa: BLE001 - one malformed value must not cost the others
        LOGGER.info("element %08X left out of the metadata: %s", tag, exc)
        return None
    paths: dict[int, str] = {}
    if element.VR == "SQ":
        for index, item in enumerate(element.value):
            _bulk_paths(item, f"{tag:08X}/{index}/", paths)

    def handler(bulk: DataElement) -> str:
        return f"{url}/bulkdata/{paths.get(id(bulk), f'{bulk.tag:08X}')}"

    return _element_json(element, handler)


def instance_metadata(path: Path, base: str) -> dict[str, Any] | None:
    """One instance as DICOM JSON, without its pixels, large binary values as BulkDataURIs.
    Values longer than DEFER_SIZE are left in the file when it is parsed: a top-level binary
    one is never read (those in sequences are, with their sequence)."""
    url = instance_url(base, path)
    try:
        with open(path, "rb") as handle:
            ds = dcmread(handle, stop_before_pixels=True, defer_size=DEFER_SIZE)
            out = {}
            for tag in list(ds.keys()):
                if tag in PIXEL_TAGS:
                    continue
                encoded = _top_level_json(ds, tag, url)
                if encoded is not None:
                    out[f"{tag:08X}"] = encoded
            return out
    except Exception as exc:  # noqa: BLE001 - a file that cannot be read is left out, not a 500
        LOGGER.warning("cannot read %s for its metadata: %s", path, exc)
        return None


async def _metadata_items(files: list[Path], base: str) -> AsyncIterator[bytes]:
    yield b"["
    first = True
    for path in files:
        item = await asyncio.to_thread(instance_metadata, path, base)
        if item is None:
            continue
        yield (b"" if first else b",") + orjson.dumps(item)
        first = False
    yield b"]"


async def _metadata(request: Request, study: str, series: str | None = None, instance: str | None = None) -> Response:
    negotiate(request, JSON_TYPES)
    files = await _files(request, study, series, instance)
    return StreamingResponse(_metadata_items(files, dicomweb_base(request)), media_type=DICOM_JSON)


@router.get("/studies/{study}/metadata")
async def study_metadata(request: Request, study: str) -> Response:
    return await _metadata(request, study)


@router.get("/studies/{study}/series/{series}/metadata")
async def series_metadata(request: Request, study: str, series: str) -> Response:
    return await _metadata(request, study, series)


@router.get("/studies/{study}/series/{series}/instances/{instance}/metadata")
async def instance_metadata_route(request: Request, study: str, series: str, instance: str) -> Response:
    return await _metadata(request, study, series, instance)


# -- bulk data --------------------------------------------------------------------------------


@dataclass
class _Bulk:
    """A bulk data value to send: `length` bytes at `start` in the open file, read a chunk at a
    time, or `data` when it was read with its dataset (in a sequence, short, or deflated)."""

    handle: BinaryIO
    start: int
    length: int
    data: bytes | None = None

    def read(self, offset: int, size: int) -> bytes:
        self.handle.seek(self.start + offset)
        chunk = self.handle.read(size)
        if len(chunk) != size:  # checked when stored: the file was cut since
            raise OSError(f"bulk data of {self.handle.name} is cut short")
        return chunk


def _bulk_steps(steps: list[str]) -> tuple[list[int], list[int]]:
    """`tag[/item/tag...]` → (tags, item indexes), or 400."""
    if len(steps) % 2 == 0:
        raise BadRequest("A bulk data path is tag[/item/tag...]")
    try:
        tags = [int(step, 16) for step in steps[0::2]]
        items = [int(step) for step in steps[1::2]]
    except ValueError:
        raise BadRequest("A bulk data path is tag[/item/tag...] (tags as 8 hex digits)") from None
    if tags[-1] in PIXEL_TAGS:
        raise NotFound("Pixel data is served as frames (…/frames/1,2,…) or with the instance")
    return tags, items


def _bulk_value(path: Path, steps: list[str]) -> _Bulk:
    """The value at `tag[/item/tag...]` (as the metadata's BulkDataURIs name it), from the file
    opened here (blocking); the caller closes it."""
    tags, items = _bulk_steps(steps)
    handle = open(path, "rb")  # noqa: SIM115 - _Bulk owns it, closed by the caller
    try:
        ds = dcmread(handle, stop_before_pixels=True, defer_size=DEFER_SIZE)
        raw = _deferred(ds, tags[0]) if len(tags) == 1 and tags[0] in ds else None
        deflated = ds.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
        if raw is not None and not deflated and _raw_vr(ds, raw) in BULK_VRS:
            return _Bulk(handle, raw.value_tell, raw.length)
        data = _loaded_value(ds, tags, items)
        return _Bulk(handle, 0, len(data), data)
    except BaseException:
        handle.close()
        raise


def _loaded_value(ds: Dataset, tags: list[int], items: list[int]) -> bytes:
    """A binary value read with its dataset, found through its sequences' items."""
    current: Any = ds
    for depth, tag in enumerate(tags):
        if not isinstance(current, Dataset) or tag not in current:
            raise NotFound("No such bulk data element")
        try:
            value = current[tag].value
        except (ValueError, TypeError, KeyError) as exc:  # a malformed value is no bulk data
            raise NotFound(f"The element holds no readable value ({exc})") from exc
        if depth < len(items):
            if not isinstance(value, DicomSequence) or not 0 <= items[depth] < len(value):
                raise NotFound("No such bulk data element")
            current = value[items[depth]]
        else:
            current = value
    if not isinstance(current, bytes):
        raise NotFound("The element holds no binary value")
    return current


async def _bulk_part(bulk: _Bulk, boundary: str) -> AsyncIterator[bytes]:
    """The value in one part, read from the file a chunk at a time as the body is sent."""
    try:
        yield multipart_header(boundary, [("Content-Type", OCTETS), ("Content-Length", str(bulk.length))])
        if bulk.data is not None:
            yield bulk.data
        else:
            for offset in range(0, bulk.length, CHUNK):
                yield await asyncio.to_thread(bulk.read, offset, min(CHUNK, bulk.length - offset))
        yield f"\r\n--{boundary}--\r\n".encode()
    finally:
        bulk.handle.close()


@router.get("/studies/{study}/series/{series}/instances/{instance}/bulkdata/{bulk_path:path}")
async def retrieve_bulkdata(request: Request, study: str, series: str, instance: str, bulk_path: str) -> Response:
    negotiate_multipart(request, [OCTETS])
    path = await asyncio.to_thread(instance_file, store_of(request), study, series, instance)
    bulk = await asyncio.to_thread(_bulk_value, path, bulk_path.strip("/").split("/"))
    boundary = uuid.uuid4().hex
    return _multipart(_bulk_part(bulk, boundary), OCTETS, boundary)


# -- frames -----------------------------------------------------------------------------------


def _frame_numbers(text: str) -> list[int]:
    """A frame list, each frame at most once: a repeated one would let a short URL ask for the
    same frame thousands of times over."""
    numbers = [p.strip() for p in text.split(",")]
    if not numbers or len(numbers) > MAX_FRAMES or not all(n.isdigit() and len(n) <= 9 for n in numbers):
        raise BadRequest("Frames are listed as 1-based numbers separated by commas")
    found = [int(n) for n in numbers]
    if len(set(found)) != len(found):
        raise BadRequest("A frame is listed more than once")
    return found


async def _frames(frames: pixels.Frames, boundary: str) -> AsyncIterator[bytes]:
    """Each frame in a part, read from the file a chunk at a time as the body is sent."""
    content_type = f"{OCTETS}; transfer-syntax={EXPLICIT_LE}"
    try:
        for number in frames.numbers:
            yield multipart_header(boundary, [("Content-Type", content_type), ("Content-Length", str(frames.length))])
            for offset in range(0, frames.length, CHUNK):
                yield await asyncio.to_thread(frames.read, number, offset, min(CHUNK, frames.length - offset))
            yield b"\r\n"
        yield f"--{boundary}--\r\n".encode()
    finally:
        frames.close()


@router.get("/studies/{study}/series/{series}/instances/{instance}/frames/{frame_list}")
async def retrieve_frames(request: Request, study: str, series: str, instance: str, frame_list: str) -> Response:
    """Uncompressed frames as application/octet-stream (little endian, PS3.18 8.7.3.3.2)."""
    negotiate_multipart(request, [OCTETS], lambda r: r.transfer_syntax in (None, "*", EXPLICIT_LE))
    numbers = _frame_numbers(frame_list)
    path = await asyncio.to_thread(instance_file, store_of(request), study, series, instance)
    frames = await asyncio.to_thread(pixels.native_frames, path, numbers)
    boundary = uuid.uuid4().hex
    return _multipart(_frames(frames, boundary), OCTETS, boundary)


# -- rendered ---------------------------------------------------------------------------------

IMAGE_TYPES = list(pixels.FORMATS)


def _render_call(request: Request, media_type: str) -> Callable[[Path, int], Awaitable[bytes]]:
    options = pixels.render_options(media_type, dict(request.query_params))

    async def call(path: Path, index: int) -> bytes:
        return await asyncio.to_thread(pixels.render, path, index, options)

    return call


def _image_type(request: Request) -> str:
    """A single image's media type: image/jpeg unless PNG is preferred."""
    return negotiate(request, IMAGE_TYPES)


@router.get("/studies/{study}/series/{series}/instances/{instance}/rendered")
async def render_instance(request: Request, study: str, series: str, instance: str) -> Response:
    """The instance as one image (a multi-frame instance: its first frame)."""
    media_type = _image_type(request)
    render = _render_call(request, media_type)
    path = await asyncio.to_thread(instance_file, store_of(request), study, series, instance)
    return Response(await render(path, 0), media_type=media_type)


@router.get("/studies/{study}/series/{series}/instances/{instance}/frames/{frame_list}/rendered")
async def render_frame(request: Request, study: str, series: str, instance: str, frame_list: str) -> Response:
    numbers = _frame_numbers(frame_list)
    if len(numbers) != 1:
        raise BadRequest("One frame at a time is rendered")
    media_type = _image_type(request)
    render = _render_call(request, media_type)
    path = await asyncio.to_thread(instance_file, store_of(request), study, series, instance)
    return Response(await render(path, numbers[0] - 1), media_type=media_type)


def _renderable(files: list[Path]) -> list[Path]:
    """The image instances (by header) among `files`."""
    found = []
    for path in files:
        try:
            if pixels.is_image(pixels.header(path)):
                found.append(path)
        except Exception as exc:  # noqa: BLE001 - an unreadable file is not an image to render
            LOGGER.info("not rendering %s: %s", path, exc)
    return found


async def _rendered_parts(
    files: list[Path], render: Callable[[Path, int], Awaitable[bytes]], media_type: str, boundary: str
) -> AsyncIterator[bytes]:
    """One image per instance, rendered as the body is sent; one that cannot be is left out."""
    for path in files:
        try:
            image = await render(path, 0)
        except (NotAcceptable, NotFound) as exc:
            LOGGER.info("not rendering %s: %s", path, exc)
            continue
        yield multipart_header(boundary, [("Content-Type", media_type), ("Content-Length", str(len(image)))])
        yield image
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


async def _render_many(request: Request, study: str, series: str | None = None) -> Response:
    """A study's or series' images, each instance's (first frame) in a part. A plain
    `image/jpeg` or `image/png` Accept is taken as the parts' type."""
    try:
        media_type = str(negotiate_multipart(request, IMAGE_TYPES).part_type)
    except NotAcceptable:
        media_type = _image_type(request)
    render = _render_call(request, media_type)
    files = await asyncio.to_thread(_renderable, await _files(request, study, series, None))
    if not files:
        raise NotAcceptable("No instance here is an image: there is nothing to render")
    boundary = uuid.uuid4().hex
    return _multipart(_rendered_parts(files, render, media_type, boundary), media_type, boundary)


@router.get("/studies/{study}/rendered")
async def render_study(request: Request, study: str) -> Response:
    return await _render_many(request, study)


@router.get("/studies/{study}/series/{series}/rendered")
async def render_series(request: Request, study: str, series: str) -> Response:
    return await _render_many(request, study, series)

