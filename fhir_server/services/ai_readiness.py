"""`$ai-readiness`: how many of each screening site's retinal images are fit for automated
(AI) grading, as a FHIR `MeasureReport` of the `Measure` this service publishes.

The rule (settings `FHIR_AI_READY_QUALITY`, `FHIR_AI_READY_ANATOMY`,
`FHIR_AI_READY_ALLOW_OVER_ILLUMINATED`): an image is AI-ready when its grading records all three
aspects (quality, anatomy visibility, over-illumination), its quality and anatomy scores are
among the accepted ones and, unless allowed, it is not over-illuminated. The `Measure`
(`Measure/ai-readiness`, url `https://fhir-server.local/Measure/ai-readiness`) states the rule
in its description and as FHIR queries in its population criteria; its `version` is a digest of
the rule, and the service writes it (PUT) at its first call whenever the stored one differs.

The report (`type` summary): one `group` for all sites (not for the one-site operation), then
one per site, sorted by name, each with
- `code`: the measure's group code, with the site's name as `text`; the site itself in the R5
  `MeasureReport.group.subject` element, as its R4 cross-version extension;
- populations: initial population and denominator = graded images, numerator = AI-ready images,
  `assessed-patients` (our code) = patients with graded images; `measureScore` = the AI-ready
  share (0–1, left out when there are no images);
- stratifiers `image-quality`, `anatomy-score` and `over-illuminated`: one stratum per value
  (all values, zeros included; a `Not graded` stratum when some images lack that grade), each
  with its images, AI-ready images and their share. The distributions and the over-illuminated
  share are a stratum's count over the group's.

Sites: every Organization that is a retinal site (identifier system
`urn:fhir-server:source:retinal:site`), even without images, and any other Organization that
performed a grading. Optional parameters `periodStart` and `periodEnd` (date or dateTime) keep
the gradings made in that period; the report's period is theirs, else from the first to the
last grading.

The counting is one aggregation in the database (`fhir_server.search.readiness`). It reads every
grading (half a second for 2,000 images on the embedded database), so a report is kept in the
database (`CACHE`, shared by the server's processes) and served again, with its own `date`, while
no Observation or Organization has changed since it was counted: when some version stamped
after a moment `SETTLE` before the counting is current, or a multi-resource write is in flight,
it is counted again. A report counted less than `SETTLE` after a write is not kept (that write
may still have been on its way), nor one counted during a multi-resource write.
"""

import asyncio
import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from bson.errors import InvalidDocument
from pymongo.errors import PyMongoError

from fhir_server.config import Settings
from fhir_server.errors import BadRequest, Gone, NotFound
from fhir_server.search.criteria import Criterion, parse_criterion
from fhir_server.search.dates import date_range
from fhir_server.search.readiness import Aspect, grades_filter, readiness_pipeline
from fhir_server.services.resources import ResourceService
from fhir_server.services.search import SearchService
from fhir_server.storage.repository import SETTLE, ResourceRepository, Version
from mappings import retinal

LOGGER = logging.getLogger(__name__)
MEASURE_ID = "ai-readiness"
MEASURE_URL = "https://fhir-server.local/Measure/ai-readiness"
POPULATION_SYSTEM = "http://terminology.hl7.org/CodeSystem/measure-population"
SCORING_SYSTEM = "http://terminology.hl7.org/CodeSystem/measure-scoring"
IMPROVEMENT_SYSTEM = "http://terminology.hl7.org/CodeSystem/measure-improvement-notation"
GROUP_SUBJECT = "http://hl7.org/fhir/5.0/StructureDefinition/extension-MeasureReport.group.subject"
SITE_SYSTEM = retinal.source_system(retinal.SYSTEM, "site")
PARAMETERS = frozenset({"periodStart", "periodEnd", "_format", "_pretty"})
MAX_SITES = 10000
QUERY = "application/x-fhir-query"
CACHE = "ai_readiness_reports"
COUNTED = ("Observation", "Organization")  # what a report is counted from
KEPT = timedelta(minutes=10)  # a kept report is dropped (and counted again) after this

INCREASE = {"coding": [{"system": IMPROVEMENT_SYSTEM, "code": "increase", "display": "Increased score indicates improvement"}]}
GROUP_CODE = {"coding": [{"system": retinal.CODE_SYSTEM, "code": "ai-ready", "display": retinal.DISPLAY["ai-ready"]}]}
PATIENTS_CODE = {"coding": [{"system": retinal.CODE_SYSTEM, "code": "assessed-patients",
                             "display": retinal.DISPLAY["assessed-patients"]}]}
