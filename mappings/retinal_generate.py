"""Realistic records for the retinal image manager (`fhir-server import retinal --randomize`),
as its own import script makes them: screening sites, patients, and graded fundus photographs
with small real image files. Pure apart from its random numbers (one `random.Random(seed)`).

- **Sites** (`num_sites`, ids 1…): a unique name and an address; each has its own camera, a
  DICOM ophthalmic-photography camera at about a third of the sites (at least one when there are
  two or more sites), a PNG-exporting camera elsewhere, and its own share of good images.
- **Patients**: with `num_patients` 0 (the default) each site gets 8 to 25 patients of its own;
  otherwise exactly `num_patients`, each with a home site drawn at random (larger and smaller
  sites). Ids 1… across all sites.
- **Images** (ids 1…): each patient has 1 to `max_images_per_patient // 2` screening visits (at
  least one), 90 % at the home site; a visit photographs both eyes, and a low-quality photograph
  is retaken once half of the time, never beyond `max_images_per_patient` images in all. Grades
  are correlated as graders' are: an over-illuminated photograph is more often of low quality,
  a low-quality one more often shows the anatomy poorly.
- **Files**: 64×64 RGB fundus-like pictures (dark surround, orange retina, optic disc on the
  nasal side of the eye photographed, vessels), as PNG written by hand (zlib + struct) or as DICOM
  Ophthalmic Photography 8 Bit instances (explicit VR little endian, ImageLaterality set), the
  record carrying the file's bytes in base64 (`image`) and a `file_name`.

`expected_readiness` counts, from the generated records alone, what `$ai-readiness` should
report for a rule.
"""

import base64
import io
import math
import random
import struct
import zlib
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRLittleEndian

OPHTHALMIC_PHOTOGRAPHY_8BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.1"
IMAGE_SIZE = 64
CITIES = (
    ("Leeds", "LS1 3EX"), ("Bristol", "BS1 5NA"), ("Glasgow", "G2 1DY"), ("Cardiff", "CF10 1EP"),
    ("Norwich", "NR2 1TF"), ("Exeter", "EX1 1HS"), ("York", "YO1 7HH"), ("Belfast", "BT1 5GS"),
    ("Inverness", "IV1 1HY"), ("Brighton", "BN1 1GE"), ("Leicester", "LE1 5WW"), ("Dundee", "DD1 4HN"),
)
STREETS = ("High Street", "Station Road", "Church Lane", "Victoria Road", "Park Avenue", "Queen Street")
KINDS_OF_SITE = ("Eye Screening Centre", "Diabetic Eye Clinic", "Community Optometry", "Retinal Screening Unit")
FIRST_VISIT = date(2019, 1, 7)
LAST_VISIT = date(2025, 6, 27)


def generate(
    num_sites: int = 5, num_patients: int = 0, max_images_per_patient: int = 4, seed: int | None = None
) -> dict[str, list[dict[str, Any]]]:
    """`{"site": […], "patient": […], "image": […]}`: records as the source system exports them."""
    if num_sites < 1:
        raise ValueError("num_sites must be at least 1")
    if num_patients < 0 or max_images_per_patient < 0:
        raise ValueError("num_patients and max_images_per_patient cannot be negative")
    rng = random.Random(seed)
    sites, profiles = _sites(rng, num_sites)
    patients, homes = _patients(rng, sites, num_patients)
    images: list[dict[str, Any]] = []
    for patient in patients:
        images.extend(_images_of(rng, patient, homes[patient["id"]], sites, profiles, max_images_per_patient, len(images)))
    return {"site": sites, "patient": patients, "image": images}


