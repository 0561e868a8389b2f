"""Chart figures (plotly JSON, drawn in the browser by static/charts.js): simple bars, and the
trend of each measurement a patient has more than once (vital signs, lab values; a panel such as
blood pressure as one line per component). Pure."""

from collections import defaultdict
from typing import Any

from fhir_server.console import fhir_text

MAX_TRENDS = 8
LAYOUT = {"margin": {"l": 45, "r": 10, "t": 10, "b": 40}, "height": 220, "showlegend": False}


def bar(labels: list[str], values: list[int]) -> dict[str, Any]:
    return {"data": [{"type": "bar", "x": labels, "y": values}], "layout": {**LAYOUT, "height": 200}}


def _points(observation: dict[str, Any]) -> list[tuple[str, float, str]]:
    """(series name, value, unit) of an Observation's quantities: its value, else its components'."""
    found = []
    if (number := fhir_text.numeric(observation)) is not None:
        found.append(("", number, observation["valueQuantity"].get("unit", "")))
    for component in observation.get("component") or []:
        if (number := fhir_text.numeric(component)) is not None:
            found.append((fhir_text.concept(component.get("code")), number, component["valueQuantity"].get("unit", "")))
    return found


def trend_charts(observations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One chart per measurement (by code) with at least two dated values, most values first."""
    series: dict[str, dict[str, list[tuple[str, float]]]] = defaultdict(lambda: defaultdict(list))
    titles: dict[str, str] = {}
    units: dict[str, str] = {}
    for observation in observations:
        when = fhir_text.effective(observation)
        key = fhir_text.code(observation.get("code"))
        if not when or not key:
            continue
        for name, number, unit in _points(observation):
            series[key][name].append((when, number))
            titles.setdefault(key, fhir_text.concept(observation.get("code")))
            units.setdefault(key, unit)
    charts = []
    for key, lines in series.items():
        if max(len(points) for points in lines.values()) < 2:
            continue
        data = []
        for name, points in lines.items():
            points.sort()
            data.append({"type": "scatter", "mode": "lines+markers", "name": name or titles[key],
                         "x": [p[0] for p in points], "y": [p[1] for p in points]})
        size = sum(len(points) for points in lines.values())
        charts.append((size, {"code": key, "title": f"{titles[key]} ({units[key]})" if units[key] else titles[key],
                              "figure": {"data": data, "layout": {**LAYOUT, "showlegend": len(data) > 1,
                                                                  "legend": {"orientation": "h", "y": 1.2}}}}))
    charts.sort(key=lambda c: -c[0])
    return [c for _, c in charts[:MAX_TRENDS]]
