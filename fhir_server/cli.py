"""`fhir-server` command line: `serve` runs the FHIR API (and, later, the DICOM node)."""

import argparse
import os
from pathlib import Path

import uvicorn

from fhir_server.config import Settings
from fhir_server.logs import configure_logging


def _serve(args: argparse.Namespace) -> None:
    overrides = {
        k: v
        for k, v in {
            "host": args.host,
            "port": args.port,
            "data_dir": args.data_dir,
            "dicom_port": args.dicom_port,
        }.items()
        if v is not None
    }
    settings = Settings(**overrides)
    configure_logging(settings.log_level)
    from fhir_server.main import create_app

    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        proxy_headers=True,
        timeout_graceful_shutdown=10,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fhir-server", description="FHIR R4 server on MongoDB")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the FHIR API (embedded database unless MONGODB_URI is set)")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1, env FHIR_HOST)")
    serve.add_argument("--port", type=int, help="HTTP port (default 8080, env FHIR_PORT)")
    serve.add_argument("--data-dir", type=Path, help="data folder (default ./data, env FHIR_DATA_DIR)")
    serve.add_argument("--dicom-port", type=int, help="DICOM port (default 11112; the DICOM node is not built yet)")
    serve.set_defaults(handler=_serve)
    args = parser.parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    args.handler(args)


if __name__ == "__main__":
    main()
