"""The image upload service: `POST /fhir/Patient/{id}/$upload-image` with the raw file."""

import base64
import struct
import zlib

import httpx
from conftest import assert_outcome, patient, post


def png(width: int = 4, height: int = 4) -> bytes:
    """A small valid PNG, built by hand."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + bytes([200, 40, 40]) * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def upload(client: httpx.Client, patient_id: str, data: bytes, content_type: str = "image/png", **params: str) -> httpx.Response:
    return client.post(f"/Patient/{patient_id}/$upload-image", content=data, params=params,
                       headers={"Content-Type": content_type})


def test_an_image_becomes_a_binary_and_a_document_reference(client: httpx.Client) -> None:
    pid = post(client, patient()).json()["id"]
    image = png()
    response = upload(client, pid, image, title="left eye", date="2024-05-02")
    assert response.status_code == 201, response.text
    document = response.json()
    assert document["resourceType"] == "DocumentReference" and document["subject"]["reference"] == f"Patient/{pid}"
    attachment = document["content"][0]["attachment"]
    assert attachment["contentType"] == "image/png" and attachment["size"] == len(image)
    assert attachment["title"] == "left eye" and document["date"].startswith("2024-05-02")
    binary = client.get(f"/{attachment['url']}").json()
    assert binary["resourceType"] == "Binary" and base64.b64decode(binary["data"]) == image
    found = client.get("/DocumentReference", params={"patient": pid}).json()
    assert [e["resource"]["id"] for e in found["entry"]] == [document["id"]]


def test_the_type_is_judged_by_content_not_by_name_or_header(client: httpx.Client) -> None:
    pid = post(client, patient()).json()["id"]
    assert upload(client, pid, b"\xff\xd8\xff\xe0" + b"\x00" * 64, "application/octet-stream").json()["content"][0][
        "attachment"]["contentType"] == "image/jpeg"
    assert_outcome(upload(client, pid, b"this is not an image at all", "image/png"), 415, "not a PNG")
    assert_outcome(upload(client, pid, b"", "image/png"), 415, "empty")


def test_size_limit_and_unknown_patient(client: httpx.Client) -> None:
    pid = post(client, patient()).json()["id"]
    assert_outcome(upload(client, pid, png() + b"\x00" * (10 * 1024 * 1024)), 413)
    assert_outcome(upload(client, "no-such-patient", png()), 404)
    before = client.get("/Binary", params={"_summary": "count"}).json()["total"]
    upload(client, pid, b"junk")
    assert client.get("/Binary", params={"_summary": "count"}).json()["total"] == before  # nothing stored


def test_a_bad_date_is_400_naming_it(client: httpx.Client) -> None:
    pid = post(client, patient()).json()["id"]
    for date in ("2024", "2024-01-01T10:00", "yesterday"):
        assert_outcome(upload(client, pid, png(), date=date), 400, "date")
    assert upload(client, pid, png(), date="2024-01-01T10:00:00+02:00").status_code == 201