def _sites(rng: random.Random, count: int) -> tuple[list[dict[str, Any]], dict[int, dict[str, Any]]]:
    sites: list[dict[str, Any]] = []
    profiles: dict[int, dict[str, Any]] = {}
    used: set[str] = set()
    cities = list(CITIES)
    rng.shuffle(cities)
    for n in range(1, count + 1):
        city, postcode = cities[(n - 1) % len(cities)]
        name = f"{city} {rng.choice(KINDS_OF_SITE)}"
        while name in used:  # names are unique in the source system
            name = f"{city} {rng.choice(KINDS_OF_SITE)} {len(used) + 1}"
        used.add(name)
        address = f"{rng.randint(1, 180)} {rng.choice(STREETS)}, {city} {postcode}, United Kingdom"
        sites.append({"id": n, "name": name, "location": address})
        profiles[n] = {
            "dicom": rng.random() < 1 / 3,
            "skill": rng.uniform(-0.12, 0.12),  # how often this site's photographs are good
            "glare": rng.uniform(0.03, 0.14),  # how often they are over-illuminated
            "size": rng.uniform(0.5, 1.5),
        }
    if count >= 2 and not any(p["dicom"] for p in profiles.values()):
        profiles[rng.randint(1, count)]["dicom"] = True
    return sites, profiles


def _patients(
    rng: random.Random, sites: list[dict[str, Any]], num_patients: int
) -> tuple[list[dict[str, Any]], dict[int, int]]:
    if num_patients:
        site_ids = [s["id"] for s in sites]
        weights = [rng.uniform(0.5, 1.5) for _ in sites]
        home_sites = rng.choices(site_ids, weights, k=num_patients)
    else:
        home_sites = [s["id"] for s in sites for _ in range(rng.randint(8, 25))]
    patients: list[dict[str, Any]] = []
    homes: dict[int, int] = {}
    for n, home in enumerate(home_sites, start=1):
        born = date(1938, 1, 1) + timedelta(days=rng.randint(0, 365 * 67))
        sex = rng.choices(("FEMALE", "MALE", "OTHER"), (49, 49, 2))[0]
        patients.append({"id": n, "birth_date": born.isoformat(), "sex": sex})
        homes[n] = home
    return patients, homes


def _grades(rng: random.Random, profile: dict[str, Any]) -> tuple[str, str, bool]:
    over = rng.random() < profile["glare"]
    good = rng.random() + profile["skill"]
    if over:
        quality = "LOW" if good < 0.5 else "ACCEPTABLE" if good < 0.9 else "HIGH"
    else:
        quality = "LOW" if good < 0.12 else "ACCEPTABLE" if good < 0.5 else "HIGH"
    seen = rng.random() + profile["skill"] - (0.3 if quality == "LOW" else 0.0)
    anatomy = "POOR" if seen < 0.15 else "ACCEPTABLE" if seen < 0.55 else "GOOD"
    return quality, anatomy, over


