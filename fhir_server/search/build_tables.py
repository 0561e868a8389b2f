"""Build `fhir_server/data/search_parameters.json` and `summary_elements.json`.

    python -m fhir_server.search.build_tables ../shared/fhir-r4

From the R4 definitions: every search parameter per resource type (type, the parts of its
FHIRPath expression that apply to that type, targets, composite components, documentation) and
the Patient compartment; from the R4B models: each type's summary and mandatory elements, for
`_summary`. The server reads only the generated files.
"""

import importlib
import json
import pkgutil
import sys
from pathlib import Path
from typing import Any

import fhir.resources.R4B as r4b
from pydantic import BaseModel

from fhir_server.search.paths import UnsupportedExpression, compile_path
from fhir_server.validation.resource_types import model_class, supported_types

DATA = Path(__file__).resolve().parent.parent / "data"
# Searches this server leaves out: they need a text index, a query language or the narrative.
UNSUPPORTED = {"_text", "_content", "_query"}


def _parts_for(expression: str, resource_type: str, bases: list[str]) -> list[str]:
    """The union members of `expression` that start at `resource_type` (or at any resource)."""
    parts = []
    for part in expression.split(" | "):
        part = part.strip()
        head = part.lstrip("(").split(".", 1)[0]
        if head == resource_type or (head in ("Resource", "DomainResource") and head in bases):
            parts.append(part)
    return parts


def _documentation(description: str, resource_type: str) -> str:
    """A shared parameter's description has one line per type: `* [Type](…): text`."""
    for line in description.splitlines():
        if line.startswith(f"* [{resource_type}]"):
            return line.split("): ", 1)[-1].strip()
    return description.splitlines()[0].strip() if description else ""


def _compiles(entry: dict[str, Any]) -> bool:
    try:
        for part in entry["expression"]:
            compile_path(part)
        for _code, _type, expression in entry.get("components", ()):
            compile_path(expression, relative=True)
    except UnsupportedExpression:
        return False
    return True


def build_parameters(definitions: Path) -> dict[str, Any]:
    bundle = json.loads((definitions / "search-parameters.json").read_text())
    by_url = {e["resource"]["url"]: e["resource"] for e in bundle["entry"]}
    types = sorted(supported_types())
    table: dict[str, dict[str, Any]] = {t: {} for t in types}
    skipped: set[str] = set()
    for sp in by_url.values():
        if sp["code"] in UNSUPPORTED or not sp.get("expression"):
            continue
        for base in sp["base"]:
            targets = types if base in ("Resource", "DomainResource") else [base]
            for resource_type in targets:
                if resource_type not in table:
                    continue
                parts = _parts_for(sp["expression"], resource_type, sp["base"])
                if not parts:
                    continue
                entry: dict[str, Any] = {
                    "type": sp["type"],
                    "expression": parts,
                    "url": sp["url"],
                    "documentation": _documentation(sp.get("description", ""), resource_type),
                }
                if sp.get("target"):
                    entry["targets"] = sorted(sp["target"])
                if sp.get("component"):
                    entry["components"] = [
                        [by_url[c["definition"]]["code"], by_url[c["definition"]]["type"], c["expression"]]
                        for c in sp["component"]
                    ]
                if _compiles(entry):
                    table[resource_type][sp["code"]] = entry
                else:
                    skipped.add(sp["code"])
    compartment = json.loads((definitions / "compartmentdefinition-patient.json").read_text())
    members = {
        r["code"]: r["param"] for r in compartment["resource"] if r.get("param") and r["code"] in table
    }
    if skipped:
        print(f"left out (expressions outside the compiled shapes): {', '.join(sorted(skipped))}")
    return {"parameters": table, "patient_compartment": members, "choice_elements": build_choice_elements()}


def build_choice_elements() -> list[str]:
    """Names of the choice elements (`value[x]`, `deceased[x]`, …) of every R4B model: a path
    step finds `valueQuantity` for `value` only when `value` is one of them."""
    names: set[str] = set()
    for info in pkgutil.iter_modules(r4b.__path__):
        module = importlib.import_module(f"{r4b.__name__}.{info.name}")
        for model in vars(module).values():
            if isinstance(model, type) and issubclass(model, BaseModel):
                for field in model.model_fields.values():
                    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
                    if isinstance(extra.get("one_of_many"), str):
                        names.add(extra["one_of_many"])
    return sorted(names)


def build_summaries() -> dict[str, dict[str, Any]]:
    """Per type: the elements `_summary=true` keeps, the mandatory ones `text` keeps, and the
    choice elements' JSON names (`deceasedBoolean` → `deceased`) for `_elements`."""
    out = {}
    for resource_type in sorted(supported_types()):
        model = model_class(resource_type)
        assert model is not None
        summary, required, choices = [], [], {}
        for field in model.model_fields.values():
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            if not extra.get("element_property") or not field.alias:
                continue
            if isinstance(extra.get("one_of_many"), str):
                choices[field.alias] = extra["one_of_many"]
            if extra.get("summary_element_property"):
                summary.append(field.alias)
            if extra.get("element_required") or field.is_required() or extra.get("one_of_many_required"):
                required.append(field.alias)
        out[resource_type] = {"summary": summary, "required": required, "choices": choices}
    return out


def main(argv: list[str]) -> None:
    definitions = Path(argv[1]) if len(argv) > 1 else Path("../shared/fhir-r4")
    parameters = build_parameters(definitions)
    (DATA / "search_parameters.json").write_text(json.dumps(parameters, separators=(",", ":"), sort_keys=True) + "\n")
    (DATA / "summary_elements.json").write_text(json.dumps(build_summaries(), separators=(",", ":"), sort_keys=True) + "\n")
    count = sum(len(p) for p in parameters["parameters"].values())
    print(f"{count} parameters over {len(parameters['parameters'])} types")


if __name__ == "__main__":
    main(sys.argv)
