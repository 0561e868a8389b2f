"""The retinal image manager: its mapping (`mappings/retinal.py`) against golden FHIR JSON
(`tests/data/retinal/golden/`), every resource valid, the rejections, the generator
(`mappings/retinal_generate.py`), the sample imported through the server with the searches that
replace the system's screens, and `$ai-readiness` against counts made from the generated records
alone (10 sites, 40 patients, about 150 images; its speed on 500 patients is bench/console.py's).

Set RETINAL_GOLDEN_UPDATE=1 to rewrite the golden files from the mapping (then read the diff).
"""

import base64
import io
import os
import re
import struct
import time
import zlib
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from conftest import FHIR_JSON, ServerProcess, assert_outcome
from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from dicom_node.sender import StoreSender
from fhir_server import fhir_json
from fhir_server.config import Settings
from fhir_server.importer import Destination, import_files
from fhir_server.services.ai_readiness import MEASURE_URL, ReadinessRule, measure_resource
from fhir_server.storage.embedded import EmbeddedDatabase
from fhir_server.validation.resource import validate_resource
from mappings import retinal
from mappings.records import code_system_entry
from mappings.retinal_generate import OPHTHALMIC_PHOTOGRAPHY_8BIT, expected_readiness, generate

DATA = Path(__file__).parent / "data" / "retinal"
GOLDEN = DATA / "golden"
SAMPLE: dict[str, list[dict[str, Any]]] = fhir_json.loads((DATA / "retinal.json").read_bytes())
KIND_OF = {"sites": "site", "patients": "patient", "images": "image"}
GOLDEN_RECORDS = {"site": ("site", 1), "patient": ("patient", 7), "image-png": ("image", 11),
                  "image-dicom": ("image", 12), "image-inline": ("image", 13)}
