"""Model registry: every model a run makes (registry.stages) becomes a version of one registered model, and two
aliases say which version to use:

    candidate  the gate candidate of the latest run: its last version, or its best by gate.metric (gate.model)
    champion   moves to the candidate only when there is no champion yet, or when the candidate beats it on
               gate.metric by more than gate.min_delta (strictly, in the direction gate.higher_is_better says)

Each version carries its evaluate figures as tags `metric.<figure>`, so a later run compares against the champion
without evaluating it again. The decision goes on the parent run: tag `distillery.gate` and artifact `gate.json`.
"""

from __future__ import annotations

import math
from typing import Any

from distillery.config import MODEL_STAGES, GateConfig, RegistryConfig
from distillery.console import say
from distillery.results import Evaluation, ModelArtifact
from distillery.runtime import RunContext
from distillery.tracking import NullTracker, StageRun, Tracker

CANDIDATE, CHAMPION, DRAFT = "candidate", "champion", "draft"


def as_value(x: Any) -> float | None:
    """A finite float, else None: a missing, unreadable or NaN figure can neither win nor lose a comparison."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def gate_decision(
    candidate: float | None, champion: float | None, gate: GateConfig, *, has_champion: bool | None = None
) -> tuple[bool, str]:
    """Whether `champion` moves to the candidate, and why. `has_champion` defaults to `champion is not None`; pass
    True for a champion without a recorded value: nothing shows the candidate beats it, so it stays."""
    m, d = gate.metric, gate.min_delta
    if has_champion is None:
        has_champion = champion is not None
    if candidate is None:
        return False, f"candidate has no {m} (not evaluated): champion stays"
    if not has_champion:
        return True, f"no champion yet: candidate ({m} {candidate:.6g}) becomes champion"
    if champion is None:
        return False, f"champion has no recorded {m} to compare with: champion stays"
    if gate.higher_is_better:
        move = candidate > champion + d
        rel, bound = (">" if move else "<="), f"champion's {champion:.6g} + min_delta {d:g}"
    else:
        move = candidate < champion - d
        rel, bound = ("<" if move else ">="), f"champion's {champion:.6g} - min_delta {d:g}"
    return move, f"{m} {candidate:.6g} {rel} {bound}: champion {'moves' if move else 'stays'}"


def pick_candidate(versions: list[dict], gate: GateConfig) -> dict:
    """The last version, or with gate.model best the best scored one; ties go to the later stage (same score,
    smaller model). With no version scored, the last: the gate then says it was not evaluated."""
    scored = [v for v in versions if v["value"] is not None]
    if gate.model == "best" and scored:
        sign = 1 if gate.higher_is_better else -1
        return max(reversed(scored), key=lambda v: sign * v["value"])  # max keeps the first of equals
    return versions[-1]


def register_run(
    tracker: Tracker | NullTracker,
    ctx: RunContext,
    registry: RegistryConfig,
    models: list[ModelArtifact],
    evals: dict[str, Evaluation] | None,
    logged: bool,
    model_ids: dict[str, str] | None = None,
) -> dict | None:
    """Register this run's models, point `candidate` at the gate candidate, move `champion` when the gate says so.

    `models`: in the order the stages made them; `evals`: label -> its evaluation; `logged`: the stage runs hold
    their model folders already (log_models); `model_ids`: label -> its MLflow logged model, which the version
    then points at (else the stage run's artifact folder). Returns the decision logged as gate.json, or None when
    tracking is off or no model is of a registered stage.
    """
    if isinstance(tracker, NullTracker):
        return None
    name, gate = registry.model_name, registry.gate
    stages = registry.stages or MODEL_STAGES  # not e.g. prune-unhealed: evaluated for comparison, never shipped
    chosen = [m for m in models if m.stage in stages]
    if not chosen:
        return None
    versions = []
    for m in chosen:
        run = StageRun(tracker.client, m.run_id)
        model_id = (model_ids or {}).get(m.label)
        if not logged and not model_id:
            run.log_artifact(m.path, m.artifact)
        figures = evals[m.label].figures if evals and m.label in evals else {}
        tags = {
            "stage": m.stage,
            "model": m.label,
            "pipeline": ctx.pipeline,
            "parent_run_id": ctx.parent_run_id,
            **{f"metric.{k}": v for k, v in figures.items()},
        }
        version = tracker.register(name, run, m.artifact, tags=tags, model_id=model_id)
        versions.append(
            {"version": version, "model": m.label, "stage": m.stage, "value": as_value(figures.get(gate.metric))}
        )

    cand = pick_candidate(versions, gate)
    tracker.set_alias(name, CANDIDATE, cand["version"])  # the latest run's, whichever run writes last
    for attempt in range(3):  # the race leaves the alias in place, so the second pass decides against it
        champion = tracker.get_alias(name, CHAMPION)
        before = str(champion.version) if champion else None
        before_value = as_value(champion.tags.get(f"metric.{gate.metric}")) if champion else None
        move, reason = gate_decision(cand["value"], before_value, gate, has_champion=champion is not None)
        # Another run of this model may crown its candidate between that read and this write: with no champion
        # read, this write then fails rather than overwrite the other's, and the gate compares with it instead.
        # (Two runs both replacing an existing champion at once: the last write wins.)
        racer_ok = champion is not None or attempt == 2
        if not move or tracker.set_alias(name, CHAMPION, cand["version"], overwrite_racer=racer_ok):
            break
    after = cand["version"] if move else before

    decision = {
        "model_name": name,
        "gate": gate.model_dump(),
        "versions": versions,
        "candidate": cand,
        "champion_before": {"version": before, "value": before_value} if before else None,
        "champion_after": after,
        "moved": move,
        "reason": reason,
    }
    summary = (
        f"candidate v{cand['version']} ({cand['model']}), champion "
        f"{'v' + before if before else 'none'} -> {'v' + after if after else 'none'}: {reason}"
    )
    parent = StageRun(tracker.client, ctx.parent_run_id)
    parent.set_tags({"distillery.gate": summary})
    parent.log_dict(decision, "gate.json")
    registered = ", ".join(f"v{v['version']} ({v['model']})" for v in versions)
    say(f"registered {name} {registered}; {summary}")
    return decision


DRAFT_TAGS = ("acceptance_rate", "mean_accepted_length", "speedup", "sampled_acceptance_rate", "sampled_speedup")


def register_draft(
    tracker: Tracker | NullTracker,
    ctx: RunContext,
    registry: RegistryConfig,
    draft: ModelArtifact,
    source: str | None,
    model_id: str | None = None,
) -> str | None:
    """The draft stage's artifact (the student with the teacher's vocabulary) as a version with alias `draft`,
    tagged with what it measured: acceptance rate, mean accepted length, speed-up."""
    if isinstance(tracker, NullTracker):
        return None
    f = draft.figures
    tags = {
        "stage": "draft",
        "model": "draft",
        "source": source,
        "pipeline": ctx.pipeline,
        "parent_run_id": ctx.parent_run_id,
        **{f"metric.{k}": f[k] for k in DRAFT_TAGS if k in f},
    }
    run = StageRun(tracker.client, draft.run_id)
    version = tracker.register(registry.model_name, run, draft.artifact, tags=tags, model_id=model_id)
    tracker.set_alias(registry.model_name, DRAFT, version)
    say(f"registered {registry.model_name} v{version} (draft from {source}), alias {DRAFT}")
    return version
