"""WADO-RS: studies, series, instances, metadata, rendered images and frames (PS3.18 10.4), streamed from the file store."""

from fastapi import APIRouter

router = APIRouter()
