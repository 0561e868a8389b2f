"""DICOMweb (PS3.18) under `/dicomweb`: QIDO-RS search (`qido`), WADO-RS retrieval (`wado`)
and STOW-RS storage (`stow`), over the DICOM node's file store and catalog.

Under authorization, DICOMweb is ImagingStudy data: QIDO-RS needs `ImagingStudy.s`, WADO-RS
`ImagingStudy.r`, STOW-RS `ImagingStudy.cu` (it creates and updates studies), from user/ or
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
    for permission in permissions:
        if access.compartment("ImagingStudy", permission) is not None or access.narrowing("ImagingStudy", permission):
            raise Forbidden("DICOMweb needs user/ or system/ ImagingStudy scopes without a search")


router = APIRouter(prefix="/dicomweb", tags=["DICOMweb"], dependencies=[Depends(dicom_access)])
router.include_router(qido.router)
router.include_router(wado.router)
router.include_router(stow.router)
