"""The web console: end to end in headless Chromium (Debian's chromium and chromedriver, driven
by Selenium), and its error paths over HTTP. Real servers, the embedded database, loopback.

Screenshots of each screen go to $CONSOLE_SCREENSHOTS (default /tmp/console-screenshots)."""

import html
import io
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from conftest import FHIR_JSON, ServerProcess, ct_dataset, unique

from fhir_server.storage.embedded import EmbeddedDatabase
from mappings import retinal

PASSWORD = "S3cret-pass!"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
DATA = Path(__file__).parent / "data"
SHOTS = Path(os.environ.get("CONSOLE_SCREENSHOTS", "/tmp/console-screenshots"))
SITE_SYSTEM = retinal.source_system(retinal.SYSTEM, "site")
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-background-networking", "--disable-gpu",
                "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage", "--window-size=1280,900"]


def cli(env: dict[str, str], *args: str, stdin: str = "") -> str:
    done = subprocess.run([sys.executable, "-m", "fhir_server", *args], env={**os.environ, **env},
                          input=stdin.encode(), capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    return done.stdout.decode().strip()


def add_account(env: dict[str, str], email: str, role: str, fhir_user: str) -> None:
    cli(env, "accounts", "add", "--email", email, "--role", role, "--fhir-user", fhir_user, "--name", "Dr Ada Grey",
        "--password-stdin", stdin=PASSWORD + "\n")


def sign_in(http: httpx.Client, email: str, page: str = "/console/") -> httpx.Response:
    """The browser's way in, by hand: the console, its sign-in redirect, the login form, the
    callback; the answer of the callback (a redirect to `page`, or a page)."""
    answer = http.get(page)
    assert answer.status_code == 303 and answer.headers["location"].startswith("/console/login"), answer.text
    answer = http.get(answer.headers["location"])
    assert answer.status_code == 303 and answer.headers["location"].startswith("/auth/authorize"), answer.text
    form = http.get(answer.headers["location"])
    assert form.status_code == 200, form.text
    fields = {k: html.unescape(v) for k, v in re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"',
                                                          form.text)}
    answer = http.post("/auth/authorize", data={**fields, "email": email, "password": PASSWORD})
    assert answer.status_code == 303, answer.text
    return http.get(answer.headers["location"])


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
    assert found, page[:2000]
    return found.group(1)


def fhir_reads(server: ServerProcess, since: int) -> int:
    """The FHIR reads and searches in the server's access log after its first `since` characters
    (the console's calls are in it too)."""
    return sum('"method":"GET","path":"/fhir/' in line for line in server.log()[since:].splitlines())


def png(colour: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (64, 48), colour).save(out, "PNG")
    return out.getvalue()


def dicom_file(folder: Path) -> Path:
    ds = ct_dataset()
    ds.PatientName = "Console^Dicom"
    path = folder / "ct.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


# -- servers ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def open_server(database: EmbeddedDatabase, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A server with authorization off (as on a laptop), a practitioner account, a screening site,
    a Practitioner and a Patient."""
    env = {"MONGODB_URI": database.uri, "FHIR_MONGODB_DB": f"fhir_console_{unique()}"}
    email = f"dr-{unique()}@clinic.example"
    server = ServerProcess(tmp_path_factory.mktemp("console"), env).start()
    with httpx.Client(base_url=f"{server.url}/fhir", timeout=60, headers={"Content-Type": FHIR_JSON}) as fhir:
        doctor = fhir.post("/Practitioner", json={"resourceType": "Practitioner",
                                                  "name": [{"family": "Grey", "given": ["Ada"]}]}).json()
        add_account(env, email, "practitioner", f"Practitioner/{doctor['id']}")
        site = fhir.post("/Organization", json={"resourceType": "Organization", "name": f"Site {unique()[:6]}",
                                                "identifier": [{"system": SITE_SYSTEM, "value": unique()}]}).json()
        patient = fhir.post("/Patient", json={"resourceType": "Patient", "gender": "female", "birthDate": "1970-05-01",
                                              "name": [{"family": "Photo", "given": ["Paula"]}]}).json()
        cli(env, "import", "interactions", str(DATA / "interactions" / "interactions.json"), "--url", f"{server.url}/fhir")
        yield {"server": server, "email": email, "doctor": doctor["id"], "site": site["id"],
               "patient": patient["id"], "env": env}
    server.stop()


@pytest.fixture(scope="module")
def auth_server(database: EmbeddedDatabase, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A server with authorization on."""
    env = {"MONGODB_URI": database.uri, "FHIR_MONGODB_DB": f"fhir_console_auth_{unique()}", "FHIR_AUTH": "true"}
    doctor, patient = f"dr-{unique()}@clinic.example", f"pt-{unique()}@clinic.example"
    add_account(env, doctor, "practitioner", "Practitioner/dr-1")
    add_account(env, patient, "patient", "Patient/pt-1")
    server = ServerProcess(tmp_path_factory.mktemp("console_auth"), env).start()
    yield {"server": server, "doctor": doctor, "patient": patient}
    server.stop()


