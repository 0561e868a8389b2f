"""The DICOM file store: instances as received, under `<data-dir>/dicom/`.

    store/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm   the instances
    incoming/     what pynetdicom receives (on the same file system, so placing is a rename)
    unindexed/    one marker per placed instance until FHIR has it (the reconcile pass reads them)

A received file is checked (parseable to its end, Pixel Data as long as the image needs, UIDs
present), then placed with a rename, after its marker is written: an instance is never in the
store without either being in FHIR or having a marker that says it is not yet.
"""

import os
import re
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError

UID = re.compile(r"[0-9]+(\.[0-9]+)*")
PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # Pixel Data, Float and Double Float Pixel Data


class BadInstance(ValueError):
    """What was received is not a complete, storable instance."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


CANNOT_UNDERSTAND = 0xC210
DOES_NOT_MATCH_SOP_CLASS = 0xA900


def _uid(ds: Dataset, keyword: str) -> str:
    value = str(ds.get(keyword, "") or "").strip()
    if not value or len(value) > 64 or not UID.fullmatch(value):
        raise BadInstance(f"{keyword} is missing or not a valid UID", DOES_NOT_MATCH_SOP_CLASS)
    return value


def _raw(ds: Dataset, tag: int) -> RawDataElement | None:
    if tag not in ds:
        return None
    element = ds.get_item(tag)
    return element if isinstance(element, RawDataElement) else None


def check_instance(path: Path, sop_instance_uid: str | None = None) -> Dataset:
    """The header of a received file (large values not loaded), or BadInstance."""
    size = path.stat().st_size
    try:
        ds = dcmread(path, defer_size=1024)
        elements = list(ds.keys())  # parses every top-level element to the end of the file
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError, NotImplementedError) as exc:
        raise BadInstance(f"The dataset cannot be decoded: {exc}", CANNOT_UNDERSTAND) from exc
    for tag in elements:
        raw = _raw(ds, tag)
        if raw is not None and raw.value is None and raw.length != 0xFFFFFFFF and raw.value_tell + raw.length > size:
            raise BadInstance(f"Element {tag} is cut short: the dataset is truncated", CANNOT_UNDERSTAND)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        _uid(ds, keyword)
    if sop_instance_uid is not None and ds.SOPInstanceUID != sop_instance_uid:
        raise BadInstance("SOP Instance UID of the dataset differs from the request's", DOES_NOT_MATCH_SOP_CLASS)
    _check_pixels(ds, size)
    return ds


def _check_pixels(ds: Dataset, size: int) -> None:
    """An image's pixels are all there: for native (uncompressed) data, at least
    Rows × Columns × Samples × Bits Allocated × Frames; encapsulated data was parsed whole."""
    if "Rows" not in ds or "Columns" not in ds:
        return
    pixels = next((t for t in PIXEL_TAGS if t in ds), None)
    if pixels is None:
        raise BadInstance("An image without Pixel Data", DOES_NOT_MATCH_SOP_CLASS)
    raw = _raw(ds, pixels)
    length = raw.length if raw is not None else len(ds[pixels].value or b"")
    if length == 0xFFFFFFFF or ds.file_meta.TransferSyntaxUID.is_compressed:
        return
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.get("BitsAllocated", 8) or 8)
        needed = (int(ds.Rows) * int(ds.Columns) * samples * frames * bits + 7) // 8
    except (TypeError, ValueError) as exc:
        raise BadInstance(f"Image attributes cannot be read: {exc}", CANNOT_UNDERSTAND) from exc
    if length < needed:
        raise BadInstance(f"Pixel Data holds {length} bytes where the image needs {needed}", CANNOT_UNDERSTAND)


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
        marker.write_text(str(target.relative_to(self.root)))
        if fsync:
            with open(received, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(received, target)
        if fsync:
            directory = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        return target

    def indexed(self, sop_instance_uid: str) -> None:
        (self.unindexed / sop_instance_uid).unlink(missing_ok=True)

    def pending(self) -> list[tuple[str, Path]]:
        """(SOP Instance UID, file) of every instance placed but not yet indexed."""
        found = []
        for marker in self.unindexed.iterdir():
            found.append((marker.name, self.root / marker.read_text().strip()))
        return found

    def all_files(self) -> list[Path]:
        return sorted((self.root / "store").glob("*/*/*.dcm"))
