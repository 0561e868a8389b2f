"""The `$ai-readiness` MeasureReport as the dashboard shows it: per site, the counts, the
shares, and each graded aspect's distribution, ready for a chart. Pure."""

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Site:
    name: str
    reference: str | None
    images: int = 0
    ready: int = 0
    patients: int = 0
    distributions: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def ready_share(self) -> float:
        return self.ready / self.images if self.images else 0.0

    @property
    def over_illuminated_share(self) -> float:
        over = self.distributions.get("over-illuminated", {})
        return over.get("Yes", 0) / self.images if self.images else 0.0


def _count(populations: list[dict[str, Any]], code: str) -> int:
    for population in populations:
        if any(c.get("code") == code for c in population.get("code", {}).get("coding", [])):
            return int(population.get("count", 0))
    return 0


def _label(value: dict[str, Any]) -> str:
    if value.get("text"):
        return str(value["text"])
    coding = (value.get("coding") or [{}])[0]
    return str(coding.get("display") or coding.get("code") or "?")


def sites(report: dict[str, Any]) -> list[Site]:
    """All sites first (its reference None), then each site in the report's order."""
    found = []
    for group in report.get("group", []):
        reference = None
        for extension in group.get("extension", []):
            reference = extension.get("valueReference", {}).get("reference", reference)
        site = Site(group.get("code", {}).get("text", "Site"), reference)
        populations = group.get("population", [])
        site.images, site.ready = _count(populations, "initial-population"), _count(populations, "numerator")
        site.patients = _count(populations, "assessed-patients")
        for stratifier in group.get("stratifier", []):
            aspect = ((stratifier.get("code") or [{}])[0].get("coding") or [{}])[0].get("code", "")
            site.distributions[aspect] = {_label(s.get("value", {})): _count(s.get("population", []),
                                                                               "initial-population")
                                          for s in stratifier.get("stratum", [])}
        found.append(site)
    return found


def charts(found: list[Site]) -> dict[str, dict[str, Any]]:
    """Plotly figure specs (data + layout) for the per-site charts: ready share, over-illuminated
    share, and the quality and anatomy distributions as stacked bars."""
    per_site = [s for s in found if s.reference is not None]
    names = [s.name for s in per_site]
    layout = {"barmode": "stack", "margin": {"l": 40, "r": 10, "t": 10, "b": 90}, "height": 300,
              "legend": {"orientation": "h", "y": 1.15}}
    specs: dict[str, dict[str, Any]] = {
        "shares": {"data": [
            {"type": "bar", "name": "AI-ready share", "x": names, "y": [round(s.ready_share, 4) for s in per_site]},
            {"type": "bar", "name": "Over-illuminated share", "x": names,
             "y": [round(s.over_illuminated_share, 4) for s in per_site]},
        ], "layout": {**layout, "barmode": "group", "yaxis": {"tickformat": ".0%", "range": [0, 1]}}},
    }
    for aspect in ("image-quality", "anatomy-score"):
        values: list[str] = []
        for s in per_site:
            values += [v for v in s.distributions.get(aspect, {}) if v not in values]
        specs[aspect] = {"data": [{"type": "bar", "name": v, "x": names,
                                   "y": [s.distributions.get(aspect, {}).get(v, 0) for s in per_site]}
                                  for v in values],
                         "layout": {**layout, "yaxis": {"title": {"text": "images"}}}}
    return specs
