"""The audit trail: an `AuditEvent` (IHE BALP's shape) for every FHIR, DICOMweb and auth
request and every DICOM association and operation.

- `events`: the AuditEvent resources (pure);
- `http`: the ASGI middleware that describes each HTTP request;
- `dicom`: the DICOM node's hooks;
- `trail`: the buffered writer, which stores events in batches in the repository's format, so
  that the ordinary read and search code serves them (to administrators: `auth/policy.py`).
"""
