"""Identity and access: SMART on FHIR scopes, access tokens, accounts and the audit trail."""