@pytest.fixture
def http(open_server: dict[str, Any]) -> Iterator[httpx.Client]:
    """A signed-in session on the open server."""
    with httpx.Client(base_url=open_server["server"].url, timeout=60) as client:
        assert sign_in(client, open_server["email"]).status_code == 303
        yield client


# -- in the browser --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("needs Debian's chromium and chromium-driver (make test installs them)")
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not fetch a browser or a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in BROWSER_ARGS:
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    SHOTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


def wait_for(driver: Any, condition: str, timeout: float = 20.0) -> Any:
    """The value of a JavaScript expression once it is truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(f"return {condition};")
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {condition} on {driver.current_url}")


def shoot(driver: Any, name: str) -> None:
    """The whole page, its later parts loaded, images loaded (lazy ones too) and charts drawn."""
    wait_for(driver, "document.querySelectorAll('[data-fragment]:not([data-loaded])').length === 0")
    driver.execute_script("document.querySelectorAll('img[loading=lazy]').forEach(i => i.loading = 'eager')")
    wait_for(driver, "Array.from(document.images).every(i => i.complete)")
    wait_for(driver, "document.querySelectorAll('[data-plot]').length === "
                     "document.querySelectorAll('[data-drawn]').length")
    height = driver.execute_script("return document.documentElement.scrollHeight")
    width = driver.get_window_size()["width"]
    driver.set_window_size(width, min(max(height + 140, 900), 5000))
    driver.save_screenshot(str(SHOTS / f"{name}.png"))
    driver.set_window_size(width, 900)


def images_shown(driver: Any) -> int:
    """How many images on the page were loaded and decoded."""
    return driver.execute_script("return Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0).length")


def site_images(driver: Any, site: str) -> int:
    """The dashboard's count of a site's graded images (0 when it has none), once loaded."""
    assert wait_for(driver, "document.getElementById('readiness').getAttribute('data-loaded')") == "true"
    cells = driver.find_elements("css selector", f'tr[data-site="Organization/{site}"] td.images')
    return int(cells[0].text) if cells else 0


def test_in_the_browser(browser: Any, open_server: dict[str, Any], tmp_path: Path) -> None:
    """Sign in → upload a DICOM file and a PNG (and a file refused) → both in the gallery →
    the patient's page → the dashboard counts them at their site; two overlapping appointments:
    the second is refused on screen; sign out."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    base, site, patient = open_server["server"].url, open_server["site"], open_server["patient"]
    d = browser
    d.get(f"{base}/console/patients")
    assert "/auth/authorize" in d.current_url  # not signed in: the server's own login page
    shoot(d, "01-sign-in")
    d.find_element(By.ID, "email").send_keys(open_server["email"])
    d.find_element(By.ID, "password").send_keys(PASSWORD)
    d.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait_for(d, "location.pathname === '/console/patients'")  # back where the user was going
    cookies = {c["name"]: c for c in d.get_cookies()}
    assert cookies["console_at"]["httpOnly"] and cookies["console_at"]["sameSite"] == "Lax"

    d.get(f"{base}/console/")
    before = site_images(d, site)

    # Upload: the DICOM file, the photograph, and a text file the page refuses.
    photo, text = tmp_path / "fundus.png", tmp_path / "notes.txt"
    photo.write_bytes(png())
    text.write_text("not an image")
    d.get(f"{base}/console/upload?patient={patient}")
    assert Select(d.find_element(By.ID, "patient")).first_selected_option.get_attribute("value") == patient
    Select(d.find_element(By.ID, "site")).select_by_value(f"Organization/{site}")
    Select(d.find_element(By.ID, "eye")).select_by_visible_text("left")
    Select(d.find_element(By.ID, "quality")).select_by_visible_text("high")
    Select(d.find_element(By.ID, "anatomy")).select_by_visible_text("good")
    files = [dicom_file(tmp_path), photo, text]
    d.find_element(By.ID, "files").send_keys("\n".join(str(f) for f in files))
    d.find_element(By.CSS_SELECTOR, "#upload-form button[type=submit]").click()
    wait_for(d, "document.querySelectorAll('#file-list li[data-ok]').length === 3", 60)
    rows = {r.find_element(By.TAG_NAME, "strong").text: r for r in d.find_elements(By.CSS_SELECTOR, "#file-list li")}
    assert rows["ct.dcm"].get_attribute("data-ok") == "true", rows["ct.dcm"].text
    assert "Stored as DICOM" in rows["ct.dcm"].text and "Grading recorded" in rows["ct.dcm"].text
    assert rows["fundus.png"].get_attribute("data-ok") == "true", rows["fundus.png"].text
    assert rows["notes.txt"].get_attribute("data-ok") == "false"
    assert "not a DICOM file or a PNG, JPEG, TIFF" in rows["notes.txt"].text
    shoot(d, "02-upload")

    # The gallery of the site: both, with their thumbnails rendered.
    d.get(f"{base}/console/imaging?site=Organization/{site}")
    items = d.find_elements(By.CSS_SELECTOR, ".gallery li")
    assert sorted(i.get_attribute("data-kind") for i in items) == ["dicom", "photo"]
    shoot(d, "03-gallery")
    assert images_shown(d) == 2
    d.find_element(By.CSS_SELECTOR, '.gallery li[data-kind="dicom"] a').click()
    wait_for(d, "document.getElementById('view-image') && document.getElementById('view-image').naturalWidth > 0")
    d.find_element(By.CSS_SELECTOR, "[data-zoom=in]").click()
    assert d.find_element(By.ID, "zoom-level").text.endswith("%")
    d.find_element(By.ID, "window").send_keys("40,400")
    d.find_element(By.CSS_SELECTOR, "form[aria-label='Window level'] button").click()
    wait_for(d, "location.search.includes('window=') && document.getElementById('view-image').naturalWidth > 0")
    shoot(d, "04-viewer")

    # The photograph's patient: the image in the record.
    d.get(f"{base}/console/patients/{patient}")
    assert d.find_element(By.TAG_NAME, "h1").text == "Paula Photo"
    assert d.find_elements(By.CSS_SELECTOR, '#img-h ~ .gallery li[data-kind="photo"]')
    shoot(d, "05-patient")

    # The dashboard counts both graded images at the site.
    d.get(f"{base}/console/")
    assert site_images(d, site) == before + 2
    shoot(d, "06-dashboard")
    assert len(d.find_elements(By.CSS_SELECTOR, "[data-drawn=true]")) >= 3

    # Scheduling: the second overlapping appointment is refused on the form.
    def book(start: str) -> None:
        d.get(f"{base}/console/appointments")
        Select(d.find_element(By.ID, "a-patient")).select_by_value(patient)
        Select(d.find_element(By.ID, "a-practitioner")).select_by_value(open_server["doctor"])
        d.execute_script("document.getElementById('a-start').value = arguments[0]", start)
        duration = d.find_element(By.ID, "a-duration")
        duration.clear()
        duration.send_keys("30")
        d.find_element(By.CSS_SELECTOR, "#schedule button[type=submit]").click()
        wait_for(d, "document.getElementById('booked') || document.getElementById('form-error')")

    book("2031-03-04T10:00")
    assert "Booked" in d.find_element(By.ID, "booked").text
    book("2031-03-04T10:15")
    error = d.find_element(By.ID, "form-error").text
    assert "already has an appointment" in error and "Appointment/" in error, error
    shoot(d, "07-appointments")

    d.get(f"{base}/console/interactions?insurance=884512306&label=cardiology")
    rows = d.find_elements(By.CSS_SELECTOR, "#interactions tbody tr")
    assert len(rows) == 2 and all("cardiology" in r.text for r in rows), [r.text for r in rows]
    rows[-1].find_element(By.TAG_NAME, "a").click()  # the oldest: the first hypertension follow-up
    assert "Increase amlodipine to 10 mg daily" in d.find_element(By.ID, "next-steps").text
    assert "Are you taking your medication every day?" in d.find_element(By.ID, "qa").text
    assert "148" in d.find_element(By.ID, "metrics").text  # the blood pressure
    shoot(d, "13-interaction")

    for name, path in (("08-patients", "/console/patients"), ("09-interactions", "/console/interactions"),
                       ("10-browser", f"/console/browse?type=Patient&q=_id={patient}"),
                       ("11-profile", "/console/profile")):
        d.get(base + path)
        assert not d.find_elements(By.CSS_SELECTOR, ".error"), (path, d.page_source[:3000])
        shoot(d, name)
    assert "Grey" in d.find_element(By.TAG_NAME, "main").text  # the profile names the Practitioner

    d.set_window_size(800, 1000)  # a tablet's width
    d.get(f"{base}/console/")
    shoot(d, "12-dashboard-tablet")
    assert d.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1")
    d.set_window_size(1280, 900)

    d.find_element(By.CSS_SELECTOR, ".account button").click()
    wait_for(d, "document.body.textContent.includes('You are signed out')")
    d.get(f"{base}/console/")
    assert "/auth/authorize" in d.current_url


