"""No double booking: an Appointment may not overlap another one of the same practitioner.

The rule, checked on every write of an Appointment (create, update, conditional create and update,
patch, and the entries of batches and transactions):

- An appointment books each `Practitioner/…` among its participants' actors, except participants
  who declined, for [start, end): `end`, else `start` + `minutesDuration`. Two bookings of one
  practitioner conflict when `start < other.end and other.start < end`, so back-to-back slots
  (one ends at 10:00, the next starts at 10:00) are fine.
- Statuses that hold a slot: proposed, pending, booked, arrived, checked-in, waitlist, and
  fulfilled (a past appointment keeps its slot: booking into it would rewrite history).
  Cancelled, noshow and entered-in-error free the slot; an appointment written with one of these
  statuses is never refused.
- Appointments without a start, without an end or duration, or lasting more than 24 hours
  (multi-day stays, not slot bookings) are not bookings: they neither conflict nor are refused.
  This bounds the search for conflicts to what starts at most 24 hours before the new end.
- Only `Practitioner` actors are checked (not PractitionerRole, Location, Device).

A conflict is a 409 whose OperationOutcome names the appointment already holding the slot.
Check and write are made under one MongoDB lock per practitioner (`storage.locks.hold`), so two
server processes booking the same practitioner at once are serialised: the second one sees the
first one's appointment.
"""

from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from dateutil.parser import isoparse
from pymongo.asynchronous.database import AsyncDatabase

from fhir_server.errors import Conflict
from fhir_server.search.criteria import parse_query_string
from fhir_server.search.dates import ONE_MS
from fhir_server.search.indexer import references
from fhir_server.search.registry import parameter
from fhir_server.services.search import SearchService
from fhir_server.storage import locks

APPOINTMENT = "Appointment"
HOLDS_SLOT = ("proposed", "pending", "booked", "arrived", "fulfilled", "checked-in", "waitlist")
LONGEST = timedelta(hours=24)  # longer appointments are not slot bookings


