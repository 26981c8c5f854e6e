"""Test helper (not product code): read Prefect events back through the API.

    evs = wait_for_events(["fire-mpo.stage.completed"], since, until=lambda e: len(e) >= 4)
    evs[0].resource.id, evs[0].payload

Events reach the server asynchronously (the client's events worker, then the server's
persister), so reads poll until ``until(events)`` holds or ``timeout_s`` passes; the last read is
returned either way and the caller's assertion says what is missing.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Sequence

from prefect.client.orchestration import get_client
from prefect.events import Event
from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter


def read_events(names: Sequence[str], since: datetime.datetime) -> list[Event]:
    """Every event named one of `names` that occurred since `since`, oldest first."""
    until = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
    flt = EventFilter(
        occurred=EventOccurredFilter(since=since, until=until),
        event=EventNameFilter(name=list(names)),
    )
    with get_client(sync_client=True) as client:
        page = client.read_events(filter=flt, limit=50)  # the API's maximum
        out = list(page.events)
        while page.next_page:
            page = client.read_events_page(page.next_page)
            out += page.events
    return sorted(out, key=lambda e: e.occurred)


def wait_for_events(
    names: Sequence[str],
    since: datetime.datetime,
    until: Callable[[list[Event]], bool],
    timeout_s: float = 60.0,
) -> list[Event]:
    """:func:`read_events` polled every half second until `until(events)` or the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        events = read_events(names, since)
        if until(events) or time.monotonic() > deadline:
            return events
        time.sleep(0.5)


def related_ids(event: Event, role: str) -> set[str]:
    """The ids of `event`'s related resources with `role`."""
    return {r.id for r in event.related if r.role == role}
