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
) -> Accepted:
    """Check `path` (its SOP Instance UID `sop_instance_uid` and Study Instance UID `study`
    when given), move it into the store and schedule its indexing on `loop`; blocking, so never
    called on the loop itself. A refused file is left where it is (the caller's to drop)."""
    if not indexer.database_ok:
        return Accepted(OUT_OF_RESOURCES)  # FHIR cannot be told: the sender may try again later
    try:
        dataset = check_instance(path, sop_instance_uid)
        if study is not None and dataset.StudyInstanceUID != study:
            raise BadInstance(f"The instance belongs to study {dataset.StudyInstanceUID}, not {study}",
                              DOES_NOT_MATCH_SOP_CLASS)
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
