"""Pure functions from outside records (DICOM headers, source systems) to FHIR resources."""
