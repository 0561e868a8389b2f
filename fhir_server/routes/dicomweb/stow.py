"""STOW-RS: `POST /studies` (PS3.18 10.5), stored through the same path as C-STORE."""

from fastapi import APIRouter

router = APIRouter()
