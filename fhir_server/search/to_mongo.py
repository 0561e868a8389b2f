"""The only place that turns search criteria into a MongoDB filter."""

from typing import Any

from fhir_server.search.criteria import Criterion

INDEX_FIELD = "ix"


def to_filter(criteria: list[Criterion]) -> dict[str, Any]:
    clauses: list[dict[str, Any]] = [{"del": False}]
    for criterion in criteria:
        if criterion.name == "_id":
            clauses.append({"_id": {"$in": list(criterion.values)}})
        else:
            clauses.append({f"{INDEX_FIELD}.{criterion.name}": {"$in": list(criterion.values)}})
    return clauses[0] if len(clauses) == 1 else {"$and": clauses}


def index_keys() -> list[str]:
    """Fields to index on every resource collection."""
    return [f"{INDEX_FIELD}.identifier"]