PLACEHOLDER = re.compile(r"urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
CS = retinal.CODE_SYSTEM
YES_NO = retinal.YES_NO_SYSTEM
SNOMED = "http://snomed.info/sct"
GENERATED_SEED = 2024


# -- helpers ------------------------------------------------------------------------------------


def records(kind: str) -> list[dict[str, Any]]:
    return next(items for name, items in SAMPLE.items() if KIND_OF[name] == kind)


def with_file(data: dict[str, Any]) -> dict[str, Any]:
    """The record as the importer hands it over: the file it names read into `image`."""
    if "file_path" in data:
        return {**data, "image": (DATA / data["file_path"]).read_bytes()}
    return data


def entries_of(kind: str, data: dict[str, Any]) -> list[dict[str, Any]]:
    return retinal.bundle_entries(kind, retinal.KINDS[kind].model_validate(with_file(data)))


def sample_record(kind: str, source_id: object) -> dict[str, Any]:
    return next(r for r in records(kind) if r["id"] == source_id)


def normalised(value: Any) -> Any:
    """`urn:uuid:` placeholders as urn:uuid:placeholder-1, -2… in order of first appearance."""
    text = fhir_json.dumps(value).decode()
    tokens: dict[str, str] = {}
    text = PLACEHOLDER.sub(lambda m: tokens.setdefault(m.group(0), f"urn:uuid:placeholder-{len(tokens) + 1}"), text)
    return fhir_json.loads(text.encode())


def valid(resource: dict[str, Any]) -> dict[str, Any]:
    """`resource` after the server's checks and its R4B model both accepted it."""
    validate_resource(resource, resource["resourceType"], ignore_id=True)
    get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    return resource


def transaction(client: httpx.Client, entries: list[dict[str, Any]]) -> httpx.Response:
    body = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    return client.post("", content=fhir_json.dumps(body), headers={"Content-Type": FHIR_JSON, "Prefer": "return=minimal"})


def load(client: httpx.Client, generated: dict[str, list[dict[str, Any]]], dicom: StoreSender, per_bundle: int = 40) -> None:
    """The code systems, then the records kind by kind, several records per transaction; the
    DICOM images to the node, as the importer sends them (one association, released at the end:
    once all are indexed)."""
    assert transaction(client, [code_system_entry(cs) for cs in retinal.CODE_SYSTEMS]).status_code == 200
    with dicom:
        for kind, model in retinal.KINDS.items():
            items = [model.model_validate(data) for data in generated.get(kind, [])]
            for record in items:
                for instance in retinal.dicom_instances(kind, record):
                    assert dicom.send(instance.data) == 0
            for start in range(0, len(items), per_bundle):
                entries = [e for record in items[start:start + per_bundle] for e in retinal.bundle_entries(kind, record)]
                response = transaction(client, entries)
                assert response.status_code == 200, response.text[:2000]


def one(client: httpx.Client, query: str) -> dict[str, Any]:
    bundle = client.get(query).json()
    assert bundle.get("total") == 1, bundle
    return bundle["entry"][0]["resource"]


def search(client: httpx.Client, query: str) -> dict[str, Any]:
    response = client.get(query)
    assert response.status_code == 200, response.text
    return response.json()


def identifier(kind: str, source_id: object) -> str:
    return f"identifier=urn:fhir-server:source:retinal:{kind}|{source_id}"


# -- the mapping --------------------------------------------------------------------------------


def test_kinds_in_import_order_and_code_system() -> None:
    assert list(retinal.KINDS) == ["site", "patient", "image"]
    assert retinal.FILES == {"image": ("file_path", "image")}
    [code_system] = retinal.CODE_SYSTEMS
    valid(code_system)
    codes = {c["code"] for c in code_system["concept"]}
    assert {retinal.GRADING, *retinal.GRADES, *retinal.QUALITY.values(), *retinal.ANATOMY.values()} <= codes
    assert code_system["count"] == len(codes) == len(code_system["concept"])


@pytest.mark.parametrize("name", sorted(GOLDEN_RECORDS))
def test_golden(name: str) -> None:
    kind, source_id = GOLDEN_RECORDS[name]
    found = normalised(entries_of(kind, sample_record(kind, source_id)))
    path = GOLDEN / f"{name}.json"
    if os.environ.get("RETINAL_GOLDEN_UPDATE"):
        path.write_bytes(fhir_json.dumps(found, pretty=True) + b"\n")
    assert found == fhir_json.loads(path.read_bytes())


def test_image_entries_in_detail() -> None:
    """The PNG image: Binary (conditional on `_source`), Media pointing at it, its grading."""
    binary, media, grading = entries_of("image", sample_record("image", 11))
    png = (DATA / "fundus_right.png").read_bytes()
    assert binary["request"] == {"method": "PUT", "url": "Binary?_source=urn:fhir-server:source:retinal:image:11"}
    assert binary["resource"]["meta"] == {"source": "urn:fhir-server:source:retinal:image:11"}
    assert base64.b64decode(binary["resource"]["data"]) == png
    assert binary["resource"]["contentType"] == "image/png"
    content = media["resource"]["content"]
    assert content["url"] == binary["fullUrl"] and content["size"] == len(png) and content["title"] == "fundus_right.png"
    assert (media["resource"]["width"], media["resource"]["height"]) == (16, 16)
    assert media["resource"]["bodySite"]["coding"] == [{"system": SNOMED, "code": "18944008", "display": "Right eye structure"}]
    assert media["resource"]["bodySite"]["extension"][0]["valueCoding"]["code"] == "419465000"
    assert media["resource"]["operator"] == {"reference": "Organization?identifier=urn:fhir-server:source:retinal:site|1"}
    resource = grading["resource"]
    assert grading["request"]["url"] == "Observation?identifier=urn:fhir-server:source:retinal:grading|11"
    assert resource["code"]["coding"][0]["code"] == "image-grading"
    assert [(c["code"]["coding"][0]["code"], c["valueCodeableConcept"]["coding"][0]["code"]) for c in resource["component"]] \
        == [("image-quality", "quality-high"), ("anatomy-score", "anatomy-good"), ("over-illuminated", "N")]
    assert resource["component"][2]["valueCodeableConcept"]["coding"][0]["system"] == YES_NO
    assert resource["derivedFrom"] == [{"reference": media["fullUrl"]}]
    assert resource["performer"] == [media["resource"]["operator"]]
    assert resource["subject"] == media["resource"]["subject"]
    assert resource["effectiveDateTime"] == "2024-03-05T09:40:02Z"


def test_dicom_image_goes_to_the_node_and_its_grading_points_at_the_study() -> None:
    """A DICOM image is no Media: the file goes to the DICOM node with the record's patient set
    (and the eye and body part the header lacks added); the grading points at its ImagingStudy."""
    data = with_file(sample_record("image", 12))
    original = pydicom.dcmread(io.BytesIO(data["image"]))
    record = retinal.Image.model_validate(data)
    [grading] = retinal.bundle_entries("image", record)
    assert grading["resource"]["derivedFrom"] == [{"reference": f"ImagingStudy/{original.StudyInstanceUID}",
                                                    "identifier": {"system": "urn:dicom:uid",
                                                                   "value": f"urn:oid:{original.SOPInstanceUID}"}}]
    assert grading["resource"]["bodySite"]["coding"][0]["code"] == "8966001"
    [instance] = retinal.dicom_instances("image", record)
    assert instance.patient == {"system": "urn:fhir-server:source:retinal:patient", "value": "7"}
    sent = pydicom.dcmread(io.BytesIO(instance.data))
    assert (sent.PatientID, sent.IssuerOfPatientID) == ("7", "urn:fhir-server:source:retinal:patient")
    assert sent.ImageLaterality == "L" and sent.BodyPartExamined == "EYE"
    assert sent.SOPInstanceUID == original.SOPInstanceUID and sent.PixelData == original.PixelData
    # A header without laterality or body part gets them from the record; one that has them keeps them.
    del original.ImageLaterality, original.BodyPartExamined
    buffer = io.BytesIO()
    original.save_as(buffer, enforce_file_format=True)
    [instance] = retinal.dicom_instances("image", retinal.Image.model_validate({**data, "image": buffer.getvalue()}))
    sent = pydicom.dcmread(io.BytesIO(instance.data))
    assert sent.ImageLaterality == "L" and sent.BodyPartExamined == "EYE"
    assert retinal.dicom_instances("image", retinal.Image.model_validate(with_file(sample_record("image", 11)))) == []


def test_a_dicom_header_must_name_the_records_patient_exactly() -> None:
    """A patient id the header cannot hold as it is (a backslash separates DICOM values; at most
    64 characters) is refused, not sent for another patient; an issuer sequence naming another
    issuer is dropped, or the node would look the patient up elsewhere."""
    data = with_file(sample_record("image", 12))
    for bad in ("A\\B", "x" * 65, "caf\u00e9"):
        with pytest.raises(ValueError, match="cannot go in a DICOM header"):
            retinal.dicom_instances("image", retinal.Image.model_validate({**data, "patient_id": bad}))
    ds = pydicom.dcmread(io.BytesIO(data["image"]))
    qualifier = pydicom.Dataset()
    qualifier.UniversalEntityID, qualifier.UniversalEntityIDType = "1.2.3.4", "ISO"
    ds.IssuerOfPatientID = "urn:fhir-server:source:retinal:patient"
    ds.IssuerOfPatientIDQualifiersSequence = [qualifier]
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    [instance] = retinal.dicom_instances("image", retinal.Image.model_validate({**data, "image": buffer.getvalue()}))
    assert "IssuerOfPatientIDQualifiersSequence" not in pydicom.dcmread(io.BytesIO(instance.data))


def test_a_malformed_dicom_header_is_a_refusal() -> None:
    ds = pydicom.dcmread(io.BytesIO(with_file(sample_record("image", 12))["image"]))
    ds.NumberOfFrames = ["2", "3"]  # multi-valued
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    with pytest.raises(ValueError, match="image: the DICOM file cannot be read"):
        record = {k: v for k, v in sample_record("image", 12).items() if k != "file_path"}
        entries_of("image", {**record, "image": base64.b64encode(buffer.getvalue()).decode()})


def test_every_resource_is_valid() -> None:
    for name, items in SAMPLE.items():
        for data in items:
            for entry in entries_of(KIND_OF[name], data):
                valid(entry["resource"])
    generated = generate(3, 12, 4, seed=11)
    for kind in retinal.KINDS:
        for data in generated[kind]:
            for entry in entries_of(kind, data):
                valid(entry["resource"])


def test_csv_strings_map_as_their_json_twins() -> None:
    """CSV cells are strings: ids, booleans and dates parse to the same resources."""
    data = sample_record("image", 11)
    as_csv = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in data.items()}
    assert normalised(entries_of("image", as_csv)) == normalised(entries_of("image", data))