OVER = {"Y": retinal.YES, "N": retinal.NO}


def _population(code: str) -> dict[str, Any]:
    display = {"initial-population": "Initial Population", "denominator": "Denominator", "numerator": "Numerator"}
    return {"coding": [{"system": POPULATION_SYSTEM, "code": code, "display": display[code]}]}


def _grade_code(code: str) -> dict[str, Any]:
    return {"coding": [{"system": retinal.CODE_SYSTEM, "code": code, "display": retinal.DISPLAY[code]}]}


def _terms(setting: str, name: str, scale: dict[str, str]) -> tuple[str, ...]:
    terms = tuple(dict.fromkeys(t.strip().upper() for t in setting.split(",") if t.strip()))
    unknown = [t for t in terms if t not in scale]
    if not terms or unknown:
        raise ValueError(f"{name} must list some of {', '.join(scale)} (comma-separated), not '{setting}'")
    return terms


@dataclass(frozen=True)
class ReadinessRule:
    """Which images are AI-ready, in the retinal system's terms."""

    quality: tuple[str, ...] = ("ACCEPTABLE", "HIGH")
    anatomy: tuple[str, ...] = ("ACCEPTABLE", "GOOD")
    allow_over_illuminated: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> "ReadinessRule":
        """ValueError for a score the retinal system does not have."""
        return cls(
            _terms(settings.ai_ready_quality, "FHIR_AI_READY_QUALITY", retinal.QUALITY),
            _terms(settings.ai_ready_anatomy, "FHIR_AI_READY_ANATOMY", retinal.ANATOMY),
            settings.ai_ready_allow_over_illuminated,
        )

    def aspects(self) -> list[Aspect]:
        """The graded aspects with their codes, as the pipeline takes them."""
        return [
            Aspect("quality", tuple(retinal.QUALITY.values()), tuple(retinal.QUALITY[t] for t in self.quality)),
            Aspect("anatomy", tuple(retinal.ANATOMY.values()), tuple(retinal.ANATOMY[t] for t in self.anatomy)),
            Aspect("over", ("Y", "N"), ("Y", "N") if self.allow_over_illuminated else ("N",)),
        ]

    def text(self) -> str:
        """The rule in words: `quality is … and the image is not over-illuminated`."""
        over = "over-illumination does not matter" if self.allow_over_illuminated else "the image is not over-illuminated"
        return f"quality is {' or '.join(self.quality)}, anatomy visibility is {' or '.join(self.anatomy)} and {over}"

    @property
    def version(self) -> str:
        """A digest of the rule and of the Measure's definition (its revision): reports name
        the Measure version they applied."""
        return hashlib.sha256(f"{MEASURE_REVISION}:{self.text()}".encode()).hexdigest()[:12]


ASPECT_CODES = {"quality": retinal.IMAGE_QUALITY, "anatomy": retinal.ANATOMY_SCORE, "over": retinal.OVER_ILLUMINATED}


MEASURE_REVISION = 2  # 2: images counted by their gradings, Media or ImagingStudy
GRADING_QUERY = f"Observation?code={retinal.CODE_SYSTEM}|{retinal.GRADING}"


def _grades_query(aspect: Aspect) -> str:
    code = ASPECT_CODES[aspect.name]
    system = retinal.YES_NO_SYSTEM if aspect.name == "over" else retinal.CODE_SYSTEM
    values = ",".join(f"{retinal.CODE_SYSTEM}|{code}${system}|{v}" for v in aspect.ready)
    return f"component-code-value-concept={values}"


def ready_query(rule: ReadinessRule) -> str:
    """A search for the gradings of AI-ready images under `rule` (one grading per image,
    whether the image is a Media or a DICOM ImagingStudy)."""
    return GRADING_QUERY + "".join("&" + _grades_query(a) for a in rule.aspects())


