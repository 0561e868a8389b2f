"""Operations: `$validate` (type and instance level, every mode) and `Patient/$everything`."""

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from conftest import FHIR_JSON, ServerProcess, assert_outcome, patient, post, put, unique

RUN = unique()
TAG_SYSTEM = "urn:test:operations"
TAG = {"system": TAG_SYSTEM, "code": RUN}


def tagged(resource: dict[str, Any]) -> dict[str, Any]:
    return {**resource, "meta": {"tag": [TAG]}}


def created(client: httpx.Client, resource: dict[str, Any]) -> dict[str, Any]:
    response = post(client, tagged(resource))
    assert response.status_code == 201, response.text
    return response.json()


def ref(resource: dict[str, Any]) -> str:
    return f"{resource['resourceType']}/{resource['id']}"


def count(client: httpx.Client, resource_type: str) -> int:
    response = client.get(f"/{resource_type}", params={"_tag": f"{TAG_SYSTEM}|{RUN}", "_summary": "count"})
    assert response.status_code == 200, response.text
    return int(response.json()["total"])


def history_total(client: httpx.Client) -> int:
    response = client.get("/_history", params={"_count": 0})
    assert response.status_code == 200, response.text
    return int(response.json()["total"])


def expressions(body: dict[str, Any]) -> list[str]:
    return [e for issue in body["issue"] for e in issue.get("expression", [])]


# -- $validate -----------------------------------------------------------------------------------


def validate(client: httpx.Client, path: str, body: dict[str, Any] | None = None, **params: str) -> httpx.Response:
    if body is None:
        return client.post(f"/{path}/$validate", params=params)
    return client.post(f"/{path}/$validate", json=body, params=params, headers={"Content-Type": FHIR_JSON})


def parameters(resource: dict[str, Any] | None = None, mode: str | None = None, profile: str | None = None) -> dict:
    found: list[dict[str, Any]] = []
    if resource is not None:
        found.append({"name": "resource", "resource": resource})
    if mode is not None:
        found.append({"name": "mode", "valueCode": mode})
    if profile is not None:
        found.append({"name": "profile", "valueUri": profile})
    return {"resourceType": "Parameters", "parameter": found}


def assert_valid(response: httpx.Response) -> dict[str, Any]:
    body = assert_outcome(response, 200)
    assert [i["severity"] for i in body["issue"]][0] == "information", body
    assert not [i for i in body["issue"] if i["severity"] in ("error", "fatal")], body
    return body


