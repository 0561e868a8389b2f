"""Accepting one received instance: the path shared by C-STORE (a pynetdicom thread) and
STOW-RS (the event loop, through `asyncio.to_thread`), so both check, store and index alike.

A received file is checked, placed in the file store (with its unindexed marker) and handed to
the indexer on the server's loop; the caller gets the status at once and a future that is done
when FHIR has the instance.
"""

import asyncio
import concurrent.futures
import errno
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import Dataset

from dicom_node.files import BadInstance, check_instance
from dicom_node.indexing import DicomIndexer
from dicom_node.statuses import (
    CANNOT_UNDERSTAND,
    DOES_NOT_MATCH_SOP_CLASS,
    OUT_OF_RESOURCES,
    PROCESSING_FAILURE,
    SUCCESS,
)
from mappings.dicom import instance_facts

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class Accepted:
    """What became of a received file: a DIMSE status, the instance's facts when it was
    stored, and the indexing future (None when it was not stored)."""

    status: int
    facts: dict[str, Any] | None = None
    indexed: concurrent.futures.Future[None] | None = None


def accept(
    indexer: DicomIndexer,
    path: Path,
    sop_instance_uid: str | None,
    *,
    fsync: bool,
    loop: asyncio.AbstractEventLoop,
    study: str | None = None,
    check_meta: bool = False,
) -> Accepted:
    """Check `path` (its SOP Instance UID `sop_instance_uid` and Study Instance UID `study`
    when given, its File Meta with `check_meta`), move it into the store and schedule its
    indexing on `loop`; blocking, so never called on the loop itself. A refused file is left
    where it is (the caller's to drop).

    `check_meta` is for files the sender wrote (STOW-RS): a C-STORE's File Meta is
    pynetdicom's, written from the request, so it names what the request does."""
    if not indexer.database_ok:
        return Accepted(OUT_OF_RESOURCES)  # FHIR cannot be told: the sender may try again later
    try:
        dataset = check_instance(path, sop_instance_uid)
        if study is not None and dataset.StudyInstanceUID != study:
            raise BadInstance(f"The instance belongs to study {dataset.StudyInstanceUID}, not {study}",
                              DOES_NOT_MATCH_SOP_CLASS)
        if check_meta:
            _check_file_meta(dataset)
        facts = instance_facts(dataset)
    except BadInstance as exc:
        LOGGER.warning("instance refused (0x%04X): %s", exc.status, exc)
        return Accepted(exc.status)
    except (ValueError, TypeError, AttributeError, KeyError, IndexError, ArithmeticError) as exc:
        # ValueError: the mapping's refusal; the others: attributes malformed past what the checks expect
        LOGGER.warning("instance refused: %s", exc)
        return Accepted(CANNOT_UNDERSTAND)
    try:
        indexer.files.place(path, dataset, fsync)
    except OSError as exc:
        LOGGER.error("instance not stored: %s", exc)
        return Accepted(OUT_OF_RESOURCES if exc.errno in (errno.ENOSPC, errno.EDQUOT) else PROCESSING_FAILURE)
    future = asyncio.run_coroutine_threadsafe(indexer.add(facts), loop)
    return Accepted(SUCCESS, facts, future)


def _check_file_meta(dataset: Dataset) -> None:
    """A PS3.10 file names its SOP Class and Instance in its File Meta (Media Storage SOP Class
    and Instance UIDs, Type 1, PS3.10 7.1): a file whose meta lacks them, or names another
    instance than its dataset, is refused (0xA900), since a reader may trust either."""
    meta = dataset.file_meta
    for meta_keyword, keyword in (("MediaStorageSOPClassUID", "SOPClassUID"),
                                  ("MediaStorageSOPInstanceUID", "SOPInstanceUID")):
        named, actual = str(meta.get(meta_keyword, "") or "").strip(), str(dataset[keyword].value).strip()
        if named != actual:
            raise BadInstance(f"The File Meta's {meta_keyword} {named or '(missing)'} is not the dataset's "
                              f"{keyword} {actual}", DOES_NOT_MATCH_SOP_CLASS)