# -- over HTTP: the error paths ----------------------------------------------------------------------


def test_not_signed_in(open_server: dict[str, Any]) -> None:
    with httpx.Client(base_url=open_server["server"].url, timeout=30) as anonymous:
        answer = anonymous.get("/console/patients?name=x")
        assert answer.status_code == 303
        assert answer.headers["location"] == "/console/login?next=%2Fconsole%2Fpatients%3Fname%3Dx"
        assert anonymous.get("/console/images/binary/x").status_code == 401
        refused = anonymous.post("/console/upload/file", files={"files": ("a.png", png())})
        assert refused.status_code == 401 and "sign in" in refused.json()["message"]
    with httpx.Client(base_url=open_server["server"].url, timeout=30,
                      cookies={"console_at": "forged", "console_seed": "x"}) as forged:
        assert forged.get("/console/profile").status_code == 303  # a cookie is not a session: the token must be valid
    with httpx.Client(base_url=open_server["server"].url, timeout=30) as anonymous:
        # A callback that this browser did not start.
        stray = anonymous.get("/console/callback", params={"code": "x", "state": "y"})
        assert stray.status_code == 400 and "not started here" in stray.text


def test_forms_need_their_csrf_token(http: httpx.Client, open_server: dict[str, Any]) -> None:
    form = {"patient": open_server["patient"], "practitioner": open_server["doctor"], "start": "2032-01-01T09:00",
            "duration": "30", "csrf": "0" * 64}
    answer = http.post("/console/appointments", data=form)
    assert answer.status_code == 403 and "out of date" in answer.text
    count = httpx.get(f"{open_server['server'].url}/fhir/Appointment",
                      params={"date": "2032-01-01", "_summary": "count"}).json()["total"]
    assert count == 0  # nothing booked
    answer = http.post("/console/logout", data={"csrf": "nope"})
    assert answer.status_code == 403
    assert http.get("/console/profile").status_code == 200  # still signed in