def measure_resource(rule: ReadinessRule) -> dict[str, Any]:
    """The published Measure of `rule` (without `date`, which is set when it is written)."""
    description = (
        "Share of graded retinal photographs fit for automated (AI) grading, per screening site. "
        f"An image is AI-ready when its grading records all three aspects, its {rule.text()}. "
        "The rule is set by the server's FHIR_AI_READY_QUALITY, FHIR_AI_READY_ANATOMY and "
        "FHIR_AI_READY_ALLOW_OVER_ILLUMINATED settings; the Measure's version is a digest of it. "
        "Each image is counted by its grading Observation (one per image; the image itself is a Media, "
        "or the ImagingStudy of a DICOM file)."
    )
    graded = GRADING_QUERY
    return {
        "resourceType": "Measure",
        "id": MEASURE_ID,
        "url": MEASURE_URL,
        "version": rule.version,
        "name": "RetinalImageAiReadiness",
        "title": "AI readiness of retinal images",
        "status": "active",
        "experimental": False,
        "publisher": "fhir-server",
        "description": description,
        "subjectCodeableConcept": {"coding": [{"system": "http://hl7.org/fhir/resource-types", "code": "Observation"}]},
        "scoring": {"coding": [{"system": SCORING_SYSTEM, "code": "proportion", "display": "Proportion"}]},
        "improvementNotation": INCREASE,
        "group": [{
            "code": GROUP_CODE,
            "description": "Graded retinal images of a screening site (the report has one group per site), "
                           "the site being the grading Observation's performer.",
            "population": [
                {"code": _population("initial-population"), "description": "Graded images",
                 "criteria": {"language": QUERY, "expression": graded}},
                {"code": _population("denominator"), "description": "Graded images",
                 "criteria": {"language": QUERY, "expression": graded}},
                {"code": _population("numerator"), "description": f"AI-ready images: {rule.text()}",
                 "criteria": {"language": QUERY, "expression": ready_query(rule)}},
                {"code": PATIENTS_CODE, "description": "Patients with graded images",
                 "criteria": {"language": QUERY, "expression": f"Patient?_has:Observation:subject:code={retinal.CODE_SYSTEM}|{retinal.GRADING}"}},
            ],
            "stratifier": [
                {"code": _grade_code(retinal.IMAGE_QUALITY), "description": "Images by image quality"},
                {"code": _grade_code(retinal.ANATOMY_SCORE), "description": "Images by visibility of the retinal anatomy"},
                {"code": _grade_code(retinal.OVER_ILLUMINATED), "description": "Images by over-illumination"},
            ],
        }],
    }


def _content(resource: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resource.items() if k not in ("id", "meta", "date", "text")}


# -- counting ------------------------------------------------------------------------------------


@dataclass
class Tally:
    """One site's (or all sites') images, by the values of each aspect."""

    images: int = 0
    ready: int = 0
    patients: int = 0
    values: dict[str, Counter[str | None]] = field(default_factory=dict)
    ready_values: dict[str, Counter[str | None]] = field(default_factory=dict)
    first: str | None = None
    last: str | None = None

    def add(self, cell: dict[str, Any], aspects: list[Aspect]) -> None:
        key, images = cell["_id"], int(cell["images"])
        self.images += images
        self.ready += images if key.get("ready") else 0
        for aspect in aspects:
            value = key.get(aspect.name)
            self.values.setdefault(aspect.name, Counter())[value] += images
            if key.get("ready"):
                self.ready_values.setdefault(aspect.name, Counter())[value] += images
        for moment, keep in ((cell.get("first"), min), (cell.get("last"), max)):
            if isinstance(moment, str):
                attr = "first" if keep is min else "last"
                current = getattr(self, attr)
                setattr(self, attr, moment if current is None else keep(current, moment))


def fold(result: dict[str, Any], aspects: list[Aspect]) -> tuple[Tally, dict[str | None, Tally]]:
    """All sites' tally and each site's, from the pipeline's result document."""
    overall = Tally()
    sites: dict[str | None, Tally] = {}
    for cell in result.get("cells", []):
        site = cell["_id"].get("site")
        overall.add(cell, aspects)
        sites.setdefault(site, Tally()).add(cell, aspects)
    for row in result.get("sites", []):
        sites.setdefault(row["_id"], Tally()).patients = int(row["patients"])
    overall.patients = sum(int(row["patients"]) for row in result.get("patients", []))
    return overall, sites


def _score(ready: int, images: int) -> dict[str, Any]:
    return {"measureScore": {"value": round(ready / images, 4), "system": "http://unitsofmeasure.org", "code": "1"}} if images else {}


def _counts(images: int, ready: int) -> list[dict[str, Any]]:
    return [
        {"code": _population("initial-population"), "count": images},
        {"code": _population("denominator"), "count": images},
        {"code": _population("numerator"), "count": ready},
    ]


def _stratum_value(aspect: str, value: str | None) -> dict[str, Any]:
    if value is None:
        return {"text": "Not graded"}
    if aspect == "over":
        return {"coding": [OVER[value]]}
    return {"coding": [{"system": retinal.CODE_SYSTEM, "code": value, "display": retinal.DISPLAY.get(value, value)}]}


