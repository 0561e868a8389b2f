"""C-FIND SCP: Patient Root and Study Root Query/Retrieve Information Model - FIND, answered from
the catalog at the PATIENT, STUDY, SERIES and IMAGE levels.

pynetdicom calls the handler in the association's thread, which reads the catalog itself (its
synchronous reader): matches are sent one pending response each as the database's cursor gives
them; a C-CANCEL, looked for between matches, ends the answer with the Cancel status (and closes
the cursor). An identifier that cannot be decoded or is no valid query gets a failure status,
and the association goes on.
"""

import logging
from collections.abc import Generator, Iterator
from typing import Any

from bson.errors import BSONError
from pydicom import Dataset
from pymongo.errors import PyMongoError
from pynetdicom import evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from dicom_node import encoding
from dicom_node.catalog import Catalog
from dicom_node.statuses import (
    CANCEL,
    IDENTIFIER_DOES_NOT_MATCH,
    OUT_OF_RESOURCES,
    PENDING,
    UNABLE_TO_PROCESS,
)

LOGGER = logging.getLogger(__name__)
# Query/retrieve identifiers are small: the uncompressed syntaxes and deflate.
QR_TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian
]
# The information model of each SOP class: the root its hierarchy starts at.
FIND_MODELS = {
    str(PatientRootQueryRetrieveInformationModelFind): "PATIENT",
    str(StudyRootQueryRetrieveInformationModelFind): "STUDY",
}


def query_level(identifier: Dataset, root: str) -> str:
    """The identifier's QueryRetrieveLevel, checked against the model; ValueError if invalid."""
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    if not level:
        raise ValueError("the identifier has no QueryRetrieveLevel")
    if level not in ("PATIENT", "STUDY", "SERIES", "IMAGE"):
        raise ValueError(f"QueryRetrieveLevel '{level}' is not PATIENT, STUDY, SERIES or IMAGE")
    if root == "STUDY" and level == "PATIENT":
        raise ValueError("the Study Root model has no PATIENT level")
    return level


def decoded(event: evt.Event) -> Dataset:
    """The request's identifier, every element decoded (ValueError if one cannot be)."""
    try:
        identifier: Dataset = event.identifier
        for _ in identifier:  # pydicom decodes elements when first read
            pass
    except Exception as exc:  # noqa: BLE001 - whatever pydicom raises on a garbled identifier
        raise ValueError(f"the identifier cannot be decoded: {exc}") from exc
    return identifier


class FindService:
    """The EVT_C_FIND handler over the catalog."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        encoding.install()  # matches and command sets are encoded in one pass (dicom_node/encoding.py)

    def handle(self, event: evt.Event) -> Iterator[tuple[int, Dataset | encoding.EncodedIdentifier | None]]:
        root = FIND_MODELS.get(str(event.request.AffectedSOPClassUID), "STUDY")
        try:
            identifier = decoded(event)
        except ValueError as exc:
            LOGGER.warning("C-FIND refused (0x%04X): %s", UNABLE_TO_PROCESS, exc)
            yield UNABLE_TO_PROCESS, None
            return
        matches: Generator[dict[str, Any], None, None] | None = None
        try:
            level = query_level(identifier, root)
            matches = self.catalog.find_json(level, identifier, root=root)
            syntax = str(event.context.transfer_syntax)
            for response in matches:
                if event.is_cancelled:
                    yield CANCEL, None
                    return
                yield PENDING, encoding.identifier(response, syntax)
        except ValueError as exc:
            LOGGER.warning("C-FIND refused (0x%04X): %s", IDENTIFIER_DOES_NOT_MATCH, exc)
            yield IDENTIFIER_DOES_NOT_MATCH, None
        except (PyMongoError, BSONError) as exc:  # BSONError: a query larger than a database document
            LOGGER.error("C-FIND failed, database error: %s", exc)
            yield OUT_OF_RESOURCES, None
        except Exception:  # noqa: BLE001 - the peer gets a failure status, the node goes on
            LOGGER.exception("C-FIND failed")
            yield UNABLE_TO_PROCESS, None
        finally:
            if matches is not None:
                matches.close()  # its cursor, when the answer was cancelled or failed
