"""History at instance, type and system level: `_count`, `_since`, `_at` and cursor paging."""

from typing import Any

from fhir_server.auth.policy import OPEN, Policy
from fhir_server.errors import BadRequest
from fhir_server.search.criteria import page_size
from fhir_server.search.dates import date_range
from fhir_server.services.bundles import history_bundle, page_url
from fhir_server.storage.repository import ResourceRepository
from fhir_server.validation.resource import check_id, check_type

HISTORY_PARAMETERS = frozenset({"_count", "_since", "_at", "_cursor", "_format", "_pretty"})


class HistoryService:
    def __init__(self, repository: ResourceRepository, default_count: int, max_count: int) -> None:
        self.repository = repository
        self.default_count = default_count
        self.max_count = max_count

    async def history(
        self,
        base: str,
        params: list[tuple[str, str]],
        resource_type: str | None = None,
        resource_id: str | None = None,
        access: Policy = OPEN,
    ) -> dict[str, Any]:
        """One page of versions, newest first. Under a token, the versions it does not reach
        are left out of the page (a page may then hold fewer than `_count`)."""
        if resource_type is not None:
            check_type(resource_type)
            access.require(resource_type, "r" if resource_id else "s")
        if resource_id is not None:
            check_id(resource_id)
        values = dict(params)
        for name in values:
            if name not in HISTORY_PARAMETERS:
                raise BadRequest(f"Unknown history parameter '{name}'", expression=name)
        count = page_size(values.get("_count"), self.default_count, self.max_count)
        since = date_range(values["_since"], "_since")[0] if "_since" in values else None
        at = date_range(values["_at"], "_at") if "_at" in values else None
        page = await self.repository.history_page(
            resource_type=resource_type,
            resource_id=resource_id,
            since=since,
            at=at,
            count=count,
            cursor=values.get("_cursor"),
            # The audit trail grows with every request, reads too: it is read as AuditEvent
            # (type history and search), not among the changes to the records.
            leave_out=None if resource_type else "AuditEvent",
        )
        path = "/".join(p for p in (resource_type, resource_id, "_history") if p)
        self_url = page_url(base, path, params)
        next_url = page_url(base, path, params, _cursor=page.next_cursor) if page.next_cursor else None
        versions = page.versions
        if not access.open:
            # A deletion holds no content to judge: a patient/ token does not see it.
            versions = [v for v in versions if access.visible(v)]
        return history_bundle(base, versions, page.total if access.open else None, self_url, next_url)
