"""Build `fhir_server/data/required_codes.json`: the closed code lists the server enforces.

    python -m fhir_server.validation.build_required_codes ../shared/fhir-r4/valuesets.json

The R4B models mark coded elements with `enum_values`, parsed from each element's short
description: sometimes complete (`male | female | other | unknown`), sometimes cut short with a
`+` (`registered | preliminary | final | amended +` for Observation.status) or an `etc.`. They
pick the elements; the codes come from the R4 value sets:

- the listed codes equal an R4 value set's codes: enforce that set;
- the list ends in `+`: enforce the one R4 value set that contains the listed codes, preferring
  the smallest and, among equals, the one named after the element; none or several: skip;
- anything else (`etc.`, no R4 value set): skip. Skipping never rejects a valid resource.

`SUPPLEMENT` names the few required bindings the models give no list for.
"""

import importlib
import json
import pkgutil
import re
import sys
from pathlib import Path
from typing import Any

import fhir.resources.R4B as r4b
from pydantic import BaseModel

OUTPUT = Path(__file__).resolve().parent.parent / "data" / "required_codes.json"
# Required bindings whose short descriptions carry no code list for the models to parse.
SUPPLEMENT = {
    f"{datatype}.comparator": "http://hl7.org/fhir/ValueSet/quantity-comparator"
    for datatype in ("Quantity", "Age", "Count", "Distance", "Duration")
}


def _codes_by_value_set(bundle: dict[str, Any]) -> dict[str, frozenset[str]]:
    systems: dict[str, set[str]] = {}
    value_sets: dict[str, dict[str, Any]] = {}
    for entry in bundle["entry"]:
        resource = entry["resource"]
        if resource["resourceType"] == "CodeSystem":
            codes: set[str] = set()
            stack = list(resource.get("concept", []))
            while stack:
                concept = stack.pop()
                codes.add(concept["code"])
                stack.extend(concept.get("concept", []))
            systems[resource["url"]] = codes
        elif resource["resourceType"] == "ValueSet":
            value_sets[resource["url"]] = resource

    def expand(value_set: dict[str, Any], seen: frozenset[str]) -> set[str]:
        codes: set[str] = set()
        for include in value_set.get("compose", {}).get("include", []):
            if include.get("filter"):
                return set()  # filtered sets are not expanded here: leave them unenforced
            if "concept" in include:
                codes |= {c["code"] for c in include["concept"]}
            elif "system" in include:
                codes |= systems.get(include["system"], set())
            for url in include.get("valueSet", []):
                if url in value_sets and url not in seen:
                    codes |= expand(value_sets[url], seen | {url})
        return codes

    return {url: frozenset(expand(vs, frozenset({url}))) for url, vs in value_sets.items()}


def _coded_elements() -> dict[str, list[str]]:
    elements: dict[str, list[str]] = {}
    for module_info in pkgutil.iter_modules(r4b.__path__):
        if module_info.name.startswith("tests"):
            continue
        try:
            module = importlib.import_module(f"{r4b.__name__}.{module_info.name}")
        except ImportError:
            continue
        for name, cls in vars(module).items():
            if not (isinstance(cls, type) and issubclass(cls, BaseModel) and cls.__module__ == module.__name__):
                continue
            for attr, field in cls.model_fields.items():
                extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
                if extra.get("enum_values"):
                    elements[f"{name}.{field.alias or attr}"] = list(extra["enum_values"])
    return elements


def _kebab(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "-", name).lower()


def build(value_set_bundle: dict[str, Any]) -> tuple[dict[str, list[str]], list[str]]:
    """(table, notes on the choices made for shortened lists)."""
    expansions = _codes_by_value_set(value_set_bundle)
    by_codes: dict[frozenset[str], str] = {codes: url for url, codes in expansions.items() if codes}
    table: dict[str, list[str]] = {}
    notes: list[str] = []
    for element, listed in sorted(_coded_elements().items()):
        shortened = listed[-1] == "+"
        codes = frozenset(c for c in listed if c != "+")
        if not shortened:
            if codes in by_codes:
                table[element] = sorted(codes)
            continue
        supersets = [(url, c) for url, c in expansions.items() if codes <= c]
        if not supersets:
            notes.append(f"skip {element}: no R4 value set holds {sorted(codes)}")
            continue
        smallest = min(len(c) for _, c in supersets)
        best = [(url, c) for url, c in supersets if len(c) == smallest]
        if len({c for _, c in best}) > 1:
            field = _kebab(element.split(".")[1])
            best = [(url, c) for url, c in best if url.rsplit("/", 1)[-1].endswith(field)]
        if len({c for _, c in best}) != 1:
            notes.append(f"skip {element}: several R4 value sets fit")
            continue
        url, chosen = best[0]
        table[element] = sorted(chosen)
        notes.append(f"{element}: {url} ({len(chosen)} codes)")
    for element, url in SUPPLEMENT.items():
        table[element] = sorted(expansions[url])
    return table, notes


def main() -> None:
    source = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/fhir-r4/valuesets.json")
    table, notes = build(json.loads(source.read_text()))
    OUTPUT.write_text(json.dumps(table, indent=0, sort_keys=True) + "\n")
    print("\n".join(notes))
    print(f"{len(table)} coded elements written to {OUTPUT}")


if __name__ == "__main__":
    main()
