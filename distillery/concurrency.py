"""The GPU slot a pipeline run holds: one slot of a Prefect global concurrency limit around its stages."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from distillery.config import ConcurrencyConfig
from distillery.console import say

LEASE_TAG = "distillery.concurrency_lease"  # on the MLflow parent run: what a reaper releases when the run died
LEASE_SECONDS = 300  # renewed in the background while held; a dead holder's slot expires after this


@contextmanager
def gpu_slot(c: ConcurrencyConfig, on_lease: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold one slot of the limit around the heavy work. Prefect's `concurrency()` logs a warning and goes on when
    the limit does not exist; we look first, so `distillery run` on an ephemeral API (no limit) says why it
    takes no slot instead, and never waits on a limit nobody created.

    `on_lease(lease_id)` is told the slot's lease as soon as it is held: the run records it, so that when its process
    dies (kill -9, a lost machine) the run that reaps it releases the slot at once (`release_lease`) instead of every
    run of the pool waiting up to the lease's 5 minutes for it to expire. Prefect's `concurrency()` does not expose
    the lease, so this is its body, from the same (semi-private) helpers."""
    if not c.enabled:
        yield
        return
    from prefect.client.orchestration import get_client
    from prefect.concurrency._sync import (
        acquire_concurrency_slots_with_lease,
        maintain_concurrency_lease,
        release_concurrency_slots_with_lease,
    )
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(c.limit_name)
        except ObjectNotFound:
            say(
                f"no concurrency limit {c.limit_name!r} on this Prefect API: this run takes no slot "
                "(`distillery deploy` creates it)"
            )
            yield
            return
    start = time.monotonic()
    held = acquire_concurrency_slots_with_lease([c.limit_name], 1, strict=True, lease_duration=LEASE_SECONDS)
    try:
        say(f"holding a slot of concurrency limit {c.limit_name!r} (waited {time.monotonic() - start:.0f}s)")
        if on_lease:
            on_lease(str(held.lease_id))
        # a renewal hiccup must not kill hours of training; the lease is renewed in the background while we hold it
        with maintain_concurrency_lease(held.lease_id, LEASE_SECONDS, raise_on_lease_renewal_failure=False):
            yield
    finally:
        release_concurrency_slots_with_lease(held.lease_id)


def release_lease(lease_id: str) -> bool:
    """Give back a dead run's slot now (True), or say it was gone already (expired, or released: False)."""
    from uuid import UUID

    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            client.release_concurrency_slots_with_lease(UUID(lease_id))
        return True
    except Exception:  # expired and revoked by the server, or an API this process cannot reach
        return False
