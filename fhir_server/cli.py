"""`fhir-server` command line: `serve` runs the FHIR API and the DICOM node; `dicom` runs the
node alone (`dicom reindex`: index every stored instance again); `import` loads the records of a
replaced system into a running server; `reindex` rebuilds the search index of stored resources;
`clients add` and `accounts add` register clients and user accounts of the built-in
authorization server."""

import argparse
import asyncio
import os
from pathlib import Path

import uvicorn
from tqdm import tqdm

from fhir_server.config import Settings
from fhir_server.logs import configure_logging
from fhir_server.storage.embedded import EmbeddedDatabaseError


def _serve(args: argparse.Namespace) -> None:
    overrides = {
        k: v
        for k, v in {
            "host": args.host,
            "port": args.port,
            "data_dir": args.data_dir,
            "dicom_port": args.dicom_port,
            "dicom_aet": args.dicom_aet,
            "insecure": args.insecure or None,
        }.items()
        if v is not None
    }
    settings = Settings(**overrides)
    configure_logging(settings.log_level)
    from fhir_server.main import check_exposure

    check_exposure(settings)  # before the database starts
    from fhir_server.main import create_app
    from fhir_server.security import check_transport

    tls = check_transport(settings)  # a missing or unusable certificate stops here, not in uvicorn

    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        proxy_headers=True,
        timeout_graceful_shutdown=10,
        **tls,
    )


def _clients(args: argparse.Namespace) -> None:
    """`fhir-server clients add`: register a client of the built-in authorization server."""
    import json

    settings = Settings(**({"data_dir": args.data_dir} if args.data_dir else {}))
    configure_logging("WARNING")
    jwks = None
    if args.jwks:
        try:
            jwks = json.loads(Path(args.jwks).read_text())
        except (OSError, ValueError) as exc:
            raise SystemExit(f"--jwks {args.jwks}: not a readable JWKS (JSON): {exc}") from exc
        if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
            raise SystemExit(f"--jwks {args.jwks}: a JWKS is an object with a list of keys")
    if args.public:
        if jwks is not None or args.jwks_url:
            raise SystemExit("a --public client has no keys (no --jwks, no --jwks-url)")
        if not args.redirect_uri:
            raise SystemExit("a --public client needs its --redirect-uri")
    elif (jwks is None) == (args.jwks_url is None):
        raise SystemExit("give the client's public keys: --jwks FILE or --jwks-url URL (or --public)")
    print(asyncio.run(_add_client(settings, args, jwks)))


async def _add_client(settings: Settings, args: argparse.Namespace, jwks: dict | None) -> str:
    from fhir_server.auth import clients
    from fhir_server.auth.scopes import Grants, ScopeError
    from fhir_server.storage.client import open_database

    try:
        Grants.parse(args.scope)
    except ScopeError as exc:
        raise SystemExit(f"--scope: {exc}") from exc
    database = await open_database(settings)
    try:
        client = clients.Client(args.id or clients.new_client_id(), args.name, args.scope, jwks, args.jwks_url,
                                tuple(args.redirect_uri or ()), fhir_user=args.fhir_user, public=args.public)
        try:
            await clients.register(database.db, client)
        except ValueError as exc:
            raise SystemExit(str(exc)) from exc
        return client.client_id
    finally:
        await database.close()


def _accounts(args: argparse.Namespace) -> None:
    """`fhir-server accounts add`: a user account of the built-in authorization server."""
    import sys

    settings = Settings(**({"data_dir": args.data_dir} if args.data_dir else {}))
    configure_logging("WARNING")
    password = None
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    print(asyncio.run(_add_account(settings, args, password)))


async def _add_account(settings: Settings, args: argparse.Namespace, password: str | None) -> str:
    from fhir_server.auth import accounts
    from fhir_server.storage.client import open_database

    database = await open_database(settings)
    try:
        await accounts.prepare(database.db)
        try:
            account = await accounts.create(database.db, args.email, args.role, args.fhir_user, password,
                                            name=args.name or "", confirmed=True)
        except accounts.AccountError as exc:
            raise SystemExit(str(exc)) from exc
        return account.account_id
    finally:
        await database.close()


def _reindex(args: argparse.Namespace) -> None:
    settings = Settings(**({"data_dir": args.data_dir} if args.data_dir else {}))
    configure_logging("WARNING")
    asyncio.run(_reindex_all(settings, args.all))