def test_validate_valid_content(client: httpx.Client) -> None:
    existing = created(client, patient(gender="male"))
    good = tagged(patient(gender="female", birthDate="1970-01-02", name=[{"family": "Valid"}]))
    assert_valid(validate(client, "Patient", good))
    assert_valid(validate(client, "Patient", good, mode="create"))
    assert_valid(validate(client, "Patient", {**good, "id": "any-id"}, mode="create"))  # ids are the server's
    assert_valid(validate(client, "Patient", parameters(good)))
    assert_valid(validate(client, "Patient", parameters(good, "create")))
    update = {**good, "id": existing["id"]}
    assert_valid(validate(client, f"Patient/{existing['id']}", update, mode="update"))
    assert_valid(validate(client, f"Patient/{existing['id']}", parameters(update, "update")))
    assert_valid(validate(client, "Patient", parameters(update, "update")))
    obs = {"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "valueQuantity": {"value": 1.5}}
    assert_valid(validate(client, "Observation", obs))


def test_validate_invalid_content_is_412_naming_the_element(client: httpx.Client) -> None:
    existing = created(client, patient())
    for path, body, params, element in [
        ("Patient", patient(gender="robot"), {}, "Patient.gender"),
        ("Patient", patient(birthDate="1970-13-45"), {"mode": "create"}, "Patient.birthDate"),
        ("Patient", patient(colour="blue"), {}, "Patient.colour"),
        ("Patient", patient(contact=[{"gender": "robot"}]), {}, "Patient.contact[0].gender"),
        ("Patient", parameters(patient(name=[{"given": ["Ann", ""]}]), "create"), {}, "Patient.name[0].given[1]"),
        ("Observation", {"resourceType": "Observation", "code": {"text": "x"}}, {}, "Observation.status"),
        (f"Patient/{existing['id']}", patient(id="someone-else"), {"mode": "update"}, "Patient.id"),
        (f"Patient/{existing['id']}", parameters(patient(id=existing["id"], gender="robot"), "update"), {},
         "Patient.gender"),
    ]:
        response = validate(client, path, body, **params)
        outcome = assert_outcome(response, 412)
        assert element in expressions(outcome), (path, body, outcome)
        assert any(i["severity"] == "error" for i in outcome["issue"])


def test_validate_unknown_mode_is_400(client: httpx.Client) -> None:
    assert_outcome(validate(client, "Patient", patient(), mode="bogus"), 400, "mode")
    assert_outcome(validate(client, "Patient", parameters(patient(), "bogus")), 400, "mode")


def test_validate_modes(client: httpx.Client) -> None:
    existing = created(client, patient())
    body = assert_valid(validate(client, f"Patient/{existing['id']}", mode="delete"))
    assert any(existing["id"] in i.get("diagnostics", "") for i in body["issue"])
    assert_valid(validate(client, f"Patient/{existing['id']}", parameters(mode="delete")))
    assert_outcome(validate(client, f"Patient/unknown-{unique()}", mode="delete"), 404)
    assert_outcome(validate(client, "Patient", mode="delete"), 400)
    assert_outcome(validate(client, "Patient", parameters(mode="create")), 400)  # no resource
    assert_outcome(validate(client, "NotAType", {"resourceType": "NotAType"}), 404)
    not_json = client.post("/Patient/$validate", content=b"{", headers={"Content-Type": FHIR_JSON})
    assert_outcome(not_json, 400)
    profiled = assert_outcome(validate(client, "Patient", parameters(
        patient(), profile="http://example.org/StructureDefinition/my-patient")), 200)
    assert {i["severity"] for i in profiled["issue"]} == {"information", "warning"}


def test_validate_stores_nothing(client: httpx.Client) -> None:
    existing = created(client, patient(gender="male"))
    before = count(client, "Patient"), count(client, "Observation"), history_total(client)
    obs = tagged({"resourceType": "Observation", "status": "final", "code": {"text": "x"}})
    for response in [
        validate(client, "Patient", tagged(patient())),
        validate(client, "Patient", parameters(tagged(patient()), "create")),
        validate(client, "Observation", obs, mode="create"),
        validate(client, f"Patient/{existing['id']}", tagged(patient(id=existing["id"], gender="female")), mode="update"),
        validate(client, f"Patient/new-{RUN}", tagged(patient(id=f"new-{RUN}")), mode="update"),
        validate(client, f"Patient/{existing['id']}", mode="delete"),
    ]:
        assert_valid(response)
    assert (count(client, "Patient"), count(client, "Observation"), history_total(client)) == before
    current = client.get(f"/Patient/{existing['id']}")
    assert current.status_code == 200
    assert current.json()["gender"] == "male" and current.json()["meta"]["versionId"] == "1"
    assert client.get(f"/Patient/new-{RUN}").status_code == 404


# -- $everything ---------------------------------------------------------------------------------


@dataclass
class Record:
    """Two patients' records and the resources they refer to."""

    patient: dict[str, Any]
    compartment: set[str]  # every resource of the patient's compartment, Patient included
    referenced: set[str]  # what they refer to outside the compartment
    other_patient: dict[str, Any]
    other_compartment: set[str]
    other_referenced: set[str]
    since: str  # lastUpdated of the first resource created


@pytest.fixture(scope="module")
def record(server: ServerProcess) -> Iterator[Record]:
    with httpx.Client(base_url=f"{server.url}/fhir", timeout=60) as client:
        organization = created(client, {"resourceType": "Organization", "name": f"Acme {RUN}"})
        practitioner = created(client, {"resourceType": "Practitioner", "name": [{"family": f"Doc {RUN}"}]})
        other_organization = created(client, {"resourceType": "Organization", "name": f"Other {RUN}"})
        other_practitioner = created(client, {"resourceType": "Practitioner", "name": [{"family": f"Other {RUN}"}]})
        person = created(client, patient(managingOrganization={"reference": ref(organization)},
                                          generalPractitioner=[{"reference": ref(practitioner)}]))
        other = created(client, patient(managingOrganization={"reference": ref(other_organization)}))

        def record_of(owner: dict[str, Any], doctor: dict[str, Any], place: dict[str, Any], size: int) -> set[str]:
            encounter = created(client, {
                "resourceType": "Encounter", "status": "finished", "class": {"code": "AMB"},
                "subject": {"reference": ref(owner)}, "participant": [{"individual": {"reference": ref(doctor)}}],
                "serviceProvider": {"reference": ref(place)},
            })
            members = {ref(owner), ref(encounter)}
            for n in range(size):
                members.add(ref(created(client, {
                    "resourceType": "Observation", "status": "final", "code": {"text": f"obs {n}"},
                    "subject": {"reference": ref(owner)}, "encounter": {"reference": ref(encounter)},
                    "performer": [{"reference": ref(doctor)}],
                })))
            members.add(ref(created(client, {
                "resourceType": "Condition", "subject": {"reference": ref(owner)},
                "encounter": {"reference": ref(encounter)}, "code": {"text": "a condition"},
            })))
            return members

        yield Record(
            patient=person,
            compartment=record_of(person, practitioner, organization, 4),
            referenced={ref(organization), ref(practitioner)},
            other_patient=other,
            other_compartment=record_of(other, other_practitioner, other_organization, 2),
            other_referenced={ref(other_organization), ref(other_practitioner)},
            since=organization["meta"]["lastUpdated"],
        )


def _refs(page: dict[str, Any], mode: str) -> list[str]:
    return [f"{e['resource']['resourceType']}/{e['resource']['id']}"
            for e in page.get("entry", []) if e["search"]["mode"] == mode]


def everything(client: httpx.Client, path: str, **params: str | int) -> dict[str, Any]:
    response = client.get(path, params=params or None)  # an empty mapping would drop the query
    assert response.status_code == 200, response.text
    page = response.json()
    assert page["resourceType"] == "Bundle" and page["type"] == "searchset"
    for e in page.get("entry", []):
        assert e["fullUrl"].endswith(f"/{e['resource']['resourceType']}/{e['resource']['id']}")
    return page


def _pages(client: httpx.Client, path: str, **params: str | int) -> list[dict[str, Any]]:
    pages = [everything(client, path, **params)]
    while True:
        nxt = [link["url"] for link in pages[-1]["link"] if link["relation"] == "next"]
        if not nxt:
            return pages
        assert len(pages) < 100
        pages.append(everything(client, nxt[0].split("/fhir", 1)[1]))


def test_everything_returns_the_compartment_and_what_it_refers_to(client: httpx.Client, record: Record) -> None:
    page = everything(client, f"/Patient/{record.patient['id']}/$everything")
    matches, included = _refs(page, "match"), _refs(page, "include")
    assert sorted(matches) == sorted(record.compartment)  # each once
    assert sorted(included) == sorted(record.referenced)
    assert page["total"] == len(record.compartment)
    foreign = record.other_compartment | record.other_referenced
    assert not foreign & (set(matches) | set(included))


def test_everything_type_filter(client: httpx.Client, record: Record) -> None:
    page = everything(client, f"/Patient/{record.patient['id']}/$everything", _type="Observation,Encounter")
    matches = _refs(page, "match")
    wanted = {r for r in record.compartment if r.split("/")[0] in ("Observation", "Encounter")}
    assert sorted(matches) == sorted(wanted) and page["total"] == len(wanted)
    assert set(_refs(page, "include")) == record.referenced  # performer, participant, serviceProvider
    only_conditions = everything(client, f"/Patient/{record.patient['id']}/$everything", _type="Condition")
    assert [r.split("/")[0] for r in _refs(only_conditions, "match")] == ["Condition"]


def test_everything_pages_through_every_resource_once(client: httpx.Client, record: Record) -> None:
    pages = _pages(client, f"/Patient/{record.patient['id']}/$everything", _count=2)
    assert len(pages) == -(-len(record.compartment) // 2)
    matches = [r for page in pages for r in _refs(page, "match")]
    assert all(len(_refs(page, "match")) <= 2 for page in pages)
    assert sorted(matches) == sorted(record.compartment)  # none repeated, none skipped
    included = {r for page in pages for r in _refs(page, "include")}
    assert included == record.referenced
    assert pages[0]["total"] == len(record.compartment)


def test_everything_since(client: httpx.Client) -> None:
    person = created(client, patient())
    old = [created(client, {"resourceType": "Observation", "status": "final", "code": {"text": f"old {n}"},
                            "subject": {"reference": ref(person)}}) for n in range(3)]
    time.sleep(0.05)
    changed = put(client, tagged({**old[0], "status": "amended"}))
    assert changed.status_code == 200, changed.text
    since = changed.json()["meta"]["lastUpdated"]
    new = created(client, {"resourceType": "Observation", "status": "final", "code": {"text": "new"},
                           "subject": {"reference": ref(person)}})
    page = everything(client, f"/Patient/{person['id']}/$everything", _since=since)
    assert sorted(_refs(page, "match")) == sorted([ref(old[0]), ref(new)])
    before_all = everything(client, f"/Patient/{person['id']}/$everything", _since="2000-01-01")
    assert len(_refs(before_all, "match")) == 5
    future = everything(client, f"/Patient/{person['id']}/$everything", _since="2999-01-01")
    assert "entry" not in future and future["total"] == 0


def test_everything_of_every_patient(client: httpx.Client, record: Record) -> None:
    pages = _pages(client, "/Patient/$everything", _since=record.since, _count=500)
    matches = [r for page in pages for r in _refs(page, "match")]
    assert len(matches) == len(set(matches))
    assert record.compartment <= set(matches) and record.other_compartment <= set(matches)
    included = {r for page in pages for r in _refs(page, "include")}
    assert (record.referenced | record.other_referenced) <= included
    assert not [r for r in matches if r.split("/")[0] in ("Organization", "Practitioner")]


def test_everything_errors(client: httpx.Client, record: Record) -> None:
    assert_outcome(client.get(f"/Patient/unknown-{unique()}/$everything"), 404)
    assert_outcome(client.get(f"/Patient/{record.patient['id']}/$everything", params={"colour": "blue"}), 400, "colour")
    assert_outcome(client.get("/Patient/$everything", params={"name": "x"}), 400, "name")
    assert_outcome(client.get(f"/Patient/{record.patient['id']}/$everything", params={"_count": "many"}), 400)
