"""The search parameters of each resource type, read from the table built by `build_tables`."""

import hashlib
import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from fhir_server.search.paths import Path, compile_path

# Bumped when the indexer stores values differently, so `fhir-server reindex` redoes every document.
INDEX_FORMAT = "3"

# Parameters whose values come from the stored document rather than an expression.
SPECIAL = frozenset({"_id", "_lastUpdated"})


@dataclass(frozen=True)
class Component:
    code: str
    type: str
    path: Path


@dataclass(frozen=True)
class SearchParam:
    code: str
    type: str  # number, date, string, token, reference, composite, quantity, uri, special
    url: str
    documentation: str
    paths: tuple[Path, ...]
    targets: tuple[str, ...] = ()
    components: tuple[Component, ...] = ()

    @property
    def sortable(self) -> bool:
        return self.type in ("string", "token", "date", "number", "quantity", "reference", "uri")


@cache
def _tables() -> dict[str, Any]:
    text = resources.files("fhir_server").joinpath("data/search_parameters.json").read_text()
    return dict(json.loads(text))


@cache
def _choices() -> frozenset[str]:
    return frozenset(_tables()["choice_elements"])


def _param(code: str, raw: dict[str, Any]) -> SearchParam:
    choices = _choices()
    return SearchParam(
        code=code,
        type=raw["type"],
        url=raw["url"],
        documentation=raw["documentation"],
        paths=tuple(compile_path(p, choices=choices) for p in raw["expression"]),
        targets=tuple(raw.get("targets", ())),
        components=tuple(
            Component(c, t, compile_path(x, relative=True, choices=choices))
            for c, t, x in raw.get("components", ())
        ),
    )


@cache
def parameters(resource_type: str) -> dict[str, SearchParam]:
    """Every search parameter of `resource_type`, by code (empty for an unknown type)."""
    raw = _tables()["parameters"].get(resource_type, {})
    return {code: _param(code, spec) for code, spec in raw.items()}


@cache
def indexed_parameters(resource_type: str) -> tuple[SearchParam, ...]:
    """The parameters whose values are extracted when a resource is written."""
    return tuple(p for p in parameters(resource_type).values() if p.code not in SPECIAL)


def parameter(resource_type: str, code: str) -> SearchParam | None:
    return parameters(resource_type).get(code)


@cache
def patient_compartment() -> dict[str, tuple[str, ...]]:
    """Resource type → the parameters that make a resource part of a Patient's compartment."""
    return {t: tuple(p) for t, p in _tables()["patient_compartment"].items()}


@cache
def table_fingerprint(base_url: str = "") -> str:
    """Changes with the parameter table, the index format or the public base URL (absolute
    references to it are indexed as local): what `reindex` compares."""
    text = resources.files("fhir_server").joinpath("data/search_parameters.json").read_bytes()
    return hashlib.sha256(text + INDEX_FORMAT.encode() + base_url.encode()).hexdigest()[:12]


@cache
def _summaries() -> dict[str, Any]:
    return dict(json.loads(resources.files("fhir_server").joinpath("data/summary_elements.json").read_text()))


@cache
def summary_elements(resource_type: str) -> tuple[frozenset[str], frozenset[str]]:
    """(elements `_summary=true` keeps, mandatory elements), by JSON name, from the R4B models."""
    entry = _summaries().get(resource_type, {"summary": [], "required": []})
    return frozenset(entry["summary"]), frozenset(entry["required"])


def element_name(resource_type: str, key: str) -> str:
    """The element a JSON key belongs to: `deceasedBoolean` → `deceased`, `_birthDate` → `birthDate`."""
    key = key.removeprefix("_")
    return str(_summaries().get(resource_type, {}).get("choices", {}).get(key, key))