def test_a_booking_builds_its_page_once(http: httpx.Client, open_server: dict[str, Any]) -> None:
    """The page answering a booking is built after it: the new appointment is listed, and it took
    as many API reads as the page alone does."""
    server, patient = open_server["server"], open_server["patient"]
    since = len(server.log())
    page = http.get("/console/appointments", params={"patient": patient})
    alone = fhir_reads(server, since)
    description = f"Check-up {unique()[:8]}"
    form = {"patient": patient, "practitioner": open_server["doctor"], "start": "2033-02-03T08:00",
            "duration": "20", "description": description, "csrf": csrf_of(page.text)}
    since = len(server.log())
    answer = http.post("/console/appointments", data=form)
    assert answer.status_code == 200 and 'id="booked"' in answer.text, answer.text[:2000]
    assert f"<td>{description}</td>" in answer.text
    assert fhir_reads(server, since) == alone


def test_upload_refusals_are_shown_per_file(http: httpx.Client, open_server: dict[str, Any]) -> None:
    csrf = csrf_of(http.get("/console/upload").text)
    files = [("files", ("notes.txt", b"hello")), ("files", ("empty.png", b"")),
             ("files", ("good.png", png((10, 200, 10))))]
    answer = http.post("/console/upload", data={"csrf": csrf, "patient": "no-such-patient"}, files=files)
    assert answer.status_code == 400, answer.text
    items = re.findall(r'<li class="bad" data-ok="false"><strong>([^<]+)</strong>[^:]*: ([^<]+)', answer.text)
    messages = {name: html.unescape(text) for name, text in items}
    assert "not a DICOM file or a PNG" in messages["notes.txt"]
    assert "empty" in messages["empty.png"]
    assert "there is no patient 'no-such-patient'" in messages["good.png"]
    # The script's route: one file, its outcome as JSON.
    one = http.post("/console/upload/file", data={"csrf": csrf, "patient": open_server["patient"], "site": "x"},
                    files={"files": ("good.png", png())})
    assert one.status_code == 422 and "site must be one of the list" in one.json()["message"]
    one = http.post("/console/upload/file", data={"csrf": csrf, "patient": open_server["patient"]},
                    files={"files": ("good.png", png())})
    assert one.status_code == 200 and one.json()["ok"], one.text


