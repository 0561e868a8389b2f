"""The DICOM catalog in-process, against the embedded database: what a real server cannot be
made to do on cue (a write failing halfway), and how queries reach the database."""

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pydicom
import pytest
from conftest import unique
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pymongo import AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import OperationFailure

from dicom_node.catalog import Catalog
from fhir_server.storage.client import CODEC_OPTIONS
from fhir_server.storage.embedded import EmbeddedDatabase
from mappings.dicom import instance_facts


def facts_of(study: str, series: str, **attributes: object) -> dict[str, Any]:
    """The facts the indexer hands the catalog for a new CT instance of `study`/`series`."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return {**instance_facts(ds), "path": f"{study}/{series}/{ds.SOPInstanceUID}.dcm", "size": 1}


def run(database: EmbeddedDatabase, scenario: Callable[[Catalog], Coroutine[Any, Any, None]]) -> None:
    """`scenario` on a catalog in a database of its own."""

    async def main() -> None:
        client: AsyncMongoClient = AsyncMongoClient(database.uri)
        try:
            await scenario(Catalog(client.get_database(f"fhir_catalog_{unique()}", codec_options=CODEC_OPTIONS)))
        finally:
            await client.close()

    asyncio.run(main())


def fail_once(monkeypatch: pytest.MonkeyPatch, method: str, collection: str) -> None:
    """The next `method` call on `collection` fails, as a write interrupted there would."""
    original = getattr(AsyncCollection, method)
    failed: list[bool] = []

    async def failing(self: AsyncCollection, *args: Any, **kwargs: Any) -> Any:
        if self.name == collection and not failed:
            failed.append(True)
            raise OperationFailure("interrupted for the test")
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(AsyncCollection, method, failing)


@pytest.mark.parametrize(("method", "collection"), [
    ("update_one", "dicom_series"), ("find_one_and_update", "dicom_studies")])
def test_counts_are_right_after_a_write_failed_halfway(
    database: EmbeddedDatabase, monkeypatch: pytest.MonkeyPatch, method: str, collection: str
) -> None:
    """The instances' upsert succeeded, the series' or study's update did not: recording the
    same instances again (the indexer's retries) leaves every count right."""
    study, first, second = generate_uid(), generate_uid(), generate_uid()
    batch = [facts_of(study, first), facts_of(study, first), facts_of(study, second, Modality="MR")]

    async def scenario(catalog: Catalog) -> None:
        await catalog.prepare()
        fail_once(monkeypatch, method, collection)
        with pytest.raises(OperationFailure):
            await catalog.record(batch)
        await catalog.record(batch)
        found = await catalog.studies.find_one({"_id": study})
        assert found is not None
        assert (found["NumberOfStudyRelatedSeries"], found["NumberOfStudyRelatedInstances"]) == (2, 3)
        assert sorted(found["ModalitiesInStudy"]) == ["CT", "MR"]
        counts = {d["_id"]: d["NumberOfSeriesRelatedInstances"] async for d in catalog.series.find({"StudyInstanceUID": study})}
        assert counts == {first: 2, second: 1}
        await catalog.record(batch[:1])  # sent again: nothing changes
        again = await catalog.studies.find_one({"_id": study})
        assert again is not None and again["NumberOfStudyRelatedInstances"] == 3

    run(database, scenario)