def _images_of(
    rng: random.Random,
    patient: dict[str, Any],
    home: int,
    sites: list[dict[str, Any]],
    profiles: dict[int, dict[str, Any]],
    max_images: int,
    numbered: int,
) -> list[dict[str, Any]]:
    if max_images <= 0:
        return []
    weeks = range(0, (LAST_VISIT - FIRST_VISIT).days, 7)
    visits = min(rng.randint(1, max(1, max_images // 2)), len(weeks))
    days = sorted(rng.sample(weeks, visits))
    out: list[dict[str, Any]] = []
    for day in days:
        site_id = home if len(sites) == 1 or rng.random() < 0.9 else rng.choice([s["id"] for s in sites if s["id"] != home])
        profile = profiles[site_id]
        moment = datetime.combine(FIRST_VISIT + timedelta(days=day), datetime.min.time(), UTC)
        moment += timedelta(hours=rng.randint(8, 16), minutes=rng.randint(0, 59))
        eyes = ["RIGHT", "LEFT"] if max_images - len(out) >= 2 else [rng.choice(("RIGHT", "LEFT"))]
        for eye in eyes:
            for _attempt in range(2):
                if len(out) >= max_images:
                    break
                moment += timedelta(seconds=rng.randint(20, 90))
                quality, anatomy, over = _grades(rng, profile)
                number = numbered + len(out) + 1
                out.append(_image(rng, number, patient, sites[site_id - 1], profile, eye, moment, quality, anatomy, over))
                retake = quality == "LOW" and rng.random() < 0.5 and max_images - len(out) > (1 if eye == "RIGHT" else 0)
                if not retake:
                    break
    return out


def _image(
    rng: random.Random,
    number: int,
    patient: dict[str, Any],
    site: dict[str, Any],
    profile: dict[str, Any],
    eye: str,
    moment: datetime,
    quality: str,
    anatomy: str,
    over: bool,
) -> dict[str, Any]:
    brightness = {"LOW": 0.55, "ACCEPTABLE": 0.8, "HIGH": 1.0}[quality] * (1.6 if over else 1.0) * rng.uniform(0.9, 1.1)
    pixels = fundus_pixels(eye, brightness, rng.randint(-3, 3), IMAGE_SIZE)
    if profile["dicom"]:
        data = dicom_bytes(
            pixels, IMAGE_SIZE, rng,
            patient_id=str(patient["id"]), birth_date=patient["birth_date"], sex=patient["sex"],
            eye=eye, moment=moment, institution=site["name"], number=number,
        )
        name = f"IMG_{number:06d}_{eye[0]}.dcm"
    else:
        data = png_bytes(IMAGE_SIZE, IMAGE_SIZE, pixels)
        name = f"IMG_{number:06d}_{eye[0]}.png"
    return {
        "id": number,
        "patient_id": patient["id"],
        "site_id": site["id"],
        "eye_side": eye,
        "quality_score": quality,
        "anatomy_score": anatomy,
        "over_illuminated": over,
        "acquisition_date": moment.isoformat().replace("+00:00", "Z"),
        "file_name": name,
        "image": base64.b64encode(data).decode(),
    }


# -- image files -----------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _fundus(eye: str, size: int) -> tuple[bytes, bytes, bytes]:
    """The red, green and blue planes of a fundus picture of one eye (computed once)."""
    planes = (bytearray(size * size), bytearray(size * size), bytearray(size * size))
    centre = (size - 1) / 2
    radius = size * 0.47
    disc_x = centre + (0.22 if eye == "RIGHT" else -0.22) * size  # the optic disc lies nasally
    for y in range(size):
        for x in range(size):
            r = math.hypot(x - centre, y - centre) / radius
            if r > 1:
                continue
            shade = 1 - 0.55 * r * r
            red, green, blue = 205 * shade, 95 * shade, 45 * shade
            macula = math.hypot(x - centre, y - centre) / (size * 0.09)
            if macula < 1:
                red, green, blue = red * (0.7 + 0.3 * macula), green * (0.7 + 0.3 * macula), blue
            disc = math.hypot(x - disc_x, y - centre) / (size * 0.08)
            if disc < 1:
                red, green, blue = 250, 225 - 40 * disc, 150 - 60 * disc
            for arc in (-1, 1):  # the two vessel arcades leaving the disc
                bend = centre + arc * (size * 0.3) * math.sin(min(1.0, abs(x - disc_x) / (size * 0.45)) * math.pi / 1.6)
                temporal = (disc_x - x) if eye == "RIGHT" else (x - disc_x)  # the arcades embrace the macula
                if disc >= 1 and abs(y - bend) < 0.8 and 0 < temporal < size * 0.42:
                    red, green, blue = red * 0.6, green * 0.45, blue * 0.5
            i = y * size + x
            planes[0][i], planes[1][i], planes[2][i] = int(red), int(green), int(blue)
    return bytes(planes[0]), bytes(planes[1]), bytes(planes[2])


def fundus_pixels(eye: str, brightness: float, shift: int, size: int = IMAGE_SIZE) -> bytes:
    """Interleaved RGB bytes (rows top to bottom) of a fundus picture: brighter or darker,
    shifted sideways by `shift` pixels."""
    table = bytes(min(255, int(v * brightness)) for v in range(256))
    out = bytearray(size * size * 3)
    for channel, plane in enumerate(_fundus(eye, size)):
        shifted = b"".join(
            plane[row * size:(row + 1) * size][-shift:] + plane[row * size:(row + 1) * size][:-shift] if shift
            else plane[row * size:(row + 1) * size]
            for row in range(size)
        )
        out[channel::3] = shifted.translate(table)
    return bytes(out)


def png_bytes(width: int, height: int, rgb: bytes) -> bytes:
    """An 8-bit RGB PNG of `rgb` (rows top to bottom, no filter)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    stride = width * 3
    raw = b"".join(b"\x00" + rgb[row * stride:(row + 1) * stride] for row in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def _uid(rng: random.Random) -> str:
    return f"2.25.{rng.getrandbits(122)}"  # a UUID-derived UID (PS3.5 B.2), from the seeded generator


def dicom_bytes(
    rgb: bytes,
    size: int,
    rng: random.Random,
    *,
    patient_id: str,
    birth_date: str,
    sex: str,
    eye: str,
    moment: datetime,
    institution: str,
    number: int,
) -> bytes:
    """A DICOM Ophthalmic Photography 8 Bit Image (Part 10 file, explicit VR little endian)."""
    sop_uid = _uid(rng)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = OPHTHALMIC_PHOTOGRAPHY_8BIT
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = OPHTHALMIC_PHOTOGRAPHY_8BIT
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = _uid(rng)
    ds.SeriesInstanceUID = _uid(rng)
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.Modality = "OP"
    ds.Manufacturer = "Retinal Camera Co."
    ds.InstitutionName = institution
    ds.PatientID = patient_id
    ds.IssuerOfPatientID = "urn:fhir-server:source:retinal:patient"  # the namespace of the imported Patients
    ds.PatientBirthDate = birth_date.replace("-", "")
    ds.PatientSex = {"MALE": "M", "FEMALE": "F"}.get(sex, "O")
    stamp_date, stamp_time = moment.strftime("%Y%m%d"), moment.strftime("%H%M%S")
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = stamp_date
    ds.AcquisitionDateTime = stamp_date + stamp_time
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = stamp_time
    ds.TimezoneOffsetFromUTC = "+0000"
    ds.StudyID = str(number)
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.BodyPartExamined = "EYE"
    ds.ImageLaterality = eye[0]
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows = ds.Columns = size
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.BurnedInAnnotation = "NO"
    ds.PixelData = rgb
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


# -- what $ai-readiness should say ---------------------------------------------------------------


def _totals(images: Iterable[dict[str, Any]], ready_rule: Any) -> dict[str, Any]:
    found = list(images)
    ready = [i for i in found if ready_rule(i)]
    return {
        "images": len(found),
        "patients": len({i["patient_id"] for i in found}),
        "ready": len(ready),
        "quality": Counter(i["quality_score"] for i in found),
        "anatomy": Counter(i["anatomy_score"] for i in found),
        "over_illuminated": sum(1 for i in found if i["over_illuminated"]),
        "ready_by_quality": Counter(i["quality_score"] for i in ready),
        "ready_by_anatomy": Counter(i["anatomy_score"] for i in ready),
        "ready_over_illuminated": sum(1 for i in ready if i["over_illuminated"]),
        "first": min((i["acquisition_date"] for i in found), default=None),
        "last": max((i["acquisition_date"] for i in found), default=None),
    }


def expected_readiness(
    generated: dict[str, list[dict[str, Any]]],
    quality: Iterable[str] = ("ACCEPTABLE", "HIGH"),
    anatomy: Iterable[str] = ("ACCEPTABLE", "GOOD"),
    allow_over_illuminated: bool = False,
) -> dict[str, Any]:
    """`{"all": totals, "sites": {site id: totals}}` for a rule, from the records alone; every
    site is there, those without images with zero counts. Totals: images, distinct patients,
    AI-ready images, Counters of the scores (all images, and the ready ones), over-illuminated
    images (all, and ready ones), first and last acquisition."""
    good_quality, good_anatomy = frozenset(quality), frozenset(anatomy)

    def ready(image: dict[str, Any]) -> bool:
        return (
            image["quality_score"] in good_quality
            and image["anatomy_score"] in good_anatomy
            and (allow_over_illuminated or not image["over_illuminated"])
        )

    images = generated.get("image", [])
    return {
        "all": _totals(images, ready),
        "sites": {
            site["id"]: _totals((i for i in images if i["site_id"] == site["id"]), ready)
            for site in generated.get("site", [])
        },
    }