def test_resource_browser(http: httpx.Client, open_server: dict[str, Any]) -> None:
    unknown = http.get("/console/browse", params={"type": "NoSuchType"})
    assert unknown.status_code == 404 and 'role="alert"' in unknown.text and "Traceback" not in unknown.text
    bad = http.get("/console/browse", params={"type": "Patient", "q": "birthdate=notadate"})
    assert bad.status_code == 400 and "birthdate" in bad.text
    patient = open_server["patient"]
    found = http.get("/console/browse", params={"type": "Patient", "q": f"_id={patient}"})
    assert found.status_code == 200 and f'href="/console/browse/Patient/{patient}"' in found.text
    document = http.get(f"/console/browse/Patient/{patient}")
    assert document.status_code == 200 and "&quot;resourceType&quot;: &quot;Patient&quot;" in document.text
    assert http.get("/console/browse/Patient/no-such-one").status_code == 404
    assert http.get("/console/patients/no-such-one").status_code == 404
    assert http.get("/console/imaging/view/dicom/1.2.3").status_code == 404
    # What a page is given stays a type or an id: no way out of the FHIR base with the user's token.
    for path in ("/console/browse?type=../auth/jwks", "/console/browse/..%2F..%2Fauth%2Fjwks", "/console/patients/%2e%2e"):
        escaped = http.get(path)
        assert escaped.status_code == 400 and "Not a valid resource type, id or path" in escaped.text, path


def test_static_files_from_installed_packages(http: httpx.Client) -> None:
    from heroicons.jinja import heroicon_mini

    plotly = http.get("/console/static/vendor/plotly.min.js")
    assert plotly.status_code == 200 and plotly.headers["content-type"].startswith("text/javascript")
    assert http.get("/console/static/vendor/plotly.min.js", headers={"If-None-Match": plotly.headers["etag"]}
                    ).status_code == 304
    css = http.get("/console/static/vendor/plotly.css")
    assert css.status_code == 200 and ".js-plotly-plot .plotly .main-svg{position:absolute" in css.text
    assert http.get("/console/static/..%2Fsession.py").status_code == 404
    page = http.get("/console/")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "<script>" not in page.text and " style=" not in page.text  # nothing inline
    home = str(heroicon_mini("home", **{"class": "icon"}))  # the installed icon set's own SVG
    assert home in page.text and 'aria-hidden="true"' in home