@pytest.mark.parametrize(("kind", "change", "field"), [
    ("site", {"name": None}, "name"),
    ("site", {"name": "  "}, "name"),
    ("site", {"colour": "blue"}, "colour"),
    ("patient", {"sex": "M"}, "sex"),
    ("patient", {"birth_date": "1961-02-30"}, "birth_date"),
    ("patient", {"birth_date": None}, "birth_date"),
    ("image", {"eye_side": "CENTRE"}, "eye_side"),
    ("image", {"quality_score": "MEDIUM"}, "quality_score"),
    ("image", {"anatomy_score": "FAIR"}, "anatomy_score"),
    ("image", {"over_illuminated": "perhaps"}, "over_illuminated"),
    ("image", {"acquisition_date": "yesterday"}, "acquisition_date"),
    ("image", {"acquisition_date": "2024-02-30T10:00:00Z"}, "acquisition_date"),
    ("image", {"patient_id": None}, "patient_id"),
    ("image", {"site_id": None}, "site_id"),
    ("image", {"image": "not base64!"}, "image"),
])
def test_rejected_records_name_the_field(kind: str, change: dict[str, Any], field: str) -> None:
    data = {**(sample_record(kind, {"site": 1, "patient": 7, "image": 13}[kind]))}
    for key, value in change.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    with pytest.raises(ValidationError) as caught:
        retinal.KINDS[kind].model_validate(data)
    assert any(field in map(str, error["loc"]) for error in caught.value.errors()), caught.value.errors()


@pytest.mark.parametrize(("change", "message"), [
    ({"image": None, "file_name": "x.png"}, "no file"),
    ({"image": ""}, "empty"),
])
def test_image_without_a_file_is_rejected(change: dict[str, Any], message: str) -> None:
    data = {**sample_record("image", 13), **change}
    data = {k: v for k, v in data.items() if v is not None}
    with pytest.raises(ValidationError, match=message):
        retinal.Image.model_validate(data)


def test_too_large_a_file_is_rejected() -> None:
    data = {**sample_record("image", 13), "image": b"\x89PNG\r\n\x1a\n" + bytes(retinal.MAX_FILE_BYTES)}
    with pytest.raises(ValidationError, match="larger than"):
        retinal.Image.model_validate(data)


def test_a_file_that_is_no_image_is_rejected() -> None:
    data = {**sample_record("image", 13), "image": base64.b64encode(b"%PDF-1.7 not an image").decode()}
    with pytest.raises(ValueError, match="not a PNG"):
        entries_of("image", data)


def test_dicom_laterality_must_match_the_eye() -> None:
    data = {**sample_record("image", 12), "eye_side": "RIGHT"}
    with pytest.raises(ValueError, match="laterality L"):
        entries_of("image", data)


