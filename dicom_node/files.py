"""The DICOM file store: instances as received, under `<data-dir>/dicom/`.

    store/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm   the instances
    incoming/     what pynetdicom receives (on the same file system, so placing is a rename)
    unindexed/    one marker per placed instance until FHIR has it (the reconcile pass reads them)

A received file is checked (parseable to its end, Pixel Data as long as the image needs, UIDs
present), then placed with a rename, after its marker is written: an instance is never in the
store without either being in FHIR or having a marker that says it is not yet.
"""

import contextlib
import mmap
import os
import re
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import DeflatedExplicitVRLittleEndian

from dicom_node.statuses import CANNOT_UNDERSTAND, DOES_NOT_MATCH_SOP_CLASS, OUT_OF_RESOURCES

UID = re.compile(r"[0-9]+(\.[0-9]+)*")
PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # Pixel Data, Float and Double Float Pixel Data
SPECTROSCOPY = 0x56000020  # Spectroscopy Data: MR Spectroscopy has Rows and Columns but no pixels
MAX_INFLATED = 1 << 30


class BadInstance(ValueError):
    """What was received is not a complete, storable instance."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _uid(ds: Dataset, keyword: str) -> str:
    value = str(ds.get(keyword, "") or "").strip()
    if not value or len(value) > 64 or not UID.fullmatch(value):
        raise BadInstance(f"{keyword} is missing or not a valid UID", DOES_NOT_MATCH_SOP_CLASS)
    return value


def _raw(ds: Dataset, tag: int) -> RawDataElement | None:
    """The element as read, its value not loaded when it was deferred."""
    if tag not in ds:
        return None
    element = ds.get_item(tag, keep_deferred=True)
    return element if isinstance(element, RawDataElement) else None


def _check_deflated(path: Path) -> None:
    """A deflated dataset inflates whole in memory when read: refuse one that would inflate
    beyond MAX_INFLATED (a small C-STORE could otherwise ask for gigabytes) or is cut short."""
    data = path.read_bytes()
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total, chunk = 0, data[dataset_offset(data):]
    try:
        while chunk:
            total += len(inflater.decompress(chunk, 1 << 20))
            if total > MAX_INFLATED:
                raise BadInstance(f"The deflated dataset inflates beyond {MAX_INFLATED} bytes", OUT_OF_RESOURCES)
            chunk = inflater.unconsumed_tail
    except zlib.error as exc:
        raise BadInstance(f"The deflated dataset cannot be inflated: {exc}", CANNOT_UNDERSTAND) from exc
    if not inflater.eof:
        raise BadInstance("The deflated dataset is cut short", CANNOT_UNDERSTAND)


def dataset_offset(data: bytes) -> int:
    """Where the dataset starts in a file the node wrote (`data`, its first 144 bytes at least):
    after the preamble, prefix and File Meta group (whose first element, the group length,
    gives its size). ValueError for another layout."""
    if data[128:132] != b"DICM" or data[132:138] != b"\x02\x00\x00\x00UL":
        raise ValueError("not a Part 10 file with a File Meta group length")
    return 144 + int.from_bytes(data[140:144], "little")


LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})


def meta_transfer_syntax(data: bytes | mmap.mmap) -> str | None:
    """The Transfer Syntax UID of a Part 10 file's File Meta group (`data`: the file, or its
    start), read element by element (explicit VR little endian, PS3.10 7.1): a few µs where
    pydicom takes a tenth of a millisecond. None when the group is not laid out so."""
    if data[128:132] != b"DICM":
        return None
    position = 132
    while position + 8 <= len(data):
        group, element = struct.unpack_from("<HH", data, position)
        if group != 0x0002:
            return None
        vr = data[position + 4:position + 6]
        if vr in LONG_VRS:
            if position + 12 > len(data):
                return None
            length, start = struct.unpack_from("<I", data, position + 8)[0], position + 12
        else:
            length, start = struct.unpack_from("<H", data, position + 6)[0], position + 8
        if element == 0x0010:
            value = bytes(data[start:start + length])
            uid = value.rstrip(b"\0 ").decode("ascii") if vr == b"UI" and value.isascii() else ""
            return uid if len(value) == length and UID.fullmatch(uid) else None
        position = start + length
    return None


def check_instance(path: Path, sop_instance_uid: str | None = None) -> Dataset:
    """The header of a received file (large values not loaded), or BadInstance."""
    size = path.stat().st_size
    try:
        deflated = read_file_meta_info(path).get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
        if deflated:
            _check_deflated(path)
        ds = dcmread(path, defer_size=1024)
        elements = list(ds.keys())  # parses every top-level element to the end of the file
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError, NotImplementedError,
            zlib.error, AttributeError) as exc:
        raise BadInstance(f"The dataset cannot be decoded: {exc}", CANNOT_UNDERSTAND) from exc
    for tag in elements if not deflated else ():  # deflated positions count inflated bytes
        raw = _raw(ds, tag)
        if raw is None or raw.length == 0xFFFFFFFF:
            continue
        # A deferred value must fit in the file; a value read (pydicom reads a short last value
        # without complaint) must be as long as declared.
        short = raw.value_tell + raw.length > size if raw.value is None else len(raw.value) < raw.length
        if short:
            raise BadInstance(f"Element {tag} is cut short: the dataset is truncated", CANNOT_UNDERSTAND)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        _uid(ds, keyword)
    if sop_instance_uid is not None and ds.SOPInstanceUID != sop_instance_uid:
        raise BadInstance("SOP Instance UID of the dataset differs from the request's", DOES_NOT_MATCH_SOP_CLASS)
    _check_pixels(ds)
    return ds


def _check_pixels(ds: Dataset) -> None:
    """An image's pixels are all there: native (uncompressed) Pixel Data at least as long as
    the image needs (pydicom's expected length: samples, bits, frames, YBR 4:2:2 subsampling);
    encapsulated data was parsed to its end."""
    if "Rows" not in ds or "Columns" not in ds or SPECTROSCOPY in ds:
        return
    pixels = next((t for t in PIXEL_TAGS if t in ds), None)
    if pixels is None:
        raise BadInstance("An image without Pixel Data", DOES_NOT_MATCH_SOP_CLASS)
    raw = _raw(ds, pixels)
    length = raw.length if raw is not None else len(ds[pixels].value or b"")
    if length == 0xFFFFFFFF or ds.file_meta.TransferSyntaxUID.is_compressed or pixels != 0x7FE00010:
        return
    try:
        needed = get_expected_length(ds, "bytes")
    except (AttributeError, TypeError, ValueError, KeyError) as exc:
        raise BadInstance(f"Image attributes cannot be read: {exc}", CANNOT_UNDERSTAND) from exc
    if length < needed:
        raise BadInstance(f"Pixel Data holds {length} bytes where the image needs {needed}", CANNOT_UNDERSTAND)


def _fsync_directory(folder: Path) -> None:
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


@dataclass(frozen=True)
class FileStore:
    root: Path  # <data-dir>/dicom

    @property
    def incoming(self) -> Path:
        return self.root / "incoming"

    @property
    def unindexed(self) -> Path:
        return self.root / "unindexed"

    def prepare(self) -> None:
        for folder in (self.root / "store", self.incoming, self.unindexed):
            folder.mkdir(parents=True, exist_ok=True)

    def path_of(self, study: str, series: str, instance: str) -> Path:
        """Where an instance lives (UIDs are digits and dots: no path can escape the store)."""
        return self.root / "store" / study / series / f"{instance}.dcm"

    def place(self, received: Path, ds: Dataset, fsync: bool) -> Path:
        """Move a checked file into the store (replacing an earlier copy), marked unindexed."""
        target = self.path_of(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        target.parent.mkdir(parents=True, exist_ok=True)
        marker = self.unindexed / ds.SOPInstanceUID
        with open(marker, "w") as handle:
            handle.write(str(target.relative_to(self.root)))
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        if fsync:
            _fsync_directory(self.unindexed)  # the marker is on disk before the file is placed
            with open(received, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(received, target)
        if fsync:
            _fsync_directory(target.parent)
        return target

    def sweep_incoming(self, older_than_s: float = 0.0) -> int:
        """Drop what was left half-received (a peer gone mid-dataset, a crash) and not modified
        for `older_than_s`: a younger file may be another process's receive in progress, on a
        data folder several processes share. Returns how many were removed."""
        removed = 0
        deadline = time.time() - older_than_s
        for leftover in self.incoming.iterdir():
            with contextlib.suppress(FileNotFoundError):  # placed or removed by its receiver meanwhile
                if leftover.is_file() and leftover.stat().st_mtime <= deadline:
                    leftover.unlink()
                    removed += 1
        return removed

    def indexed(self, sop_instance_uid: str, path: Path | None = None) -> None:
        """FHIR has the instance: its marker goes; with `path`, only while the marker names that
        file (the instance may have been placed again since, elsewhere: that copy is not
        indexed yet)."""
        marker = self.unindexed / sop_instance_uid
        if path is not None:
            try:
                named = self.root / marker.read_text().strip()
            except FileNotFoundError:
                return
            if named != path:
                return
        marker.unlink(missing_ok=True)

    def pending(self) -> list[tuple[str, Path]]:
        """(SOP Instance UID, file) of every instance placed but not yet indexed."""
        found = []
        for marker in self.unindexed.iterdir():
            found.append((marker.name, self.root / marker.read_text().strip()))
        return found

    def all_files(self) -> list[Path]:
        return sorted((self.root / "store").glob("*/*/*.dcm"))
