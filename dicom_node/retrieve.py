"""C-MOVE and C-GET SCP: Patient Root and Study Root Query/Retrieve Information Model - MOVE and
GET, at the PATIENT, STUDY, SERIES and IMAGE levels.

The identifier's unique keys select instances in the catalog; each becomes one C-STORE
sub-operation: for C-MOVE to a known destination (`FHIR_DICOM_DESTINATIONS`, `AET=host:port`,
or `AET=tls://host:port` for one that speaks TLS) on a new association, made by
`dicom_node/store_scu.py`; for C-GET back to the requestor on its own association. pynetdicom
runs the sub-operations, counts them (remaining, completed, failed, warning) and gives the
final status (0xB000 when some failed, 0xA702 when all did, PS3.4 C.4.2.3 and C.4.3.3).

Files are sent as stored: no transcoding. pynetdicom's handlers must yield Datasets, which it
encodes again; the node yields a `StoredInstance` (a Dataset naming the file), whose bytes are
sent streamed from disk, in a presentation context of the file's own transfer syntax: by
store_scu for C-MOVE, by pynetdicom's `send_c_store` for C-GET (`STORE_SEND_CHUNKED_DATASET`,
for those sends only). A peer that accepted none fails that sub-operation, with a log line
saying so.
"""

import contextlib
import copy
import logging
import ssl
import threading
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from bson.errors import BSONError
from pydicom import Dataset
from pydicom.uid import ImplicitVRLittleEndian
from pymongo.errors import PyMongoError
from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from dicom_node import store_scu
from dicom_node.catalog import Catalog, InstanceRef
from dicom_node.query import FIND_MODELS, QR_TRANSFER_SYNTAXES, FindService, decoded, query_level
from dicom_node.statuses import (
    CANCEL,
    IDENTIFIER_DOES_NOT_MATCH,
    OUT_OF_RESOURCES,
    PENDING,
    UNABLE_TO_PROCESS,
)

LOGGER = logging.getLogger(__name__)
MOVE_MODELS = {
    str(PatientRootQueryRetrieveInformationModelMove): "PATIENT",
    str(StudyRootQueryRetrieveInformationModelMove): "STUDY",
}
GET_MODELS = {
    str(PatientRootQueryRetrieveInformationModelGet): "PATIENT",
    str(StudyRootQueryRetrieveInformationModelGet): "STUDY",
}


class Destination(NamedTuple):
    host: str
    port: int
    tls: bool = False


def parse_destinations(text: str) -> dict[str, Destination]:
    """`AET=host:port,AET2=tls://host:port` → {AET: (host, port, tls)}; ValueError naming a
    malformed entry."""
    destinations: dict[str, Destination] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        title, _, address = item.partition("=")
        address = address.strip()
        tls = address.lower().startswith("tls://")
        host, _, port = address[6 if tls else 0:].rpartition(":")
        title = title.strip()
        if not title or len(title) > 16 or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"FHIR_DICOM_DESTINATIONS: '{item}' is not AET=host:port or AET=tls://host:port")
        destinations[title] = Destination(host.strip("[]"), int(port), tls)
    return destinations


class StoredInstance(Dataset):
    """A stored file as a C-GET/C-MOVE handler yields it: the SOP Class and Instance UIDs
    pynetdicom reads (a failed sub-operation is listed by its UID), and the file it sends."""

    def __init__(self, ref: InstanceRef) -> None:
        super().__init__()
        self.SOPClassUID = ref.sop_class
        self.SOPInstanceUID = ref.sop
        self.stored = ref


_send_c_store = Association.send_c_store