async def _reindex_all(settings: Settings, everything: bool) -> None:
    from fhir_server.storage.client import open_database
    from fhir_server.storage.repository import ResourceRepository

    database = await open_database(settings)
    try:
        repository = ResourceRepository(database.db, base_url=settings.base_url or "")
        types = await repository.stored_types()
        stale = {t: await repository.count_stale(t, everything) for t in types}
        total = sum(stale.values())
        print(f"{total} resources to index over {sum(1 for n in stale.values() if n)} types")
        with tqdm(total=total, unit="res", disable=total == 0) as bar:
            for resource_type, count in stale.items():
                if not count:
                    continue
                bar.set_description(resource_type)
                async for done in repository.reindex(resource_type, everything):
                    bar.update(done)
        await repository.mark_search_index()
    finally:
        await database.close()


def _dicom(args: argparse.Namespace) -> None:
    overrides = {
        k: v
        for k, v in {"data_dir": args.data_dir, "dicom_port": args.dicom_port, "dicom_aet": args.dicom_aet}.items()
        if v is not None
    }
    settings = Settings(**overrides)
    configure_logging(settings.log_level if args.action == "serve" else "WARNING")
    asyncio.run(_run_dicom(settings, args.action))


async def _run_dicom(settings: Settings, action: str) -> None:
    """The node alone, over the same database and services as `serve`."""
    import gc
    import signal

    from dicom_node import indexer_for, start_node
    from fhir_server.services.search import SearchService
    from fhir_server.storage.client import open_database
    from fhir_server.storage.pages import PageStore
    from fhir_server.storage.repository import ResourceRepository

    database = await open_database(settings)
    try:
        repository = ResourceRepository(database.db, base_url=settings.base_url or "")
        await repository.prepare(settings.write_transactions)
        pages = PageStore(database.db, settings.page_ttl_s)
        await pages.prepare()
        searches = SearchService(repository, pages, default_count=settings.default_page_size,
                                 max_count=settings.max_page_size, max_results=settings.max_search_results,
                                 max_included=settings.max_included)
        if action == "reindex":
            indexed = await indexer_for(settings, repository, searches, database.reader).reconcile(everything=True)
            print(f"{indexed} instances indexed")
            return
        node = await start_node(settings, indexer_for(settings, repository, searches, database.reader))
        gc.collect()
        gc.freeze()  # as `serve` does once started
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await asyncio.to_thread(node.stop)
    finally:
        await database.close()


