"""The FastAPI application: routers, error handlers, and the database lifespan (which also
starts the DICOM node)."""

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from fhir_server import __version__
from fhir_server.audit import trail as audit_trail
from fhir_server.audit.http import AuditMiddleware
from fhir_server.config import Settings, get_settings
from fhir_server.console import router as console
from fhir_server.errors import install_error_handlers
from fhir_server.logs import AccessLogMiddleware
from fhir_server.provenance import ProvenanceMiddleware
from fhir_server.routes import admin, auth, bundles, dicomweb, export, login, operations, resources, system
from fhir_server.security import install_transport_security, loopback
from fhir_server.services.ai_readiness import ReadinessRule
from fhir_server.services.export import ExportService
from fhir_server.services.history import HistoryService
from fhir_server.services.resources import ResourceService
from fhir_server.services.search import SearchService
from fhir_server.services.transactions import TransactionService
from fhir_server.storage.client import open_database
from fhir_server.storage.pages import PageStore
from fhir_server.storage.repository import ResourceRepository
from fhir_server.validation.resource_types import supported_types

LOGGER = logging.getLogger(__name__)


def check_exposure(settings: Settings) -> bool:
    """Open access is for local trials: beyond loopback it needs `--insecure` (else SystemExit).
    True when access is open."""
    if settings.auth:
        return False
    if not loopback(settings.host) and not settings.insecure:
        raise SystemExit(
            f"Refusing to serve {settings.host} without authorization: set FHIR_AUTH=true (SMART on FHIR), "
            "or give --insecure (FHIR_INSECURE=true) to run open anyway"
        )
    return True


async def start_auth(app: FastAPI, settings: Settings, database: Any) -> None:
    from fhir_server.auth import clients, tokens
    from fhir_server.auth.server import AuthServer

    await tokens.prepare(database.db)
    await clients.prepare(database.db)
    key = await tokens.signing_key(database.db)
    validator = tokens.TokenValidator(database.db, key, settings.auth_external_issuers,
                                      pinned=bool(settings.base_url or settings.auth_issuer))
    app.state.auth = AuthServer(database.db, key, validator, settings.auth_token_lifetime_s)
    await app.state.auth.enable_users(settings)  # accounts, authorization codes, mail


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if check_exposure(settings):
            LOGGER.warning("Authorization is off: every request is allowed (FHIR_AUTH=true turns it on)",
                           extra={"host": settings.host})
        supported_types()  # load the model table before the first request
        database = await open_database(settings)
        repository = ResourceRepository(
            database.db, search_indexing=settings.search_indexing, base_url=settings.base_url or ""
        )
        await repository.prepare(settings.write_transactions)
        pages = PageStore(database.db, settings.page_ttl_s)
        await pages.prepare()
        app.state.database = database
        app.state.audit = audit_trail.from_settings(repository, settings) if settings.audit else None
        if app.state.audit is not None:
            await app.state.audit.start()  # before the DICOM node, whose events it records too
        await start_auth(app, settings, database)
        app.state.search = SearchService(
            repository,
            pages,
            default_count=settings.default_page_size,
            max_count=settings.max_page_size,
            max_results=settings.max_search_results,
            max_included=settings.max_included,
        )
        app.state.resources = ResourceService(
            repository, database.db, app.state.search, settings.conditional_wait_s
        )
        app.state.transactions = TransactionService(app.state.resources)
        app.state.history = HistoryService(
            repository, settings.default_page_size, settings.max_page_size
        )
        ReadinessRule.from_settings(settings)  # a wrong FHIR_AI_READY_* setting stops the start, not each request
        app.state.exports = ExportService(repository, settings)
        await app.state.exports.start()
        from dicom_node import indexer_for, recover, start_node

        # The DICOM store and its indexer serve DICOMweb (app.state.dicom) whether or not the
        # node listens for DIMSE; what a crash left (STOW-RS's too) is recovered either way.
        app.state.dicom = indexer_for(settings, repository, app.state.search, database.reader)
        node = None
        if settings.dicom_port:
            node = await start_node(settings, app.state.dicom)
        else:
            await recover(settings, app.state.dicom)
        gc.collect()
        gc.freeze()  # what start-up made lives as long as the process: no collection walks it again
        LOGGER.info("FHIR server ready", extra={"database": settings.mongodb_db})
        try:
            yield
        finally:
            if node is not None:
                await asyncio.to_thread(node.stop)
            if app.state.audit is not None:
                await app.state.audit.stop()  # writes what is buffered
            await app.state.exports.stop()
            await database.close()

    app = FastAPI(
        title="FHIR server",
        version=__version__,
        description="FHIR R4 REST API on MongoDB. FHIR base: /fhir",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.add_middleware(ProvenanceMiddleware)  # innermost: its answer waits for the Provenance
    install_error_handlers(app)
    install_transport_security(app, settings)  # body cap, CORS, security headers
    app.add_middleware(AuditMiddleware)  # sees every answer as sent, 413s and 500s included
    app.add_middleware(AccessLogMiddleware)
    app.include_router(system.probes)
    app.include_router(system.public)
    app.include_router(system.router)
    app.include_router(auth.router)
    app.include_router(login.router)
    app.include_router(admin.router)
    app.include_router(bundles.router)
    app.include_router(operations.router)  # before the resource routes, whose patterns would take its paths
    app.include_router(export.router)  # likewise
    app.include_router(export.jobs)
    app.include_router(dicomweb.router)
    app.include_router(console)  # the web console, a client of the APIs above
    app.include_router(resources.router)
    return app
