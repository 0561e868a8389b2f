"""Settings from flags and environment, in one place (pydantic-settings)."""

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Server configuration; every field can be set as `FHIR_<NAME>` in the environment."""

    model_config = SettingsConfigDict(env_prefix="FHIR_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: Path = Path("./data")
    # Unset: an embedded MongoDB-wire server (SecantusDB) is started with its files under data_dir.
    mongodb_uri: str | None = Field(
        default=None, validation_alias=AliasChoices("MONGODB_URI", "FHIR_MONGODB_URI")
    )
    mongodb_db: str = "fhir"
    # Write concern: "majority" (default) or a number of nodes; journaled unless turned off.
    write_concern_w: str = "majority"
    write_journal: bool = True
    # Writes in multi-document transactions: auto (MongoDB replica sets and sharded clusters),
    # on, or off (ordered writes, repaired on read).
    write_transactions: Literal["auto", "on", "off"] = "auto"
    embedded_cache_size: str = "256M"
    # Public base URL for Location headers and links; derived from the request when unset.
    base_url: str | None = None
    default_page_size: int = 50
    max_page_size: int = 1000
    # Search: matches kept for paging (the total stays exact beyond it), how long a page link
    # lives, and how many resources `_include`/`_revinclude` add to one page.
    max_search_results: int = 10000
    page_ttl_s: float = 3600.0
    max_included: int = 1000
    # Off only to measure what search indexing costs on the write path (bench/search.py).
    search_indexing: bool = True
    # MongoDB stores at most 16 MiB per document: larger resources could not be stored.
    max_body_bytes: int = 15 * 1024 * 1024
    # Batch and transaction Bundles: at most this many entries and bytes (then 413).
    max_bundle_entries: int = 10000
    max_bundle_bytes: int = 100 * 1024 * 1024
    # The image upload service (`Patient/{id}/$upload-image`): the largest file accepted.
    # At most 11 MiB: the Binary holds it as base64 (4/3) in one MongoDB document (16 MiB).
    upload_max_bytes: int = Field(default=10 * 1024 * 1024, ge=1, le=11 * 1024 * 1024)
    # `$ai-readiness`: the retinal image scores an AI-ready image may have (the retinal system's
    # terms, comma-separated), and whether an over-illuminated image may be AI-ready.
    ai_ready_quality: str = "ACCEPTABLE,HIGH"
    ai_ready_anatomy: str = "ACCEPTABLE,GOOD"
    ai_ready_allow_over_illuminated: bool = False
    # How long a conditional create/update waits for a concurrent one on the same criteria.
    conditional_wait_s: float = 20.0
    # Bulk export ($export): how long a finished job and its files are kept; the lease a worker
    # holds on a running job (a job whose lease lapses is resumed by any server process); how
    # often a worker looks for such jobs; resources read per batch, and a pause between batches
    # to leave the database to the API; resources per file; runs a job may take before it fails.
    export_ttl_s: float = Field(default=24 * 3600.0, gt=0)
    export_lease_s: float = Field(default=30.0, gt=0)
    export_poll_s: float = Field(default=5.0, gt=0)
    export_batch_size: int = Field(default=500, ge=1)
    export_pause_s: float = Field(default=0.0, ge=0)
    export_file_resources: int = Field(default=100_000, ge=1)
    export_max_attempts: int = Field(default=3, ge=1)
    log_level: str = "INFO"
    # The DICOM node: port (0: no node), AE title, listening address (default: `host`).
    dicom_port: int = Field(default=11112, ge=0, le=65535)
    dicom_aet: str = Field(default="FHIRSERVER", min_length=1, max_length=16)
    dicom_host: str | None = None
    # Calling AE titles allowed to associate, `AET` or `AET@host`, comma-separated (empty: any).
    dicom_allowed: str = ""
    dicom_max_associations: int = Field(default=16, ge=1)
    # The largest PDU (and A-ASSOCIATE-RQ: at most 1 MiB) a peer may send; larger drops the peer.
    dicom_max_pdu_bytes: int = Field(default=64 * 1024 * 1024, ge=16 * 1024)
    # fsync each received file before answering (survives power loss, not only a crash).
    dicom_fsync: bool = True
    # DICOMweb STOW-RS: the most parts (files) one request may hold (then 413), each a file on disk.
    dicomweb_max_parts: int = Field(default=10_000, ge=1)
    # identifier.system of a Patient whose PatientID comes without IssuerOfPatientID.
    dicom_patient_system: str = "urn:fhir-server:dicom:patient-id"
    # C-MOVE destinations the node sends to: `AET=host:port`, comma-separated (others: 0xA801).
    dicom_destinations: str = ""
    # How long the node waits for a C-MOVE destination's TCP connection (then 0xA801): without
    # it, a host that drops packets holds the retrieve for the system's minutes-long SYN retries.
    dicom_connection_timeout_s: float = Field(default=10.0, gt=0)
    # How long the node waits for a C-STORE response: a C-MOVE destination's (then that association
    # is aborted, and that sub-operation and the ones left fail: 0xA702), a C-GET requestor's (then
    # the requestor's association is aborted, as pynetdicom does).
    dicom_dimse_timeout_s: float = Field(default=60.0, gt=0)
    # At start-up, files in the DICOM store's `incoming` folder older than this are removed (what
    # a crash left half-received); younger ones may be another process's receiving, on a shared
    # data folder: longer than any receive (a 4 GiB STOW-RS body at 10 Mbit/s takes 55 minutes).
    dicom_incoming_stale_s: float = Field(default=3600.0, ge=0)
    # Authorization (SMART on FHIR). Off: every request is allowed (local trials only: `serve`
    # refuses to listen beyond loopback without it unless `insecure`). On: every FHIR and
    # DICOMweb request needs a bearer access token of the built-in authorization server or of
    # an external issuer (`{"issuer": "JWKS URL", …}`, JSON).
    auth: bool = False
    insecure: bool = False
    # The built-in server's issuer (`iss`): default the public base (FHIR_BASE_URL without /fhir,
    # else the request's host) + /auth. Tokens are for the FHIR base (`aud`).
    auth_issuer: str | None = None
    auth_external_issuers: dict[str, str] = Field(default_factory=dict)
    auth_token_lifetime_s: int = Field(default=300, ge=30, le=3600)
    # HTTPS for the API (uvicorn): a PEM certificate chain and its key.
    tls_certfile: Path | None = None
    tls_keyfile: Path | None = None
    # Transport security (fhir_server/security.py, dicom_node/tls.py). HTTPS: with a CA file,
    # clients must present a certificate it signed.
    tls_ca_file: Path | None = None
    # Browsers' cross-origin access (CORS): allowed origins, comma-separated or a JSON list
    # (`*`: any); empty: no CORS headers at all.
    cors_origins: str = ""
    # The largest request body (then 413) before any route reads it; default the largest any
    # endpoint takes (FHIR_MAX_BUNDLE_BYTES...). STOW-RS is exempt: its parts go to disk under
    # its own limits.
    max_request_bytes: int | None = Field(default=None, ge=1)
    # DICOM TLS: with a certificate and key, the node's port speaks TLS only; with a CA file,
    # peers must present a certificate it signed (mutual TLS, PS3.15 B.1). A plain port may stay
    # open beside it for peers without TLS (0: none).
    dicom_tls_certfile: Path | None = None
    dicom_tls_keyfile: Path | None = None
    dicom_tls_ca_file: Path | None = None
    dicom_plain_port: int = Field(default=0, ge=0, le=65535)
    # Accounts of the built-in authorization server (SMART authorization_code, PKCE): patients
    # may register themselves (`auth_registration`); authorization codes live `auth_code_lifetime_s`;
    # refresh tokens `auth_refresh_lifetime_s` (offline_access) or `auth_online_lifetime_s`
    # (online_access); `auth_max_failures` failed logins in a row lock an email address for
    # `auth_lockout_s`; confirmation and reset links live `auth_link_lifetime_s`.
    auth_registration: bool = True
    auth_code_lifetime_s: int = Field(default=60, ge=10, le=600)
    auth_refresh_lifetime_s: int = Field(default=30 * 24 * 3600, ge=60)
    auth_online_lifetime_s: int = Field(default=12 * 3600, ge=60)
    auth_max_failures: int = Field(default=5, ge=1)
    auth_lockout_s: int = Field(default=900, ge=1)
    auth_link_lifetime_s: int = Field(default=3600, ge=60, le=7 * 24 * 3600)
    # Mail (registration, password reset): an SMTP server; unset host: no mail is sent, and the
    # pages that need it say so. Links point at the public issuer (FHIR_AUTH_ISSUER or
    # FHIR_BASE_URL), never at a request's Host header: without either no mail is sent either.
    smtp_host: str | None = None
    smtp_port: int = Field(default=25, ge=1, le=65535)
    smtp_from: str = "fhir-server@localhost"
    smtp_user: str | None = None
    smtp_password: str | None = None
    smtp_starttls: bool = False
    smtp_timeout_s: float = Field(default=10.0, gt=0)
    # The audit trail (AuditEvent for every FHIR, DICOMweb, auth and DICOM interaction): events
    # are buffered and stored in batches every `audit_flush_s` or `audit_batch` events; at most
    # `audit_max_buffered` wait while the database is unreachable (then new ones are dropped, logged).
    # Batches are indexed for search when the process is idle, before a request that reads
    # AuditEvents, and at the latest once they are `audit_index_lag_s` old (fhir_server/audit/trail.py).
    audit: bool = True
    audit_flush_s: float = Field(default=0.1, gt=0)
    audit_batch: int = Field(default=200, ge=1)
    audit_max_buffered: int = Field(default=100_000, ge=1)
    audit_index_lag_s: float = Field(default=60.0, ge=0)


@lru_cache
def get_settings() -> Settings:
    return Settings()
