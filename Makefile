# Two commands for a fresh machine with Python 3.11+: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test bench clean dcmtk chromium

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[embedded,test]'
	touch $@

run: $(BIN)/.installed  ## FHIR API on :8080, embedded database under ./data
	$(BIN)/fhir-server serve

dcmtk:  ## DCMTK (echoscu, storescu), the modality the DICOM tests use
	command -v storescu >/dev/null || { apt-get update -qq && apt-get install -y -qq dcmtk; }

chromium:  ## Debian's chromium and its driver, the browser of the web console's tests (never a downloaded one)
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium chromium-driver; }

test: $(BIN)/.installed dcmtk chromium  ## lint, then the test suite (starts its own database and servers)
	$(BIN)/ruff check fhir_server dicom_node mappings tests bench
	$(BIN)/python -m pytest

bench: $(BIN)/.installed  ## server vs. raw driver: CRUD, search on 100,000 resources, transactions; DICOM C-STORE vs. storescp and Orthanc; query/retrieve and DICOMweb vs. Orthanc; the web console's page loads on 500 patients (needs wrk, dcmtk, curl, orthanc, orthanc-dicomweb: apt-get install wrk dcmtk curl orthanc orthanc-dicomweb)
	$(BIN)/python bench/crud.py
	$(BIN)/python bench/search.py
	$(BIN)/python bench/transaction.py
	$(BIN)/python bench/dicom_store.py
	$(BIN)/python bench/dicomweb.py
	$(BIN)/python bench/console.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