def _import(args: argparse.Namespace) -> None:
    import sys

    from fhir_server.importer import Destination, dumps_summary, import_files, import_generated

    configure_logging("WARNING")
    host, _, port = (args.dicom or "").rpartition(":")
    if args.dicom and not port.isdigit():
        raise SystemExit("--dicom takes HOST:PORT")
    to = Destination(args.url, host.strip("[]") or None, int(port) if port else 11112, args.dicom_aet,
                     args.token or os.environ.get("FHIR_ACCESS_TOKEN"))
    if args.randomize:
        if args.system != "retinal":
            raise SystemExit("--randomize generates data for the retinal system only")
        from mappings.retinal_generate import generate

        generated = generate(args.num_sites, args.num_patients, args.max_images_per_patient, args.seed)
        summary = import_generated(args.system, generated, to, progress=not args.json)
    else:
        if not args.files:
            raise SystemExit("give the files to import (JSON or CSV), or --randomize for the retinal system")
        try:
            summary = import_files(args.system, args.files, to, args.kind, progress=not args.json)
        except ValueError as exc:
            raise SystemExit(str(exc)) from exc
    print(dumps_summary(summary) if args.json else summary.report())
    sys.exit(1 if summary.rejected else 0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fhir-server", description="FHIR R4 server on MongoDB")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the FHIR API (embedded database unless MONGODB_URI is set)")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1, env FHIR_HOST)")
    serve.add_argument("--port", type=int, help="HTTP port (default 8080, env FHIR_PORT)")
    serve.add_argument("--data-dir", type=Path, help="data folder (default ./data, env FHIR_DATA_DIR)")
    serve.add_argument("--dicom-port", type=int, help="DICOM port (default 11112, env FHIR_DICOM_PORT; 0: no node)")
    serve.add_argument("--dicom-aet", help="the node's AE title (default FHIRSERVER, env FHIR_DICOM_AET)")
    serve.add_argument("--insecure", action="store_true",
                       help="run with authorization off on an address beyond loopback (env FHIR_INSECURE)")
    serve.set_defaults(handler=_serve)
    dicom = commands.add_parser("dicom", help="run the DICOM node alone; `dicom reindex` indexes every stored instance")
    dicom.add_argument("action", nargs="?", choices=("serve", "reindex"), default="serve")
    dicom.add_argument("--data-dir", type=Path, help="data folder (default ./data, env FHIR_DATA_DIR)")
    dicom.add_argument("--dicom-port", type=int, help="DICOM port (default 11112, env FHIR_DICOM_PORT)")
    dicom.add_argument("--dicom-aet", help="the node's AE title (default FHIRSERVER, env FHIR_DICOM_AET)")
    dicom.set_defaults(handler=_dicom)
    importing = commands.add_parser(
        "import", help="import the records of a replaced system (one FHIR transaction each) into a running server"
    )
    importing.add_argument("system", choices=("interactions", "ehr", "assessment", "retinal"))
    importing.add_argument("files", nargs="*", type=Path, help="JSON ({kind: [records]}) or CSV files (one kind each)")
    importing.add_argument("--url", default="http://127.0.0.1:8080/fhir", help="the server's FHIR base")
    importing.add_argument("--dicom", metavar="HOST:PORT",
                           help="the server's DICOM node, for DICOM images (default: the --url host, port 11112)")
    importing.add_argument("--dicom-aet", default="FHIRSERVER", help="the node's AE title (default FHIRSERVER)")
    importing.add_argument("--token", help="a bearer access token, for a server with FHIR_AUTH on "
                           "(env FHIR_ACCESS_TOKEN; e.g. of a client with system/*.cruds)")
    importing.add_argument("--kind", help="the kind of record of a CSV file or JSON list (default: from the file name)")
    importing.add_argument("--json", action="store_true", help="the summary as JSON, no progress bar")
    importing.add_argument("--randomize", action="store_true", help="retinal: generate a realistic data set")
    importing.add_argument("--num-sites", type=int, default=5)
    importing.add_argument("--num-patients", type=int, default=0)
    importing.add_argument("--max-images-per-patient", type=int, default=4)
    importing.add_argument("--seed", type=int, default=None)
    importing.set_defaults(handler=_import)
    reindex = commands.add_parser(
        "reindex",
        help="recompute the search index of stored resources after the search parameters changed "
        "(stop the server first when it uses the embedded database)",
    )
    reindex.add_argument("--data-dir", type=Path, help="data folder (default ./data, env FHIR_DATA_DIR)")
    reindex.add_argument("--all", action="store_true", help="every resource, not only those indexed differently")
    reindex.set_defaults(handler=_reindex)
    client_commands = commands.add_parser(
        "clients", help="clients of the built-in authorization server (embedded database: stop the server first)"
    )
    client_actions = client_commands.add_subparsers(dest="action", required=True)
    adding = client_actions.add_parser(
        "add", help="register a client (private_key_jwt keys, or --public with redirect URIs); prints its id")
    adding.add_argument("--name", required=True)
    adding.add_argument("--scope", required=True, help="the most it may ask for, e.g. 'system/*.rs system/Observation.cruds'")
    adding.add_argument("--jwks", help="a file with the client's public keys (JWKS)")
    adding.add_argument("--jwks-url", help="where the client publishes its public keys (JWKS)")
    adding.add_argument("--fhir-user", help="the Practitioner (or other) resource it acts as, e.g. Practitioner/123")
    adding.add_argument("--redirect-uri", action="append",
                        help="where an app acting for a user gets its authorization code (repeatable; exact match)")
    adding.add_argument("--public", action="store_true",
                        help="an app that can keep no secret (browser, mobile): no keys, PKCE only")
    adding.add_argument("--id", help="its client_id (default: a new random one)")
    adding.add_argument("--data-dir", type=Path, help="data folder (default ./data, env FHIR_DATA_DIR)")
    adding.set_defaults(handler=_clients)
    account_commands = commands.add_parser(
        "accounts", help="user accounts of the built-in authorization server (embedded database: stop the server first)"
    )
    account_actions = account_commands.add_subparsers(dest="action", required=True)
    adding = account_actions.add_parser("add", help="add an account (its address counts as confirmed); prints its id")
    adding.add_argument("--email", required=True)
    adding.add_argument("--role", required=True, choices=("admin", "practitioner", "patient"))
    adding.add_argument("--fhir-user", help="the resource the account speaks for: Practitioner/<id> or Patient/<id>")
    adding.add_argument("--name", help="the person's name")
    adding.add_argument("--password-stdin", action="store_true",
                        help="read the password from the first line of standard input (without it: no password "
                        "until one is set through 'Forgot your password?')")
    adding.add_argument("--data-dir", type=Path, help="data folder (default ./data, env FHIR_DATA_DIR)")
    adding.set_defaults(handler=_accounts)
    args = parser.parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        args.handler(args)
    except EmbeddedDatabaseError as exc:  # a data folder in use, a database that cannot start: said, not traced
        raise SystemExit(f"fhir-server: {exc}") from None


if __name__ == "__main__":
    main()