class ChunkedSends:
    """pynetdicom's `STORE_SEND_CHUNKED_DATASET`, true only while this thread sends a
    StoredInstance. pynetdicom reads the flag in `send_c_store` (the only place it does) to
    choose between streaming a file's bytes and decoding it to encode it again; the request it
    builds there is out of reach of a wrapper, so the flag stays, but set to True for the
    process it would change every other path-based send (an importer's, a plugin's). Elsewhere
    it is what it was before the node installed this."""

    def __init__(self, default: bool) -> None:
        self.default = default
        self._local = threading.local()

    def __bool__(self) -> bool:
        return bool(getattr(self._local, "on", self.default))

    @contextlib.contextmanager
    def enabled(self) -> Iterator[None]:
        previous = getattr(self._local, "on", None)
        self._local.on = True
        try:
            yield
        finally:
            self._local.on = previous if previous is not None else self.default


def chunked_sends() -> ChunkedSends:
    """The installed flag (installed again, keeping its value as the default, if someone set a
    plain bool since)."""
    flag = _config.STORE_SEND_CHUNKED_DATASET
    if not isinstance(flag, ChunkedSends):
        flag = ChunkedSends(bool(flag))
        _config.STORE_SEND_CHUNKED_DATASET = flag  # type: ignore[assignment]
    return flag


def _send_stored(self: Association, dataset: Any, *args: Any, **kwargs: Any) -> Dataset:
    """Association.send_c_store, sending a StoredInstance's file as it is."""
    if not isinstance(dataset, StoredInstance):
        return _send_c_store(self, dataset, *args, **kwargs)
    ref = dataset.stored
    try:
        with chunked_sends().enabled():
            return _send_c_store(self, ref.path, *args, **kwargs)
    except (ValueError, OSError, AttributeError) as exc:
        LOGGER.warning("instance %s (%s) not sent to %s: %s", ref.sop, ref.transfer_syntax or "no transfer syntax",
                       self.acceptor.ae_title if self.is_requestor else self.requestor.ae_title, exc)
        raise


# The destination of a C-MOVE refused before any sub-operation (no host has this name).
NO_DESTINATION = "no-destination.invalid"


class _NoAssociation:
    """What pynetdicom gets for NO_DESTINATION: it associates with the destination before it
    reads the handler's first status, so without this a failure status could only be sent after
    a real association, and an unreachable destination would answer 0xA801 for an invalid
    identifier. pynetdicom only releases it (the failure is yielded before any sub-operation)."""

    is_established = True

    def release(self) -> None:
        """Nothing to release: no connection was made."""


def open_sub_associations(ae: AE) -> None:
    """`ae` requests associations only for its C-MOVEs: with the destination, a
    `store_scu.StoreAssociation` in the serving thread; with NO_DESTINATION, none."""

    def associating(addr: str, port: int, ae_title: str, contexts: tuple[tuple[str, str], ...] = (),
                    tls_args: tuple[ssl.SSLContext, str] | None = None, **_: Any) -> Any:
        if addr == NO_DESTINATION:
            return _NoAssociation()
        return store_scu.associate(
            addr, port, calling_aet=ae.ae_title, called_aet=str(ae_title).strip(), contexts=contexts,
            max_pdu=ae.maximum_pdu_size, implementation=(ae.implementation_class_uid, ae.implementation_version_name),
            connect_timeout_s=ae.connection_timeout, acse_timeout_s=ae.acse_timeout, dimse_timeout_s=ae.dimse_timeout,
            tls=tls_args)

    ae.associate = associating  # type: ignore[method-assign]


def install_file_sending() -> None:
    """Send StoredInstances' files without decoding them (pynetdicom then never converts their
    syntax); other sends are left as they were."""
    chunked_sends()
    Association.send_c_store = _send_stored  # type: ignore[method-assign]


def storage_contexts(refs: list[InstanceRef]) -> tuple[tuple[str, str], ...]:
    """What to propose to a C-MOVE destination, as (SOP class, transfer syntax): each SOP class
    in each transfer syntax it is stored in, one context each, so that the destination accepts
    or refuses every pair alone."""
    pairs = sorted({(ref.sop_class, ref.transfer_syntax) for ref in refs if ref.transfer_syntax})
    if len(pairs) > store_scu.MAX_CONTEXTS:
        LOGGER.warning("C-MOVE: %d SOP class and transfer syntax pairs, %d proposed (the others fail)",
                       len(pairs), store_scu.MAX_CONTEXTS)
    return tuple(pairs[:store_scu.MAX_CONTEXTS]) or ((str(Verification), str(ImplicitVRLittleEndian)),)


