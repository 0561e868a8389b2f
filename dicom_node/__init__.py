"""The DICOM node: a Storage SCP whose instances are kept as received and indexed live in FHIR.

`indexer_for` builds its store and indexer over the FHIR server's repository and search service
(DICOMweb uses them too); `recover` sweeps and indexes what a crash left (at every start, DIMSE
port or not); `start_node` recovers, then starts listening (over TLS when the settings give it
a certificate: `tls_contexts`).
"""

import asyncio
import logging
import ssl

from pymongo.database import Database

from dicom_node.catalog import Catalog
from dicom_node.files import FileStore
from dicom_node.indexing import DicomIndexer
from dicom_node.node import DicomNode
from dicom_node.tls import TlsConfigError, client_context, server_context
from fhir_server.config import Settings
from fhir_server.services.search import SearchService
from fhir_server.storage.repository import ResourceRepository

LOGGER = logging.getLogger(__name__)


def dicomweb_address(settings: Settings) -> str:
    """Where the studies are retrieved from (the Endpoint of every ImagingStudy)."""
    if settings.base_url:
        return settings.base_url.rstrip("/").removesuffix("/fhir") + "/dicomweb"
    scheme = "https" if settings.tls_certfile else "http"
    return f"{scheme}://{settings.host}:{settings.port}/dicomweb"


def indexer_for(settings: Settings, repository: ResourceRepository, searches: SearchService, reader: Database) -> DicomIndexer:
    """The DICOM store's indexer, and the catalog it keeps (read through `reader`, synchronous)."""
    files = FileStore(settings.data_dir / "dicom")
    files.prepare()
    return DicomIndexer(
        repository, searches, files,
        patient_system=settings.dicom_patient_system, endpoint_address=dicomweb_address(settings),
        catalog=Catalog(repository.db, reader, files, ae_title=settings.dicom_aet),
    )


async def recover(settings: Settings, indexer: DicomIndexer) -> None:
    """What a crash left: files half-received (older than `dicom_incoming_stale_s`: a younger
    one may be another process's, on a shared data folder), and instances placed, by C-STORE or
    STOW-RS, but not yet indexed (their markers). Run at every start, whether or not the node
    listens for DIMSE; the catalog's indexes are made first (its synchronous reads do not make
    them, and a catalog only ever read would be searched without them)."""
    await indexer.catalog.prepare()
    removed = await asyncio.to_thread(indexer.files.sweep_incoming, settings.dicom_incoming_stale_s)
    if removed:
        LOGGER.info("removed %d files left half-received in %s", removed, indexer.files.incoming)
    await indexer.reconcile()


def tls_contexts(settings: Settings) -> tuple[ssl.SSLContext | None, ssl.SSLContext]:
    """The node's server context (None without a certificate: plain DICOM), and the client
    context of the associations it opens to destinations marked tls://. TlsConfigError for a
    missing or unusable file, or a certificate without its key."""
    certfile, keyfile, ca_file = settings.dicom_tls_certfile, settings.dicom_tls_keyfile, settings.dicom_tls_ca_file
    if (certfile is None) != (keyfile is None):
        raise TlsConfigError("DICOM TLS needs both FHIR_DICOM_TLS_CERTFILE and FHIR_DICOM_TLS_KEYFILE")
    if certfile is None and ca_file is not None:
        raise TlsConfigError("FHIR_DICOM_TLS_CA_FILE needs FHIR_DICOM_TLS_CERTFILE and FHIR_DICOM_TLS_KEYFILE")
    server = server_context(certfile, keyfile, ca_file) if certfile and keyfile else None
    return server, client_context(certfile, keyfile, ca_file)


async def start_node(settings: Settings, indexer: DicomIndexer) -> DicomNode:
    """Recover what a crash left, then listen."""
    try:
        tls, client_tls = tls_contexts(settings)
    except TlsConfigError as exc:
        raise SystemExit(str(exc)) from exc
    await recover(settings, indexer)
    node = DicomNode(
        indexer, indexer.files, asyncio.get_running_loop(),
        ae_title=settings.dicom_aet, host=settings.dicom_host or settings.host, port=settings.dicom_port,
        allowed=settings.dicom_allowed, max_associations=settings.dicom_max_associations,
        max_pdu_bytes=settings.dicom_max_pdu_bytes, fsync=settings.dicom_fsync,
        destinations=settings.dicom_destinations, connection_timeout_s=settings.dicom_connection_timeout_s,
        dimse_timeout_s=settings.dicom_dimse_timeout_s,
        tls=tls, plain_port=settings.dicom_plain_port, client_tls=client_tls,
    )
    await asyncio.to_thread(node.start)
    return node