def test_dates() -> None:
    assert retinal.fhir_datetime(date(2024, 3, 5)) == "2024-03-05"
    assert retinal.fhir_datetime(datetime(2024, 3, 5, 9, 40, 2, tzinfo=UTC)) == "2024-03-05T09:40:02Z"
    assert retinal.fhir_datetime(datetime(2024, 3, 5, 9, 40, 2, 250000, tzinfo=UTC)) == "2024-03-05T09:40:02.250Z"
    plus_one = timezone(timedelta(hours=1))
    assert retinal.fhir_datetime(datetime(2024, 3, 5, 10, 40, tzinfo=plus_one)) == "2024-03-05T10:40:00+01:00"
    assert retinal.fhir_datetime(datetime(2024, 3, 5, 10, 40)) == "2024-03-05"  # no zone: the date only
    naive = {**sample_record("image", 13), "acquisition_date": "2024-05-20T08:15:00"}
    assert entries_of("image", naive)[1]["resource"]["createdDateTime"] == "2024-05-20"


# -- the generator ------------------------------------------------------------------------------


def test_generator_is_deterministic_and_valid() -> None:
    first, again = generate(4, 30, 5, seed=3), generate(4, 30, 5, seed=3)
    assert first == again
    assert generate(4, 30, 5, seed=4) != first
    assert [len(first["site"]), len(first["patient"])] == [4, 30]
    assert len({s["name"] for s in first["site"]}) == 4
    per_patient: dict[int, int] = {}
    for image in first["image"]:
        per_patient[image["patient_id"]] = per_patient.get(image["patient_id"], 0) + 1
        retinal.Image.model_validate(image)
    assert set(per_patient) == {p["id"] for p in first["patient"]}
    assert min(per_patient.values()) >= 1 and max(per_patient.values()) <= 5
    assert [i["id"] for i in first["image"]] == list(range(1, len(first["image"]) + 1))


def test_generator_default_patients_per_site() -> None:
    generated = generate(seed=5)
    assert len(generated["site"]) == 5
    assert 5 * 8 <= len(generated["patient"]) <= 5 * 25
    assert all(len(i) <= 4 for i in _images_by_patient(generated).values())


def _images_by_patient(generated: dict[str, list[dict[str, Any]]]) -> dict[int, list[dict[str, Any]]]:
    found: dict[int, list[dict[str, Any]]] = {}
    for image in generated["image"]:
        found.setdefault(image["patient_id"], []).append(image)
    return found


def test_generated_files_are_real_images() -> None:
    generated = generate(6, 40, 4, seed=9)
    kinds = {i["file_name"].rsplit(".", 1)[1] for i in generated["image"]}
    assert kinds == {"png", "dcm"}
    for image in generated["image"]:
        data = base64.b64decode(image["image"])
        if image["file_name"].endswith(".png"):
            width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
            assert (width, height, depth, colour) == (64, 64, 8, 2)
            length = struct.unpack(">I", data[33:37])[0]
            assert data[37:41] == b"IDAT"
            assert len(zlib.decompress(data[41:41 + length])) == 64 * (1 + 64 * 3)
        else:
            ds = pydicom.dcmread(io.BytesIO(data))
            assert ds.SOPClassUID == OPHTHALMIC_PHOTOGRAPHY_8BIT
            assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
            assert ds.ImageLaterality == image["eye_side"][0]
            assert ds.pixel_array.shape == (64, 64, 3)
            assert ds.PatientID == str(image["patient_id"])


def test_expected_readiness_counts() -> None:
    generated = {
        "site": [{"id": 1, "name": "A"}, {"id": 2, "name": "B"}],
        "image": [
            {"site_id": 1, "patient_id": 1, "quality_score": "HIGH", "anatomy_score": "GOOD", "over_illuminated": False,
             "acquisition_date": "2024-01-01"},
            {"site_id": 1, "patient_id": 1, "quality_score": "HIGH", "anatomy_score": "GOOD", "over_illuminated": True,
             "acquisition_date": "2024-02-01"},
            {"site_id": 1, "patient_id": 2, "quality_score": "LOW", "anatomy_score": "GOOD", "over_illuminated": False,
             "acquisition_date": "2023-12-01"},
        ],
    }
    found = expected_readiness(generated)
    assert (found["all"]["images"], found["all"]["patients"], found["all"]["ready"]) == (3, 2, 1)
    assert found["sites"][2]["images"] == 0
    assert expected_readiness(generated, allow_over_illuminated=True)["all"]["ready"] == 2
    assert expected_readiness(generated, quality=("LOW", "HIGH"))["all"]["ready"] == 2
    assert found["all"]["first"] == "2023-12-01"