def prefer_requestor_syntaxes(event: evt.Event) -> None:
    """EVT_REQUESTED: for the storage classes a C-GET SCU takes the SCP role for, accept the
    first transfer syntax it proposes that the node supports (pynetdicom would take the node's
    first): the syntax it prefers the files in, most often the one they are stored in. Plain
    C-STORE associations keep the node's order."""
    takes_scp = {str(sop) for sop, item in event.assoc.requestor.role_selection.items() if item.scp_role}
    if not takes_scp:
        return
    proposed: dict[str, list[str]] = {}
    for context in sorted(event.assoc.requestor.requested_contexts, key=lambda c: c.context_id or 0):
        if str(context.abstract_syntax) in takes_scp:
            proposed.setdefault(str(context.abstract_syntax), []).extend(map(str, context.transfer_syntax))
    contexts = event.assoc.acceptor.supported_contexts  # this association's list of the node's contexts
    for i, context in enumerate(contexts):
        order = proposed.get(str(context.abstract_syntax))
        if order:
            contexts[i] = copy.copy(context)  # the node's own stays as it is (its setter makes a new list)
            contexts[i].transfer_syntax = sorted(context.transfer_syntax,
                                                 key=lambda ts: order.index(ts) if ts in order else len(order))


class RetrieveService:
    """The EVT_C_MOVE and EVT_C_GET handlers over the catalog."""

    def __init__(
        self, catalog: Catalog, destinations: dict[str, Destination], client_tls: ssl.SSLContext | None = None,
    ) -> None:
        self.catalog = catalog
        self.destinations = destinations
        # For destinations marked tls://: checks their certificate, offers the node's.
        self.client_tls = client_tls
        untrusted = [title for title, d in destinations.items() if d.tls and client_tls is None]
        if untrusted:
            raise ValueError(f"FHIR_DICOM_DESTINATIONS: {', '.join(untrusted)} need TLS, and the node has no client TLS context")
        install_file_sending()

    def handle_move(self, event: evt.Event) -> Iterator[Any]:
        """The identifier first: an invalid one is 0xA900 (or 0xC000, 0xA700) whatever the
        destination, which is never contacted for it, nor for a retrieve that matches nothing
        (0 sub-operations); then an unknown or unreachable destination is 0xA801."""
        refs, failure = self._select(event, MOVE_MODELS)
        if failure is not None:
            yield NO_DESTINATION, 0  # pynetdicom "associates" with it (`open_sub_associations`)
            yield from self._sub_operations(event, refs, failure)
            return
        title = str(event.move_destination or "").strip()
        destination = self.destinations.get(title)
        if destination is None:
            LOGGER.warning("C-MOVE refused: unknown destination '%s' (FHIR_DICOM_DESTINATIONS)", title)
            yield None, None  # pynetdicom answers 0xA801, move destination unknown
            return
        options: dict[str, Any] = {"contexts": storage_contexts(refs)}
        if destination.tls:
            options["tls_args"] = (self.client_tls, destination.host)
        yield destination.host, destination.port, options
        yield from self._sub_operations(event, refs, failure)

    def handle_get(self, event: evt.Event) -> Iterator[Any]:
        refs, failure = self._select(event, GET_MODELS)
        yield from self._sub_operations(event, refs, failure)

    def _sub_operations(self, event: evt.Event, refs: list[InstanceRef], failure: int | None) -> Iterator[Any]:
        """The count, then one pending C-STORE per instance (pynetdicom runs and counts them).
        A failure is answered as one failed sub-operation: pynetdicom has no other way to fail
        a retrieve once it has its destination."""
        if failure is not None:
            yield 1
            yield failure, None
            return
        yield len(refs)
        for ref in refs:
            if event.is_cancelled:
                yield CANCEL, None
                return
            yield PENDING, StoredInstance(ref)

    def _select(self, event: evt.Event, models: dict[str, str]) -> tuple[list[InstanceRef], int | None]:
        """The instances the identifier names, or the failure status to answer with."""
        root = models.get(str(event.request.AffectedSOPClassUID), "STUDY")
        try:
            identifier = decoded(event)
        except ValueError as exc:
            LOGGER.warning("retrieve refused (0x%04X): %s", UNABLE_TO_PROCESS, exc)
            return [], UNABLE_TO_PROCESS
        try:
            level = query_level(identifier, root)
            return self._instances(level, identifier), None
        except ValueError as exc:
            LOGGER.warning("retrieve refused (0x%04X): %s", IDENTIFIER_DOES_NOT_MATCH, exc)
            return [], IDENTIFIER_DOES_NOT_MATCH
        except (PyMongoError, BSONError) as exc:  # BSONError: a query larger than a database document
            LOGGER.error("retrieve failed, database error: %s", exc)
            return [], OUT_OF_RESOURCES

    def _instances(self, level: str, identifier: Dataset) -> list[InstanceRef]:
        """The instances of the unique key at `level` (one value, or a list of UIDs: PS3.4
        C.4.2.2.1; PatientID with its IssuerOfPatientID when given), each once. ValueError when
        the identifier lacks that key."""
        keyword = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
                   "IMAGE": "SOPInstanceUID"}[level]
        values = _values(identifier, keyword)
        if not values:
            raise ValueError(f"a {level.lower()}-level retrieve needs {keyword}")
        found: dict[str, InstanceRef] = {}
        if level == "IMAGE":
            batches = [self.catalog.instances(sops=values)]
        elif level == "PATIENT":  # the patient key is PatientID in the namespace of its issuer
            issuer = next(iter(_values(identifier, "IssuerOfPatientID")), None)
            batches = [self.catalog.instances(patient_id=value, issuer=issuer) for value in values]
        else:
            criterion = {"STUDY": "study", "SERIES": "series"}[level]
            batches = [self.catalog.instances(**{criterion: value}) for value in values]
        for ref in (ref for batch in batches for ref in batch):
            found.setdefault(ref.sop, ref)
        return list(found.values())