def test_slow_parts_come_later_and_without_scripts(http: httpx.Client, open_server: dict[str, Any]) -> None:
    """AI readiness and the patient statistics are fragments the page fetches, and pages of their
    own for a browser without scripts."""
    dashboard = http.get("/console/")
    assert 'data-fragment="/console/readiness?fragment=1"' in dashboard.text
    assert 'href="/console/readiness"' in dashboard.text  # in <noscript>
    fragment = http.get("/console/readiness?fragment=1")
    assert fragment.status_code == 200 and fragment.text.startswith("<div data-fragment-body>")
    site = open_server["site"]
    assert f'data-site="Organization/{site}"' in fragment.text or "No graded images" in fragment.text
    assert "<h1>AI readiness</h1>" in http.get("/console/readiness").text
    patients = http.get("/console/patients", params={"gender": "female"})
    assert 'data-fragment="/console/statistics/patients?gender=female&amp;fragment=1"' in patients.text
    statistics = http.get("/console/statistics/patients", params={"gender": "female", "fragment": "1"})
    female = re.search(r'data-gender="female"><strong>(\d+)</strong>', statistics.text)
    assert female and int(female.group(1)) >= 1
    assert re.search(r'data-gender="male"><strong>(\d+)</strong>', statistics.text)


def test_with_authorization_on(auth_server: dict[str, Any]) -> None:
    """The console's calls carry the user's token; an expired one is renewed with the refresh
    token; a patient's account cannot use the console."""
    with httpx.Client(base_url=auth_server["server"].url, timeout=30) as http:
        assert sign_in(http, auth_server["doctor"], "/console/patients").headers["location"] == "/console/patients"
        assert http.get("/fhir/Patient").status_code == 401  # the cookie is not a bearer token for the API
        first = http.cookies["console_at"]
        assert http.get("/console/patients").status_code == 200
        http.cookies.delete("console_at")  # as when it has expired: the refresh token gets another
        answer = http.get("/console/profile")
        assert answer.status_code == 200 and "dr-1" in answer.text
        assert http.cookies["console_at"] != first  # renewed, and sent back with the page
        csrf = csrf_of(answer.text)
        refresh = http.cookies["console_rt"]
        assert http.post("/console/logout", data={"csrf": csrf}).status_code == 200
        renewed = http.post("/auth/token", data={"grant_type": "refresh_token", "client_id": "fhir-console",
                                                 "refresh_token": refresh})
        assert renewed.status_code == 400 and renewed.json()["error"] == "invalid_grant"  # revoked
        assert http.get("/console/profile").status_code == 303  # the cookies are gone
    with httpx.Client(base_url=auth_server["server"].url, timeout=30) as http:
        answer = sign_in(http, auth_server["patient"])
        assert answer.status_code == 400 and "for practitioners" in answer.text
        location = parse_qs(urlsplit(str(answer.url)).query)
        assert location["error"] == ["invalid_scope"]


def test_two_tabs_renewing_at_once_keep_the_session(auth_server: dict[str, Any]) -> None:
    """Two tabs of one browser, their access token expired, renew it with the same refresh token
    (each before the other's new cookies arrive): both pages come, and the session goes on in
    each; a refresh token of another client presented twice is still a replay (tests/test_accounts.py)."""
    with httpx.Client(base_url=auth_server["server"].url, timeout=30) as one, \
            httpx.Client(base_url=auth_server["server"].url, timeout=30) as two:
        assert sign_in(one, auth_server["doctor"], "/console/patients").status_code == 303
        one.cookies.delete("console_at")  # expired
        for cookie in one.cookies.jar:  # the same browser: the same cookies
            two.cookies.jar.set_cookie(cookie)
        assert one.get("/console/profile").status_code == 200  # spends the refresh token
        assert two.get("/console/profile").status_code == 200  # presents it again, a moment later
        assert one.cookies["console_rt"] != two.cookies["console_rt"]
        for tab in (one, two):
            tab.cookies.delete("console_at")
            answer = tab.get("/console/profile")
            assert answer.status_code == 200 and "dr-1" in answer.text  # neither session was revoked


# -- pure parts ------------------------------------------------------------------------------------