def _stratifier(aspect: Aspect, tally: Tally) -> dict[str, Any]:
    code = ASPECT_CODES[aspect.name]
    counts = tally.values.get(aspect.name, Counter())
    ready = tally.ready_values.get(aspect.name, Counter())
    values: list[str | None] = list(aspect.codes)
    values += sorted(v for v in counts if v not in aspect.codes and v is not None)
    if counts.get(None):
        values.append(None)
    return {
        "code": [_grade_code(code)],
        "stratum": [
            {"value": _stratum_value(aspect.name, v), "population": _counts(counts.get(v, 0), ready.get(v, 0)),
             **_score(ready.get(v, 0), counts.get(v, 0))}
            for v in values
        ],
    }


def _group(tally: Tally, aspects: list[Aspect], name: str, site: str | None) -> dict[str, Any]:
    group: dict[str, Any] = {}
    if site is not None:
        group["extension"] = [{"url": GROUP_SUBJECT, "valueReference": {"reference": site, "display": name}}]
    group["code"] = {**GROUP_CODE, "text": name}
    group["population"] = [*_counts(tally.images, tally.ready), {"code": PATIENTS_CODE, "count": tally.patients}]
    group.update(_score(tally.ready, tally.images))
    group["stratifier"] = [_stratifier(a, tally) for a in aspects]
    return group


def measure_report(
    rule: ReadinessRule,
    overall: Tally | None,
    sites: list[tuple[str | None, str, Tally]],
    period: dict[str, str],
    now: datetime,
) -> dict[str, Any]:
    """The MeasureReport: the all-sites group when `overall` is given, then `sites` (reference,
    name, tally) in that order."""
    aspects = rule.aspects()
    groups = [_group(overall, aspects, "All sites", None)] if overall is not None else []
    groups += [_group(tally, aspects, name, site) for site, name, tally in sites]
    return {
        "resourceType": "MeasureReport",
        "status": "complete",
        "type": "summary",
        "measure": f"{MEASURE_URL}|{rule.version}",
        "date": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "period": period,
        "improvementNotation": INCREASE,
        "group": groups,
    }


# -- the service ---------------------------------------------------------------------------------


def _parameters(params: list[tuple[str, str]], body: Any) -> dict[str, str]:
    """`periodStart`/`periodEnd` from the query string and a `Parameters` body."""
    found: dict[str, str] = {}
    for name, value in params:
        if name not in PARAMETERS:
            raise BadRequest(f"$ai-readiness does not take the parameter '{name}'", expression=name)
        found[name] = value
    if body is not None:
        if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
            raise BadRequest("The body of $ai-readiness must be a Parameters resource", expression="resourceType")
        for index, parameter in enumerate(body.get("parameter") or []):
            name = parameter.get("name") if isinstance(parameter, dict) else None
            value = next((parameter[k] for k in ("valueDate", "valueDateTime", "valueString") if k in parameter), None) \
                if isinstance(parameter, dict) else None
            if name not in ("periodStart", "periodEnd") or not isinstance(value, str):
                raise BadRequest(f"Parameters.parameter[{index}]: expected periodStart or periodEnd with a date",
                                 expression=f"Parameters.parameter[{index}]")
            found[name] = value
    ranges = {name: date_range(found[name], name) for name in ("periodStart", "periodEnd") if name in found}  # BadRequest: no date
    if len(ranges) == 2 and ranges["periodStart"][0] > ranges["periodEnd"][1]:
        raise BadRequest(f"periodStart {found['periodStart']} is after periodEnd {found['periodEnd']}",
                         expression="periodStart")
    return found