def _values(identifier: Dataset, keyword: str) -> list[str]:
    value = identifier.get(keyword)
    if value is None or value == "":
        return []
    values = [value] if isinstance(value, str) else list(value)
    return [str(v).strip() for v in values if str(v).strip()]


def query_retrieve(
    ae: AE, catalog: Catalog, destinations: str, client_tls: ssl.SSLContext | None = None,
) -> list[tuple[Any, Callable[..., Any]]]:
    """Make `ae` a Query/Retrieve SCP (FIND, MOVE and GET of both roots) over `catalog`: its
    presentation contexts, and the handlers to bind (`client_tls` for the C-MOVE destinations
    marked tls://). C-GET's sub-operations run on the SCU's own association with the roles
    reversed: the storage classes accept its role selection. ValueError for malformed
    destinations (the node does not start)."""
    find = FindService(catalog)
    retrieve = RetrieveService(catalog, parse_destinations(destinations), client_tls)
    open_sub_associations(ae)
    for sop_class in (*FIND_MODELS, *MOVE_MODELS, *GET_MODELS):
        ae.add_supported_context(sop_class, QR_TRANSFER_SYNTAXES)
    storage = {str(context.abstract_syntax) for context in AllStoragePresentationContexts}
    for context in ae.supported_contexts:
        if str(context.abstract_syntax) in storage:
            ae.add_supported_context(context.abstract_syntax, context.transfer_syntax, scu_role=True, scp_role=True)
    return [(evt.EVT_REQUESTED, prefer_requestor_syntaxes), (evt.EVT_C_FIND, find.handle),
            (evt.EVT_C_MOVE, retrieve.handle_move), (evt.EVT_C_GET, retrieve.handle_get)]
