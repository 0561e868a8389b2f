"""DICOMweb (PS3.18) under `/dicomweb`: QIDO-RS search (`qido`), WADO-RS retrieval (`wado`)
and STOW-RS storage (`stow`), over the DICOM node's file store and catalog.

Under authorization, DICOMweb is ImagingStudy data: QIDO-RS needs `ImagingStudy.s`, WADO-RS
`ImagingStudy.r`, STOW-RS `cu` on ImagingStudy, Patient and Endpoint (what it makes), from user/ or
system/ scopes: studies are not filtered by patient here, so patient/ and granular scopes are
refused.
"""

from fastapi import APIRouter, Depends, Request

from fhir_server.context import authorize
from fhir_server.errors import Forbidden
from fhir_server.routes.dicomweb import qido, stow, wado

QIDO_ENDS = ("studies", "series", "instances")


async def dicom_access(request: Request) -> None:
    access = await authorize(request)
    if access.open:
        return
    if request.method == "POST":
        permissions = "cu"
    else:
        permissions = "s" if request.url.path.rstrip("/").endswith(QIDO_ENDS) else "r"
    # STOW-RS also makes the Patient (and Endpoint) of what it stores.
    types = ("ImagingStudy", "Patient", "Endpoint") if request.method == "POST" else ("ImagingStudy",)
    for resource_type in types:
        for permission in permissions:
            if access.compartment(resource_type, permission) is not None or access.narrowing(resource_type, permission):
                raise Forbidden("DICOMweb needs user/ or system/ scopes without a search: ImagingStudy (STOW-RS: "
                                "ImagingStudy, Patient and Endpoint, create and update)")


router = APIRouter(prefix="/dicomweb", tags=["DICOMweb"], dependencies=[Depends(dicom_access)])
router.include_router(qido.router)
router.include_router(wado.router)
router.include_router(stow.router)
