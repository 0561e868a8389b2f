"""HTTP edge: parse the request, call a service, send the answer. No database access here."""
