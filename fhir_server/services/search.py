"""Type-level search: criteria → repository → searchset Bundle with paging links."""

from typing import Any

from fhir_server.search.criteria import CONTROL_PARAMETERS, parse_criteria
from fhir_server.services.bundles import page_url, searchset_bundle
from fhir_server.services.history import non_negative, page_size
from fhir_server.storage.repository import ResourceRepository
from fhir_server.validation.resource import check_type


class SearchService:
    def __init__(self, repository: ResourceRepository, default_count: int, max_count: int) -> None:
        self.repository = repository
        self.default_count = default_count
        self.max_count = max_count

    async def search(
        self, base: str, resource_type: str, params: list[tuple[str, str]], *, strict: bool
    ) -> dict[str, Any]:
        """Unknown parameters are errors with `strict`, else ignored and left out of `self`."""
        check_type(resource_type)
        values = dict(params)
        count = page_size(values.get("_count"), self.default_count, self.max_count)
        offset = non_negative(values.get("_offset"), "_offset", 0)
        criteria = parse_criteria(params, strict=strict)
        used = {c.name for c in criteria} | {"_count", "_offset"}
        kept = [(k, v) for k, v in params if k in used or k in CONTROL_PARAMETERS]
        total = await self.repository.count(resource_type, criteria)
        found = await self.repository.find(resource_type, criteria, limit=count, skip=offset)
        self_url = page_url(base, resource_type, kept)
        next_url = None
        if count and offset + count < total:
            next_url = page_url(base, resource_type, kept, _offset=str(offset + count), _count=str(count))
        return searchset_bundle(base, found, total, self_url, next_url)
