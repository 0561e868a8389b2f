"""SMART on FHIR scopes: v2 and v1 forms, what they allow, patient confinement and granular
searches. Pure: no server."""

import pytest

from fhir_server.auth.scopes import Grants, Scope, ScopeError, parse_scope


@pytest.mark.parametrize(("text", "context", "resource_type", "permissions"), [
    ("patient/Observation.rs", "patient", "Observation", "rs"),
    ("user/*.cruds", "user", "*", "cruds"),
    ("system/Patient.c", "system", "Patient", "c"),
    ("patient/*.read", "patient", "*", "rs"),  # v1
    ("user/Encounter.write", "user", "Encounter", "cud"),  # v1
    ("system/*.*", "system", "*", "cruds"),  # v1
])
def test_resource_scopes(text: str, context: str, resource_type: str, permissions: str) -> None:
    scope = parse_scope(text)
    assert scope == Scope(context, resource_type, frozenset(permissions))  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["openid", "fhirUser", "launch/patient", "launch", "offline_access", "profile"])
def test_other_scopes_grant_no_resource_access(text: str) -> None:
    assert parse_scope(text) is None
    grants = Grants.parse(text)
    assert grants.other == {text} and not grants.access("Patient", "r").allowed


@pytest.mark.parametrize("text", [
    "patient/Observation.xyz", "patient/Observation.sr",  # out of order
    "patient/Observation.rr", "patient/Observation.", "user/observation.rs", "system/Patient",
    "patient/Observation.read?category=laboratory",  # a search narrows v2 scopes only
])
def test_malformed_resource_scopes(text: str) -> None:
    with pytest.raises(ScopeError):
        parse_scope(text)


def test_granular_scope_keeps_its_search() -> None:
    scope = parse_scope("patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory")
    assert scope is not None
    assert scope.search == (("category", "http://terminology.hl7.org/CodeSystem/observation-category|laboratory"),)
    assert scope.text == "patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory"


def test_access_by_type_and_permission() -> None:
    grants = Grants.parse("openid fhirUser patient/Observation.rs patient/Patient.r")
    assert grants.access("Observation", "r") == grants.access("Observation", "s")
    assert grants.access("Observation", "r").allowed and grants.access("Observation", "r").confined
    assert not grants.access("Observation", "c").allowed
    assert grants.access("Patient", "r").allowed and not grants.access("Patient", "s").allowed
    assert not grants.access("Condition", "r").allowed


def test_an_unconfined_scope_wins_over_patient_ones() -> None:
    grants = Grants.parse("patient/*.rs user/Observation.rs")
    assert not grants.access("Observation", "s").confined  # the user may see every Observation
    assert grants.access("Condition", "s").confined  # other types only in the patient's compartment


def test_granular_scopes_narrow_unless_a_whole_scope_allows() -> None:
    narrowed = Grants.parse("patient/Observation.rs?category=laboratory patient/Observation.rs?category=vital-signs")
    access = narrowed.access("Observation", "s")
    assert access.allowed and access.confined and access.narrowed == ((("category", "laboratory"),), (("category", "vital-signs"),))
    whole = Grants.parse("patient/Observation.rs?category=laboratory patient/Observation.r")
    assert whole.access("Observation", "r").narrowed == ()
    assert whole.access("Observation", "s").narrowed == ((("category", "laboratory"),),)
