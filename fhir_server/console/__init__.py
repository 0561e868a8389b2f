"""The web console under /console: server-rendered pages over our own FHIR and DICOMweb APIs,
called with the signed-in user's token (see api.py), for clinicians, technicians and
integration testers."""

from fastapi import APIRouter

from fhir_server.console import dashboard, signin, static_files
from fhir_server.console.session import PREFIX

router = APIRouter(prefix=PREFIX, include_in_schema=False)
for module in (static_files, signin, dashboard):
    router.include_router(module.router)
