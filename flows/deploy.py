"""Prefect deployments of the pipelines: schedules, the GPU concurrency limit, work-pool deployments.

    distillery deploy --work-pool local   # distill/<pipeline> per pipeline, run by `prefect worker start --pool local`
    distillery serve                      # the same deployments, run by this process

A run holds one slot of the global concurrency limit (`concurrency.limit_name`, default `distillery-gpu`) while its
stages run (distillery.concurrency.gpu_slot): with `slots: 1` a second run waits for the first instead of sharing
its GPU; `ensure_limit` creates the limit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distillery.config import ConcurrencyConfig, Pipeline
from flows.distill import distill

REPO = Path(__file__).resolve().parents[1]
ENTRYPOINT = "flows/distill.py:distill"


def schedules_for(p: Pipeline) -> list:
    """The pipeline's schedule as Prefect schedule objects; its overrides ride on the schedule, so a run started by
    hand (`prefect deployment run`) does not get them."""
    from prefect.schedules import Cron, Interval

    s = p.schedule
    if s is None:
        return []
    params = {"overrides": list(s.overrides)} if s.overrides else None
    if s.cron is not None:
        return [Cron(s.cron, timezone=s.timezone, active=s.active, parameters=params)]
    return [Interval(s.interval, timezone=s.timezone, active=s.active, parameters=params)]


def deployment_args(name: str, p: Pipeline, config_file: str | None) -> dict[str, Any]:
    """What every mode registers: parameters, schedule, tags, description. No config_file: the flow's default, the
    pipelines.yaml beside the code that runs (an image's own)."""
    params = {"pipeline": name, "overrides": [], **({"config_file": config_file} if config_file else {})}
    return {
        "name": name,
        "parameters": params,
        "schedules": schedules_for(p),
        "description": p.description or f"distillery pipeline {name}",
        "tags": ["distillery", name],
    }


def ensure_limit(c: ConcurrencyConfig) -> str:
    """Create the global concurrency limit when it is missing; an existing one is left as the operator set it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(c.limit_name)
            return f"concurrency limit {c.limit_name!r}: exists ({limit.limit} slot(s), left as it is)"
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=c.limit_name, limit=c.slots))
            return f"concurrency limit {c.limit_name!r}: created with {c.slots} slot(s)"


def deploy_to_pool(
    name: str,
    p: Pipeline,
    config_file: str,
    work_pool: str,
    job_variables: dict | None = None,
    image: str | None = None,
):
    """A deployment whose runs a worker of `work_pool` starts.

    Without an image (process pools): the worker loads the flow from this project folder, so a pool on this machine
    runs exactly this checkout with `config_file`. With an image (Docker, Kubernetes pools): the flow is imported as
    the module `flows.distill` installed in the image, with the image's own pipelines.yaml."""
    if image is None:
        from prefect import Flow

        remote = Flow.from_source(source=str(REPO), entrypoint=ENTRYPOINT)
        # ignore_warnings: Prefect's "a process pool? try .serve" hint; `distillery serve` is that mode
        return remote.deploy(
            work_pool_name=work_pool,
            build=False,
            push=False,
            print_next_steps=False,
            ignore_warnings=True,
            job_variables=job_variables,
            **deployment_args(name, p, config_file),
        )
    from prefect.deployments.runner import EntrypointType

    return distill.deploy(
        work_pool_name=work_pool,
        image=image,
        build=False,
        push=False,
        print_next_steps=False,
        job_variables=job_variables,
        entrypoint_type=EntrypointType.MODULE_PATH,
        **deployment_args(name, p, None),
    )