class AiReadinessService:
    def __init__(
        self, repository: ResourceRepository, resources: ResourceService, searches: SearchService, rule: ReadinessRule
    ) -> None:
        self.repository = repository
        self.resources = resources
        self.searches = searches
        self.rule = rule
        self._measure_written = False
        self._cache_indexed = False
        self._lock = asyncio.Lock()

    async def ensure_measure(self) -> None:
        """Write the Measure of the current rule once per process, if the stored one differs."""
        if self._measure_written:
            return
        async with self._lock:
            if self._measure_written:
                return
            wanted = measure_resource(self.rule)
            try:
                current: dict[str, Any] | None = (await self.resources.read("Measure", MEASURE_ID)).resource
            except (NotFound, Gone):
                current = None
            if current is None or _content(current) != _content(wanted):
                wanted["date"] = datetime.now(UTC).date().isoformat()
                await self.resources.update("Measure", MEASURE_ID, wanted)
            self._measure_written = True

    async def report(self, organization_id: str | None, params: list[tuple[str, str]], body: Any = None) -> dict[str, Any]:
        """The MeasureReport over every site, or over one (`Organization/{id}/$ai-readiness`):
        the kept one while nothing it counts has changed."""
        values = _parameters(params, body)
        site = await self.resources.read("Organization", organization_id) if organization_id is not None else None
        await self.ensure_measure()
        key = "|".join([self.rule.version, organization_id or "", *(values.get(n, "") for n in ("periodStart", "periodEnd"))])
        cache = self.repository.db[CACHE]
        kept = await cache.find_one({"_id": key})
        now = datetime.now(UTC)
        if kept is not None and kept["exp"].replace(tzinfo=UTC) > now \
                and not await self.repository.changed_since(COUNTED, kept["since"].replace(tzinfo=UTC)):
            return kept["report"]
        since = now - SETTLE
        settled = not await self.repository.changed_since(COUNTED, since)
        report = await self._counted(site, values)
        if settled:
            try:
                if not self._cache_indexed:
                    await cache.create_index("exp", expireAfterSeconds=0)
                    self._cache_indexed = True
                await cache.replace_one({"_id": key}, {"since": since, "exp": now + KEPT, "report": report}, upsert=True)
            except (PyMongoError, InvalidDocument) as exc:  # too large a report to keep (thousands of sites)
                LOGGER.warning("$ai-readiness: report not kept (%s)", exc)
        return report

    async def _counted(self, site: Version | None, values: dict[str, str]) -> dict[str, Any]:
        aspects = self.rule.aspects()
        overall: Tally | None = None
        if site is not None:
            reference = f"Organization/{site.id}"
            tally = fold(await self._count(site, values), aspects)[1].get(reference, Tally())
            groups: list[tuple[str | None, str, Tally]] = [(reference, _name(site), tally)]
            first, last = tally.first, tally.last
        else:
            result, known = await asyncio.gather(self._count(None, values), self._known_sites())
            overall, tallies = fold(result, aspects)
            groups = await self._sites(known, tallies)
            first, last = overall.first, overall.last
        now = datetime.now(UTC)
        today = now.date().isoformat()
        start = values.get("periodStart") or first or today
        period = {"start": start, "end": values.get("periodEnd") or last or start}
        return measure_report(self.rule, overall, groups, period, now)

    async def _count(self, site: Version | None, values: dict[str, str]) -> dict[str, Any]:
        kinds = parse_criterion("Observation", "code", f"{retinal.CODE_SYSTEM}|{retinal.GRADING}")
        performer = parse_criterion("Observation", "performer", f"Organization/{site.id}") if site else None
        others: list[Criterion] = []
        if "periodStart" in values:
            others.append(parse_criterion("Observation", "date", "ge" + values["periodStart"]))
        if "periodEnd" in values:
            others.append(parse_criterion("Observation", "date", "le" + values["periodEnd"]))
        assert kinds is not None and all(c is not None for c in others)
        match = grades_filter(kinds, performer, others, self.repository.base_url, embedded=self.repository.embedded)
        found = await self.repository.aggregate("Observation", readiness_pipeline(match, self.rule.aspects()))
        return found[0] if found else {}

    async def _known_sites(self) -> dict[str, Version]:
        """The retinal sites (Organizations with a site identifier), by reference."""
        criterion = parse_criterion("Organization", "identifier", f"{SITE_SYSTEM}|")
        assert criterion is not None
        return {f"Organization/{v.id}": v for v in await self.searches.matches("Organization", [criterion], limit=MAX_SITES)}

    async def _sites(self, known: dict[str, Version], tallies: dict[str | None, Tally]) -> list[tuple[str | None, str, Tally]]:
        """Every retinal site and every other performer, sorted by name; grades without a
        performer last."""
        others = [ref.split("/", 1)[1] for ref in tallies if ref and ref not in known and ref.startswith("Organization/")]
        known = {**known, **{f"Organization/{v.id}": v for v in await self.repository.fetch("Organization", others)}}
        groups: list[tuple[str | None, str, Tally]] = [
            (reference, _name(version), tallies.get(reference, Tally())) for reference, version in known.items()
        ]
        groups += [(ref, ref, tally) for ref, tally in tallies.items() if ref is not None and ref not in known]
        groups.sort(key=lambda g: (g[1].casefold(), g[0] or ""))
        if None in tallies:
            groups.append((None, "Site not recorded", tallies[None]))
        return groups


def _name(version: Version) -> str:
    resource = version.resource or {}
    name = resource.get("name")
    return name if isinstance(name, str) and name else f"Organization/{version.id}"
