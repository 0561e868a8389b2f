"""FHIR R4 REST server on MongoDB."""

__version__ = "0.1.0"