def test_rule_from_settings() -> None:
    assert ReadinessRule.from_settings(Settings()) == ReadinessRule(("ACCEPTABLE", "HIGH"), ("ACCEPTABLE", "GOOD"), False)
    custom = Settings(ai_ready_quality=" high ", ai_ready_anatomy="GOOD,ACCEPTABLE", ai_ready_allow_over_illuminated=True)
    assert ReadinessRule.from_settings(custom) == ReadinessRule(("HIGH",), ("GOOD", "ACCEPTABLE"), True)
    for bad in ({"ai_ready_quality": "MEDIUM"}, {"ai_ready_anatomy": ""}, {"ai_ready_quality": "HIGH,GOOD"}):
        with pytest.raises(ValueError, match="FHIR_AI_READY"):
            ReadinessRule.from_settings(Settings(**bad))
    assert ReadinessRule().version != ReadinessRule(allow_over_illuminated=True).version
    valid(measure_resource(ReadinessRule()))


# -- the sample through the server --------------------------------------------------------------


def test_import_sample_then_the_screens_searches(server: ServerProcess, client: httpx.Client) -> None:
    to = Destination(str(client.base_url).rstrip("/"), "127.0.0.1", server.dicom_port)
    summary = import_files("retinal", [DATA / "retinal.json"], to, progress=False)
    assert summary.rejected == [] and summary.records == 10
    assert summary.created["Media"] + summary.unchanged["Media"] == 3 and summary.dicom == 1
    again = import_files("retinal", [DATA / "retinal.json"], to, progress=False)
    assert again.rejected == [] and not again.created and not again.updated, again.report()  # a re-import changes nothing

    site = one(client, f"/Organization?{identifier('site', 1)}")
    assert site["name"] == "Leeds Eye Screening Centre"
    location = one(client, f"/Location?organization=Organization/{site['id']}")
    assert location["address"]["text"].startswith("12 Park Square")
    patient = one(client, f"/Patient?{identifier('patient', 7)}")

    # The gallery of a patient: images newest first, their site, their grades.
    gallery = search(client, f"/Media?subject=Patient/{patient['id']}&_sort=-created"
                             "&_include=Media:operator&_revinclude=Observation:derived-from")
    matches = [e["resource"] for e in gallery["entry"] if e["search"]["mode"] == "match"]
    included = [e["resource"] for e in gallery["entry"] if e["search"]["mode"] == "include"]
    assert [m["identifier"][0]["value"] for m in matches] == ["11"]
    assert {r["resourceType"] for r in included} == {"Organization", "Observation"}
    assert sum(r["resourceType"] == "Observation" for r in included) == 1

    # The DICOM image (12) is an ImagingStudy made by the DICOM node, of the imported Patient,
    # its series with the eye's laterality and body site; its grading points at it.
    studies = search(client, f"/ImagingStudy?subject=Patient/{patient['id']}&_revinclude=Observation:derived-from")
    [study] = [e["resource"] for e in studies["entry"] if e["search"]["mode"] == "match"]
    [series] = study["series"]
    assert series["modality"]["code"] == "OP" and series["laterality"]["code"] == "419161000"
    assert series["bodySite"]["code"] == "81745001"
    [grading] = [e["resource"] for e in studies["entry"] if e["search"]["mode"] == "include"]
    assert grading["identifier"][0]["value"] == "12" and grading["derivedFrom"][0]["reference"] == f"ImagingStudy/{study['id']}"
    assert one(client, f"/Patient?{identifier('patient', 7)}")["id"] == patient["id"]  # the node made no Patient of its own

    # The file behind an image.
    media = matches[0]
    binary = client.get(f"/{media['content']['url']}").json()
    assert base64.b64decode(binary["data"]) == (DATA / "fundus_right.png").read_bytes()
    assert binary["securityContext"] == {"reference": f"Patient/{patient['id']}"}

    # Images of a site, of an eye, of a quality; over-illuminated images.
    at_site = search(client, f"/Observation?performer=Organization/{site['id']}&code={CS}|image-grading&_summary=count")
    assert at_site["total"] == 2  # one Media, one ImagingStudy
    right = search(client, f"/Media?subject=Patient/{patient['id']}&site={SNOMED}|18944008")
    assert [e["resource"]["identifier"][0]["value"] for e in right["entry"]] == ["11"]
    left = search(client, f"/ImagingStudy?subject=Patient/{patient['id']}&bodysite=81745001&_summary=count")
    assert left["total"] == 1
    high = search(client, f"/Media?operator=Organization/{site['id']}"
                          f"&_has:Observation:derived-from:component-code-value-concept={CS}|image-quality${CS}|quality-high")
    assert [e["resource"]["identifier"][0]["value"] for e in high["entry"]] == ["11"]
    glare = search(client, f"/Observation?component-code-value-concept={CS}|over-illuminated${YES_NO}|Y"
                           f"&performer=Organization/{site['id']}&_include=Observation:derived-from")
    assert [e["resource"]["resourceType"] for e in glare["entry"]] == ["Observation", "ImagingStudy"]
    assert glare["entry"][0]["resource"]["identifier"][0]["value"] == "12"