class TableValidator:
    """A token validator that answers from a table: a token's claims, or the error it raises."""

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers

    async def validate(self, token: str, audience: str, own_issuer: str) -> Any:
        answer = self.answers[token]
        if isinstance(answer, Exception):
            raise answer
        return answer


def console_request(answers: dict[str, Any], cookies: str, path: str = "/console/", token_endpoint: Any = None) -> Any:
    """A GET of `path` with these cookies, in an in-process app whose token validator answers
    from `answers` (a token's claims, or the error it raises) and whose /auth/token is
    `token_endpoint`."""
    from fastapi import FastAPI, Request

    app = FastAPI()
    if token_endpoint is not None:
        app.add_api_route("/auth/token", token_endpoint, methods=["POST"])
    app.state.auth = SimpleNamespace(validator=TableValidator(answers))
    app.state.settings = SimpleNamespace(base_url=None, auth_issuer=None)
    return Request({"type": "http", "app": app, "method": "GET", "path": path, "root_path": "", "scheme": "http",
                    "server": ("testserver", 80), "client": ("127.0.0.1", 1), "query_string": b"",
                    "headers": [(b"cookie", cookies.encode())]})


def session_of(token_endpoint: Any, answers: dict[str, Any], cookies: str) -> Any:
    """`current()` of a console request with these cookies, in an app whose /auth/token is
    `token_endpoint` and whose validator answers from `answers`: the Session, or the exception."""
    import asyncio

    from fhir_server.console.session import current

    request = console_request(answers, cookies, token_endpoint=token_endpoint)
    try:
        return asyncio.run(current(request))
    except Exception as exc:  # noqa: BLE001 - what current() raised is the answer
        return exc


def test_a_failed_renewal_keeps_a_valid_session() -> None:
    """A refresh that is refused, fails, or whose new token the database cannot check keeps a
    still-valid access token's session; once it is no longer valid, the user signs in again."""
    from fastapi.responses import JSONResponse
    from pymongo.errors import OperationFailure

    from fhir_server.auth.tokens import InvalidToken
    from fhir_server.console.session import Session, SignInNeeded

    def refused() -> JSONResponse:
        return JSONResponse({"error": "invalid_grant"}, 400)

    def broken() -> JSONResponse:
        raise OperationFailure("the database failed")

    def renewed() -> JSONResponse:
        return JSONResponse({"access_token": "new", "refresh_token": "rt-2"})

    closing = SimpleNamespace(expires=time.time() + 30)  # valid, but due for renewal
    cookies = "console_at=old; console_rt=rt-1; console_seed=seed"
    unchecked = OperationFailure("the database failed")
    for endpoint in (refused, broken):
        kept = session_of(endpoint, {"old": closing}, cookies)
        assert isinstance(kept, Session) and kept.token == "old" and kept.cookies == {}, (endpoint, kept)
        assert isinstance(session_of(endpoint, {"old": InvalidToken("expired")}, cookies), SignInNeeded)
    kept = session_of(renewed, {"old": closing, "new": unchecked}, cookies)
    assert isinstance(kept, Session) and kept.token == "old"
    assert kept.cookies == {"console_at": "new", "console_rt": "rt-2"}  # the spent refresh token's successor
    assert isinstance(session_of(renewed, {"old": InvalidToken("expired"), "new": unchecked}, cookies), SignInNeeded)
    fresh = session_of(renewed, {"old": closing, "new": SimpleNamespace(expires=time.time() + 300)}, cookies)
    assert isinstance(fresh, Session) and fresh.token == "new" and fresh.refresh == "rt-2"


def test_a_page_whose_template_fails_is_the_error_page() -> None:
    """A defect while filling a template in gives the console's error page (500), not a bare error."""
    import asyncio

    from fhir_server.console.render import page

    @page
    async def broken(request: Any, session: Any, api: Any) -> tuple[str, dict[str, Any]]:
        return "no-such-template.html", {"title": "Broken"}

    claims = SimpleNamespace(expires=time.time() + 600, fhir_user="Practitioner/1", subject="u1")
    request = console_request({"at": claims}, "console_at=at; console_seed=seed", "/console/broken")
    answer = asyncio.run(broken(request))
    assert answer.status_code == 500
    assert b"Cannot show this page" in answer.body and b"Something went wrong" in answer.body


