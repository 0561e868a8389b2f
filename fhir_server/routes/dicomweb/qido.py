"""QIDO-RS: searches for studies, series and instances (PS3.18 10.6), answered from the catalog."""

from fastapi import APIRouter

router = APIRouter()
