"""FHIR semantics over storage: validation, versioning, conditional logic, Bundles."""