def test_a_dicom_image_is_stored_only_when_its_record_can_be(server: ServerProcess, client: httpx.Client,
                                                              tmp_path: Path) -> None:
    """An image of an unknown site is rejected before its file goes to the node (no study is
    left without its grading); a truncated file is refused whole, not rewritten into a whole one."""
    ds = pydicom.dcmread(DATA / "fundus_left.dcm")
    ds.StudyInstanceUID, ds.SeriesInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(tmp_path / "left.dcm", enforce_file_format=True)
    whole = (tmp_path / "left.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(whole[:-5])
    image = {**sample_record("image", 12), "file_path": "left.dcm"}
    source = {"sites": records("site"), "patients": records("patient"), "images": [
        {**image, "id": f"no-site-{ds.SOPInstanceUID[-6:]}", "site_id": "no-such-site"},
        {**image, "id": f"cut-{ds.SOPInstanceUID[-6:]}", "file_path": "cut.dcm"},
    ]}
    (tmp_path / "retinal.json").write_bytes(fhir_json.dumps(source))
    to = Destination(str(client.base_url).rstrip("/"), "127.0.0.1", server.dicom_port)
    summary = import_files("retinal", [tmp_path / "retinal.json"], to, progress=False)
    reasons = dict(summary.rejected)
    assert "no-such-site" in reasons["retinal.json image #1"], reasons
    assert "cut short" in reasons["retinal.json image #2"] or "truncated" in reasons["retinal.json image #2"], reasons
    assert summary.dicom == 0
    assert client.get(f"/ImagingStudy/{ds.StudyInstanceUID}").status_code == 404


def test_ai_readiness_counts_images_not_gradings(client: httpx.Client) -> None:
    """Two graded images of one DICOM study are two images; a second grading of one Media is
    still one image."""
    site = unique_site(client)
    patient = transaction(client, [{"fullUrl": "urn:uuid:p", "resource": {"resourceType": "Patient"},
                                    "request": {"method": "POST", "url": "Patient"}}])
    patient_ref = {"reference": patient.json()["entry"][0]["response"]["location"].split("/_history")[0]}

    def grading(derived_from: dict[str, Any]) -> dict[str, Any]:
        resource = entries_of("image", sample_record("image", 11))[2]["resource"]
        resource = {**resource, "subject": patient_ref, "performer": [{"reference": site}], "derivedFrom": [derived_from]}
        resource.pop("identifier")
        return {"resource": resource, "request": {"method": "POST", "url": "Observation"}}

    study = pydicom.uid.generate_uid()
    media = transaction(client, [{"resource": {"resourceType": "Media", "status": "completed", "subject": patient_ref,
                                               "content": {"contentType": "image/png"}},
                                  "request": {"method": "POST", "url": "Media"}}])
    media_ref = media.json()["entry"][0]["response"]["location"].split("/_history")[0]
    response = transaction(client, [
        grading({"reference": f"ImagingStudy/{study}", "identifier": {"system": "urn:dicom:uid", "value": "urn:oid:1.2.3.1"}}),
        grading({"reference": f"ImagingStudy/{study}", "identifier": {"system": "urn:dicom:uid", "value": "urn:oid:1.2.3.2"}}),
        grading({"reference": media_ref}),
        grading({"reference": media_ref}),
    ])
    assert response.status_code == 200, response.text
    report = client.get(f"/{site}/$ai-readiness").json()
    assert population(report["group"][0], "initial-population") == 3


def test_a_kept_report_is_counted_again_once_a_grading_or_site_changes(client: httpx.Client) -> None:
    """A report is kept while nothing it counts changes (its `date` tells when it was counted);
    a new grading, a renamed site and a deleted grading each show in the next report."""
    site = unique_site(client)
    patient = transaction(client, [{"resource": {"resourceType": "Patient"}, "request": {"method": "POST", "url": "Patient"}}])
    patient_ref = {"reference": patient.json()["entry"][0]["response"]["location"].split("/_history")[0]}

    def graded() -> str:
        media = client.post("/Media", json={"resourceType": "Media", "status": "completed", "subject": patient_ref,
                                            "content": {"contentType": "image/png"}}, headers={"Content-Type": FHIR_JSON})
        resource = entries_of("image", sample_record("image", 11))[2]["resource"]
        resource = {**resource, "subject": patient_ref, "performer": [{"reference": site}],
                    "derivedFrom": [{"reference": f"Media/{media.json()['id']}"}]}
        resource.pop("identifier")
        created = client.post("/Observation", json=resource, headers={"Content-Type": FHIR_JSON})
        assert created.status_code == 201, created.text
        return str(created.json()["id"])

    def report() -> tuple[str, int, str]:
        answer = client.get(f"/{site}/$ai-readiness").json()
        group = answer["group"][0]
        return answer["date"], population(group, "initial-population"), group["code"]["text"]

    first = graded()
    time.sleep(1.2)  # the first report after a write is counted, not kept: the write may be on its way
    counted = report()
    assert counted[1] == 1
    assert report() == counted  # kept: the same counting, the same date
    graded()
    again = report()
    assert again[1] == 2 and again[0] != counted[0]
    renamed = client.get(f"/{site}").json()
    renamed["name"] = "renamed site"
    assert client.put(f"/{site}", json=renamed, headers={"Content-Type": FHIR_JSON}).status_code == 200
    assert report()[2] == "renamed site"
    assert client.delete(f"/Observation/{first}").status_code in (200, 204)
    assert report()[1:] == (1, "renamed site")


def unique_site(client: httpx.Client) -> str:
    response = transaction(client, [{"resource": {"resourceType": "Organization", "name": f"site {pydicom.uid.generate_uid()}"},
                                     "request": {"method": "POST", "url": "Organization"}}])
    assert response.status_code == 200, response.text
    return response.json()["entry"][0]["response"]["location"].split("/_history")[0]


@pytest.mark.parametrize("unknown", ["site_id", "patient_id"])
def test_an_image_of_an_unknown_site_or_patient_fails_whole(client: httpx.Client, unknown: str) -> None:
    data = {**sample_record("image", 13), "id": f"unknown-{unknown}", unknown: "no-such-id"}
    response = transaction(client, entries_of("image", data))
    assert_outcome(response, 412, "no-such-id")
    assert search(client, f"/Media?{identifier('image', data['id'])}&_summary=count")["total"] == 0
    source = f"urn:fhir-server:source:retinal:image:{data['id']}"
    assert search(client, f"/Binary?_source={source}&_summary=count")["total"] == 0


# -- $ai-readiness on 10 sites, 40 patients ---------------------------------------------------------


@pytest.fixture(scope="module")
def readiness_server(database: EmbeddedDatabase, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server of its own database, so that its counts are the generated data's alone."""
    env = {"MONGODB_URI": database.uri, "FHIR_MONGODB_DB": "fhir_retinal_readiness"}
    proc = ServerProcess(tmp_path_factory.mktemp("retinal"), env).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def generated(readiness_server: ServerProcess) -> dict[str, list[dict[str, Any]]]:
    data = generate(10, 40, 6, seed=GENERATED_SEED)  # its speed on 500 patients: bench/console.py
    started = time.perf_counter()
    with httpx.Client(base_url=f"{readiness_server.url}/fhir", timeout=300) as c:
        load(c, data, StoreSender("127.0.0.1", readiness_server.dicom_port, "FHIRSERVER"))
    print(f"\nloaded {len(data['image'])} images of {len(data['patient'])} patients at {len(data['site'])} sites "
          f"in {time.perf_counter() - started:.1f} s")
    return data


@pytest.fixture
def ai(readiness_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{readiness_server.url}/fhir", timeout=60) as c:
        yield c


def population(group_or_stratum: dict[str, Any], code: str) -> int:
    return next(p["count"] for p in group_or_stratum["population"] if p["code"]["coding"][0]["code"] == code)


def strata(group: dict[str, Any], code: str) -> dict[str | None, dict[str, Any]]:
    stratifier = next(s for s in group["stratifier"] if s["code"][0]["coding"][0]["code"] == code)
    return {(s["value"].get("coding") or [{}])[0].get("code"): s for s in stratifier["stratum"]}


def check_group(group: dict[str, Any], expected: dict[str, Any], rule: ReadinessRule) -> None:
    images, ready = expected["images"], expected["ready"]
    assert population(group, "initial-population") == population(group, "denominator") == images
    assert population(group, "numerator") == ready
    assert population(group, "assessed-patients") == expected["patients"]
    if images:
        assert float(group["measureScore"]["value"]) == round(ready / images, 4)
    else:
        assert "measureScore" not in group
    for code, scale, counted, ready_counted in (
        ("image-quality", retinal.QUALITY, expected["quality"], expected["ready_by_quality"]),
        ("anatomy-score", retinal.ANATOMY, expected["anatomy"], expected["ready_by_anatomy"]),
    ):
        found = strata(group, code)
        assert set(found) == set(scale.values())
        for term, value in scale.items():
            assert population(found[value], "initial-population") == counted[term], (code, term)
            assert population(found[value], "numerator") == ready_counted[term], (code, term)
    over = strata(group, "over-illuminated")
    assert population(over["Y"], "initial-population") == expected["over_illuminated"]
    assert population(over["N"], "initial-population") == images - expected["over_illuminated"]
    assert population(over["Y"], "numerator") == expected["ready_over_illuminated"]


def check_report(report: dict[str, Any], generated: dict[str, list[dict[str, Any]]], rule: ReadinessRule) -> None:
    valid(report)
    expected = expected_readiness(generated, rule.quality, rule.anatomy, rule.allow_over_illuminated)
    assert report["status"] == "complete" and report["type"] == "summary"
    assert report["measure"] == f"{MEASURE_URL}|{rule.version}"
    assert report["period"] == {"start": expected["all"]["first"], "end": expected["all"]["last"]}
    all_sites, *sites = report["group"]
    assert all_sites["code"]["text"] == "All sites" and "extension" not in all_sites
    check_group(all_sites, expected["all"], rule)
    names = {s["id"]: s["name"] for s in generated["site"]}
    assert [g["code"]["text"] for g in sites] == sorted(names.values(), key=str.casefold)
    by_name = {name: site_id for site_id, name in names.items()}
    for group in sites:
        check_group(group, expected["sites"][by_name[group["code"]["text"]]], rule)
        assert group["extension"][0]["valueReference"]["reference"].startswith("Organization/")


def test_ai_readiness_counts(ai: httpx.Client, generated: dict[str, list[dict[str, Any]]]) -> None:
    for _ in range(2):  # the first call also publishes the Measure
        response = ai.get("/$ai-readiness")
        assert response.status_code == 200, response.text
        check_report(fhir_json.loads(response.content), generated, ReadinessRule())


def test_ai_readiness_of_one_site(ai: httpx.Client, generated: dict[str, list[dict[str, Any]]]) -> None:
    site = generated["site"][3]
    organization = one(ai, f"/Organization?{identifier('site', site['id'])}")
    started = time.perf_counter()
    report = fhir_json.loads(ai.get(f"/Organization/{organization['id']}/$ai-readiness").content)
    print(f"\none site: {time.perf_counter() - started:.3f} s")
    valid(report)
    [group] = report["group"]
    assert group["code"]["text"] == site["name"]
    assert group["extension"][0]["valueReference"] == {"reference": f"Organization/{organization['id']}", "display": site["name"]}
    check_group(group, expected_readiness(generated)["sites"][site["id"]], ReadinessRule())


def test_ai_readiness_of_a_period(ai: httpx.Client, generated: dict[str, list[dict[str, Any]]]) -> None:
    def in_2022(image: dict[str, Any]) -> bool:
        return image["acquisition_date"].startswith("2022")

    expected = expected_readiness({**generated, "image": [i for i in generated["image"] if in_2022(i)]})
    for response in (
        ai.get("/$ai-readiness", params={"periodStart": "2022-01-01", "periodEnd": "2022-12-31"}),
        ai.post("/$ai-readiness", json={"resourceType": "Parameters", "parameter": [
            {"name": "periodStart", "valueDate": "2022-01-01"}, {"name": "periodEnd", "valueDate": "2022-12-31"}]},
            headers={"Content-Type": FHIR_JSON}),
    ):
        assert response.status_code == 200, response.text
        report = fhir_json.loads(response.content)
        assert report["period"] == {"start": "2022-01-01", "end": "2022-12-31"}
        check_group(report["group"][0], expected["all"], ReadinessRule())


def test_ai_readiness_errors(ai: httpx.Client, generated: dict[str, list[dict[str, Any]]]) -> None:
    assert_outcome(ai.get("/$ai-readiness", params={"site": "x"}), 400, "does not take the parameter 'site'")
    assert_outcome(ai.get("/$ai-readiness", params={"periodStart": "last year"}), 400, "periodStart")
    assert_outcome(ai.get("/$ai-readiness", params={"periodStart": "2024-05-02", "periodEnd": "2024-05-01"}), 400,
                   "periodStart 2024-05-02 is after periodEnd 2024-05-01")
    assert ai.get("/$ai-readiness", params={"periodStart": "2024-05-01", "periodEnd": "2024-05-01"}).status_code == 200
    assert_outcome(ai.post("/$ai-readiness", json={"resourceType": "Patient"}, headers={"Content-Type": FHIR_JSON}),
                   400, "Parameters")
    assert_outcome(ai.get("/Organization/no-such-site/$ai-readiness"), 404)


def test_measure_is_published_and_its_numerator_query_agrees(ai: httpx.Client, generated: dict[str, list[dict[str, Any]]]) -> None:
    ai.get("/$ai-readiness")
    measure = fhir_json.loads(ai.get("/Measure/ai-readiness").content)
    valid(measure)
    rule = ReadinessRule()
    assert measure["url"] == MEASURE_URL and measure["version"] == rule.version
    assert "quality is ACCEPTABLE or HIGH, anatomy visibility is ACCEPTABLE or GOOD and the image is not over-illuminated" \
        in measure["description"]
    criteria = {p["code"]["coding"][0]["code"]: p["criteria"]["expression"] for p in measure["group"][0]["population"]}
    expected = expected_readiness(generated)["all"]
    for code, count in (("numerator", expected["ready"]), ("denominator", expected["images"]),
                        ("assessed-patients", expected["patients"])):
        found = ai.get(criteria[code] + "&_summary=count")
        assert found.status_code == 200, found.text
        assert found.json()["total"] == count, code


def test_another_rule_from_the_settings(database: EmbeddedDatabase, tmp_path_factory: pytest.TempPathFactory,
                                        generated: dict[str, list[dict[str, Any]]]) -> None:
    """A server configured otherwise reports by its rule, and publishes the Measure's new version."""
    env = {"MONGODB_URI": database.uri, "FHIR_MONGODB_DB": "fhir_retinal_readiness",
           "FHIR_AI_READY_QUALITY": "HIGH", "FHIR_AI_READY_ALLOW_OVER_ILLUMINATED": "true"}
    proc = ServerProcess(tmp_path_factory.mktemp("retinal_rule"), env).start()
    try:
        with httpx.Client(base_url=f"{proc.url}/fhir", timeout=60) as c:
            rule = ReadinessRule(("HIGH",), ("ACCEPTABLE", "GOOD"), True)
            check_report(fhir_json.loads(c.get("/$ai-readiness").content), generated, rule)
            measure = c.get("/Measure/ai-readiness").json()
            assert measure["version"] == rule.version
            assert "over-illumination does not matter" in measure["description"]
    finally:
        proc.stop()
