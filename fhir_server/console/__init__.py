"""The web console under /console: server-rendered pages over our own FHIR and DICOMweb APIs,
called with the signed-in user's token (see api.py), for clinicians, technicians and
integration testers."""

from fastapi import APIRouter

from fhir_server.console import (
    appointments,
    browser,
    dashboard,
    imaging,
    interactions,
    patients,
    signin,
    static_files,
    upload,
)
from fhir_server.console.session import PREFIX

router = APIRouter(prefix=PREFIX, include_in_schema=False)
for module in (static_files, signin, dashboard, patients, imaging, upload, appointments, interactions, browser):
    router.include_router(module.router)