class DoubleBooking(Conflict):
    """A write that would book a practitioner twice; `appointment_id` is the one being written."""

    def __init__(self, diagnostics: str, *, appointment_id: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("expression", f"{APPOINTMENT}.start")
        super().__init__(diagnostics, **kwargs)
        self.appointment_id = appointment_id


@dataclass(frozen=True)
class Booking:
    """The slot an appointment holds: its practitioners (`Practitioner/id`) over [start, end)."""

    practitioners: frozenset[str]
    start: datetime
    end: datetime

    def overlaps(self, other: "Booking") -> bool:
        return self.start < other.end and other.start < self.end


def booking(resource: dict[str, Any] | None, base_url: str = "") -> Booking | None:
    """The slot `resource` (an Appointment) holds, or None when it holds none."""
    if not resource or resource.get("status") not in HOLDS_SLOT:
        return None
    start = _instant(resource.get("start"))
    if start is None:
        return None
    end = _instant(resource.get("end"))
    minutes = resource.get("minutesDuration")
    try:
        if end is None and isinstance(minutes, int) and not isinstance(minutes, bool):
            end = start + timedelta(minutes=minutes)
        if end is None or not start < end <= start + LONGEST:
            return None
        start - LONGEST, end + ONE_MS  # noqa: B018 - the search bounds must exist too
    except OverflowError:  # at the ends of the calendar: no slot to book
        return None
    attending = [p for p in resource.get("participant", []) if isinstance(p, dict) and p.get("status") != "declined"]
    found = references(parameter(APPOINTMENT, "practitioner"), {**resource, "participant": attending}, base_url)
    practitioners = frozenset(r for r in found if r.startswith("Practitioner/"))
    return Booking(practitioners, start, end) if practitioners else None


def _instant(value: Any) -> datetime | None:
    """An instant as an aware UTC datetime; None when absent or not an instant with a zone."""
    if not isinstance(value, str) or "T" not in value:
        return None
    try:
        parsed = isoparse(value)
        return parsed.astimezone(UTC) if parsed.tzinfo is not None else None
    except (ValueError, OverflowError):
        return None


def _search_instant(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class Scheduling:
    """Refuses double bookings of practitioners; see the module's docstring for the rule."""

    def __init__(self, searches: SearchService, db: AsyncDatabase, wait_s: float = 20.0) -> None:
        self.searches = searches
        self.db = db
        self.wait_s = wait_s

    @asynccontextmanager
    async def booked(
        self,
        resource_type: str,
        changes: Mapping[str, dict[str, Any] | None],
        labels: Mapping[str, str] | None = None,
    ) -> AsyncIterator[None]:
        """Hold the locks of every practitioner that `changes` (the next version of each
        Appointment written, by id; None for a deletion) book, and raise DoubleBooking unless
        their bookings fit; write them inside the block. `labels` name the changes written
        together (a transaction's entries) in the message of a conflict between two of them."""
        if resource_type != APPOINTMENT:
            yield
            return
        base_url = self.searches.repository.base_url
        bookings = {i: b for i, resource in changes.items() if (b := booking(resource, base_url))}
        keys = sorted({p for b in bookings.values() for p in b.practitioners})  # one order: no deadlock
        async with AsyncExitStack() as stack:
            for practitioner in keys:
                await stack.enter_async_context(locks.hold(self.db, f"schedule:{practitioner}", wait_s=self.wait_s))
            await self._check(bookings, set(changes), labels or {})
            yield

    async def _check(self, bookings: dict[str, Booking], written: set[str], labels: Mapping[str, str]) -> None:
        """Each booking against the stored ones (those rewritten here excepted) and the others
        written together (a transaction's entries)."""
        for appointment_id, wanted in sorted(bookings.items()):
            for other_id, other in sorted(bookings.items()):
                if other_id < appointment_id and wanted.overlaps(other) and wanted.practitioners & other.practitioners:
                    name = labels.get(other_id, f"Appointment/{other_id}")
                    raise _refused(appointment_id, wanted, name, other, "written with it")
            for practitioner in sorted(wanted.practitioners):
                for stored_id, stored in await self._stored(practitioner, wanted):
                    if stored_id not in written and wanted.overlaps(stored):
                        raise _refused(appointment_id, wanted, f"Appointment/{stored_id}", stored)

    async def _stored(self, practitioner: str, wanted: Booking) -> list[tuple[str, Booking]]:
        """Stored bookings of `practitioner` that start before `wanted` ends and at most
        LONGEST before it starts (any longer one is not a booking)."""
        query = urlencode([
            ("actor", practitioner),
            ("status", ",".join(HOLDS_SLOT)),
            ("date", "lt" + _search_instant(wanted.end + ONE_MS)),
            ("date", "ge" + _search_instant(wanted.start - LONGEST)),
        ])
        criteria = parse_query_string(APPOINTMENT, query)
        limit = self.searches.max_results
        found = await self.searches.matches(APPOINTMENT, criteria, limit=limit + 1)
        if len(found) > limit:  # refuse rather than check only some of them
            raise Conflict(
                f"{practitioner} has more than {limit} bookings around {_search_instant(wanted.start)}: "
                "the appointment cannot be checked against all of them"
            )
        base_url = self.searches.repository.base_url
        return [
            (version.id, slot)
            for version in found
            if (slot := booking(version.resource, base_url)) and practitioner in slot.practitioners
        ]


def _refused(appointment_id: str, wanted: Booking, other: str, slot: Booking, where: str = "") -> DoubleBooking:
    shared = ", ".join(sorted(wanted.practitioners & slot.practitioners))
    return DoubleBooking(
        f"Double booking: {shared} already has {other}{' ' + where if where else ''} "
        f"from {slot.start.isoformat()} to {slot.end.isoformat()}, which overlaps "
        f"{wanted.start.isoformat()} to {wanted.end.isoformat()}",
        appointment_id=appointment_id,
    )