class StowOnly:
    """The console's API where STOW-RS stores a study but reading the ImagingStudy back fails."""

    async def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        instance = "http://testserver/dicomweb/studies/1.2.3/series/1.2.3.4/instances/1.2.3.4.5"
        return httpx.Response(200, json={"00081199": {"Value": [{"00081190": {"Value": [instance]},
                                                                 "00081155": {"Value": ["1.2.3.4.5"]}}]}})

    async def read(self, path: str, params: Any = None) -> dict[str, Any]:
        from fhir_server.console.api import ApiError

        raise ApiError(503, "the database is unreachable")

    async def fhir(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        raise AssertionError("no grading can be written without the study's patient")


def test_a_stored_study_not_read_back_says_so(tmp_path: Path) -> None:
    """The message names what failed: the reading back, and the grading only when one was asked for."""
    import asyncio

    from fhir_server.console.upload import store

    settings = SimpleNamespace(max_request_bytes=0, max_body_bytes=10**7, max_bundle_bytes=10**7,
                               upload_max_bytes=10**7)
    request: Any = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(settings=settings)))
    data = dicom_file(tmp_path).read_bytes()
    plain = asyncio.run(store(request, StowOnly(), "ct.dcm", data, {"patient": ""}))
    assert plain.ok and "grading" not in plain.message, plain
    assert plain.message == ("Stored as DICOM in study 1.2.3, but the study could not be read back "
                             "(the database is unreachable).")
    graded = {"patient": "", "site": "Organization/s1", "eye": "left", "quality": "high", "anatomy": "good"}
    refused = asyncio.run(store(request, StowOnly(), "ct.dcm", data, graded))
    assert not refused.ok and refused.message.endswith("could not be read back (the database is unreachable), "
                                                       "so the grading was not recorded."), refused


def test_raw_json_is_escaped_and_links_references() -> None:
    from fhir_server.console.json_html import to_html

    shown = str(to_html({"subject": {"reference": "Patient/p1"}, "note": "<script>x</script>",
                         "link": {"reference": "http://elsewhere.example/Patient/p2"},
                         "full": {"reference": "http://127.0.0.1:9/fhir/Encounter/e1/_history/2"}},
                        "http://127.0.0.1:9/fhir"))
    assert '<a href="/console/browse/Patient/p1">&quot;Patient/p1&quot;</a>' in shown
    assert "<script>" not in shown and "&lt;script&gt;" in shown
    assert "elsewhere.example/Patient/p2&quot;" in shown and 'href="http://elsewhere' not in shown
    assert 'href="/console/browse/Encounter/e1/_history/2"' in shown


def test_readiness_report_per_site() -> None:
    from fhir_server.console import readiness

    def population(code: str, count: int) -> dict[str, Any]:
        return {"code": {"coding": [{"code": code}]}, "count": count}

    def group(name: str, site: str | None, images: int, ready: int, over: int) -> dict[str, Any]:
        found: dict[str, Any] = {
            "code": {"text": name},
            "population": [population("initial-population", images), population("numerator", ready),
                           population("assessed-patients", 2)],
            "stratifier": [{"code": [{"coding": [{"code": "over-illuminated"}]}], "stratum": [
                {"value": {"coding": [{"code": "Y", "display": "Yes"}]},
                 "population": [population("initial-population", over)]},
                {"value": {"coding": [{"code": "N", "display": "No"}]},
                 "population": [population("initial-population", images - over)]}]}],
        }
        if site:
            found["extension"] = [{"url": "x", "valueReference": {"reference": site}}]
        return found

    sites = readiness.sites({"group": [group("All sites", None, 10, 5, 2), group("North", "Organization/n", 4, 1, 1)]})
    assert [(s.name, s.reference, s.images, s.ready) for s in sites] == [("All sites", None, 10, 5),
                                                                         ("North", "Organization/n", 4, 1)]
    assert sites[1].ready_share == 0.25 and sites[1].over_illuminated_share == 0.25
    figure = readiness.charts(sites)["shares"]
    assert figure["data"][0]["x"] == ["North"] and figure["data"][0]["y"] == [0.25]
