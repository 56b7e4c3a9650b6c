"""The GPU slot a pipeline run holds: one slot of a Prefect global concurrency limit around its stages."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from distillery.config import ConcurrencyConfig


@contextmanager
def gpu_slot(c: ConcurrencyConfig) -> Iterator[None]:
    """Hold one slot of the limit around the heavy work. Prefect's `concurrency()` logs a warning and goes on when
    the limit does not exist; we look first, so `distillery run` on an ephemeral API (no limit) says why it
    takes no slot instead, and never waits on a limit nobody created."""
    if not c.enabled:
        yield
        return
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(c.limit_name)
        except ObjectNotFound:
            print(
                f"no concurrency limit {c.limit_name!r} on this Prefect API: this run takes no slot "
                "(`distillery deploy` creates it)"
            )
            yield
            return
    start = time.monotonic()
    # a renewal hiccup must not kill hours of training; the lease is renewed in the background while we hold it
    with concurrency(c.limit_name, occupy=1, strict=True, raise_on_lease_renewal_failure=False):
        print(f"holding a slot of concurrency limit {c.limit_name!r} (waited {time.monotonic() - start:.0f}s)")
        yield
