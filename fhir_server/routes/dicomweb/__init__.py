"""DICOMweb (PS3.18) under `/dicomweb`: QIDO-RS search (`qido`), WADO-RS retrieval (`wado`)
and STOW-RS storage (`stow`), over the DICOM node's file store and catalog."""

from fastapi import APIRouter

from fhir_server.routes.dicomweb import qido, stow, wado

router = APIRouter(prefix="/dicomweb", tags=["DICOMweb"])
router.include_router(qido.router)
router.include_router(wado.router)
router.include_router(stow.router)
