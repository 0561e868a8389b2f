"""FHIR search: parse criteria (pure), index values on write (pure), translate to MongoDB (to_mongo)."""
