"""The registry gate: every model of a run becomes a version, `candidate` follows the latest run, `champion` moves
only when the gate rule says so. The rule is tested pure; the aliases against a real MLflow SQLite store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distillery.config import ConfigError, GateConfig, RegistryConfig, load_pipeline
from distillery.registry import gate_decision, pick_candidate, register_run
from distillery.results import Evaluation, ModelArtifact
from distillery.runtime import RunContext
from distillery.tracking import NullTracker, Tracker

REPO = Path(__file__).resolve().parents[1]
NAME = "test-student"

HIGHER = GateConfig()
LOWER = GateConfig(metric="memory_bytes", higher_is_better=False)


@pytest.mark.parametrize(
    "candidate,champion,gate,has_champion,move,why",
    [
        (0.5, None, HIGHER, None, True, "no champion yet"),
        (0.75, 0.5, HIGHER, None, True, "accuracy 0.75 > champion's 0.5 + min_delta 0"),
        (0.5, 0.5, HIGHER, None, False, "accuracy 0.5 <= champion's 0.5"),  # a tie is not better
        (0.25, 0.5, HIGHER, None, False, "champion stays"),
        (0.75, 0.5, GateConfig(min_delta=0.25), None, False, "<= champion's 0.5 + min_delta 0.25"),  # not more than
        (0.76, 0.5, GateConfig(min_delta=0.25), None, True, "champion moves"),
        (100, 200, LOWER, None, True, "memory_bytes 100 < champion's 200 - min_delta 0"),
        (200, 100, LOWER, None, False, "memory_bytes 200 >= champion's 100"),
        (150, 200, GateConfig(metric="memory_bytes", higher_is_better=False, min_delta=50), None, False, ">="),
        (149, 200, GateConfig(metric="memory_bytes", higher_is_better=False, min_delta=50), None, True, "<"),
        (None, 0.5, HIGHER, None, False, "candidate has no accuracy (not evaluated)"),
        (None, None, HIGHER, None, False, "not evaluated"),  # no champion, but nothing measured to crown
        (0.9, None, HIGHER, True, False, "champion has no recorded accuracy"),
    ],
)
def test_gate_decision(candidate, champion, gate, has_champion, move, why):
    moved, reason = gate_decision(candidate, champion, gate, has_champion=has_champion)
    assert moved is move
    assert why in reason, reason


def test_pick_candidate_last_or_best():
    versions = [
        {"version": "1", "value": 0.5},
        {"version": "2", "value": 0.75},
        {"version": "3", "value": 0.75},
        {"version": "4", "value": 0.25},
        {"version": "5", "value": None},
    ]
    assert pick_candidate(versions, GateConfig())["version"] == "5"
    assert pick_candidate(versions, GateConfig(model="best"))["version"] == "3"  # a tie goes to the later stage
    assert pick_candidate(versions, GateConfig(model="best", higher_is_better=False))["version"] == "4"
    unscored = [{"version": "1", "value": None}, {"version": "2", "value": None}]
    assert pick_candidate(unscored, GateConfig(model="best"))["version"] == "2"


def fake_run(tracker: Tracker, tmp_path: Path, n: int, accuracy: dict[str, float | None]):
    """A parent run with a train child (student-sft) and a quantize child (student-int8), each model a small folder."""
    parent = tracker.start(f"run{n}", tags={"distillery.pipeline": "demo"})
    train = tracker.start("train", parent.run_id)
    quantize = tracker.start("quantize", parent.run_id)
    models, evals = [], {}
    for label, run, stage, artifact in (
        ("student-sft", train, "train", "model"),
        ("student-int8", quantize, "quantize", "int8"),
    ):
        folder = tmp_path / f"run{n}" / label
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"run": n, "model": label}))
        models.append(ModelArtifact(label=label, path=str(folder), stage=stage, run_id=run.run_id, artifact=artifact))
        if accuracy.get(label) is not None:
            figures = {
                "accuracy": accuracy[label],
                "accuracy_stderr": None,
                "params": 1000,
                "memory_bytes": 4000,
                "tokens_per_s": 50.0,
            }
            evals[label] = Evaluation(label, str(folder), figures)
    ctx = RunContext(
        pipeline="demo",
        run_dir=str(tmp_path / f"run{n}"),
        parent_run_id=parent.run_id,
        experiment="registry-test",
        tracking_uri=tracker.uri,
    )
    return ctx, models, evals


def test_champion_moves_only_when_the_candidate_is_better(mlflow_uri, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    tracker = Tracker("registry-test")
    client = MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri)
    registry = RegistryConfig(model_name=NAME)  # every model, gate: last version, accuracy, higher is better

    def alias(name: str) -> str:
        return str(client.get_model_version_by_alias(NAME, name).version)  # an int in MLflow 3

    # run 1: no champion yet, so the candidate (the last version: int8) takes it
    ctx, models, evals = fake_run(tracker, tmp_path, 1, {"student-sft": 0.6, "student-int8": 0.5})
    first = register_run(tracker, ctx, registry, models, evals, logged=False)
    assert [v["model"] for v in first["versions"]] == ["student-sft", "student-int8"]
    assert first["moved"] and first["champion_before"] is None
    assert alias("champion") == alias("candidate") == first["candidate"]["version"] == "2"
    v1 = client.get_model_version(NAME, "1")
    assert {k: v1.tags[k] for k in ("stage", "model", "pipeline", "parent_run_id")} == {
        "stage": "train",
        "model": "student-sft",
        "pipeline": "demo",
        "parent_run_id": ctx.parent_run_id,
    }
    assert float(v1.tags["metric.accuracy"]) == 0.6 and v1.tags["metric.params"] == "1000"
    assert "metric.accuracy_stderr" not in v1.tags  # a figure that is None is not written as "None"

    # run 2: better accuracy, the champion moves with the candidate
    ctx, models, evals = fake_run(tracker, tmp_path, 2, {"student-sft": 0.8, "student-int8": 0.75})
    second = register_run(tracker, ctx, registry, models, evals, logged=False)
    assert second["moved"] and second["champion_before"] == {"version": "2", "value": 0.5}
    assert alias("champion") == alias("candidate") == "4"
    folder = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}@champion", tracking_uri=mlflow_uri))
    assert json.loads((folder / "config.json").read_text()) == {"run": 2, "model": "student-int8"}

    # run 3: worse accuracy, only the candidate moves
    ctx, models, evals = fake_run(tracker, tmp_path, 3, {"student-sft": 0.9, "student-int8": 0.25})
    third = register_run(tracker, ctx, registry, models, evals, logged=False)
    assert not third["moved"]
    assert alias("candidate") == "6" and alias("champion") == "4"
    assert len(client.search_model_versions(f"name='{NAME}'")) == 6

    # the decision is on the parent run: tag and gate.json
    parent = client.get_run(ctx.parent_run_id)
    assert parent.data.tags["distillery.gate"] == (
        "candidate v6 (student-int8), champion v4 -> v4: accuracy 0.25 <= champion's 0.75 + min_delta 0: champion stays"
    )
    logged = json.loads(Path(client.download_artifacts(ctx.parent_run_id, "gate.json", str(tmp_path))).read_text())
    assert logged["candidate"] == {"version": "6", "model": "student-int8", "stage": "quantize", "value": 0.25}
    assert logged["champion_before"] == {"version": "4", "value": 0.75} and logged["champion_after"] == "4"


def test_best_model_gate_and_a_stage_subset(mlflow_uri, tmp_path):
    from mlflow.tracking import MlflowClient

    tracker = Tracker("registry-test")
    client = MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri)
    assert tracker.get_alias(NAME, "champion") is None  # no such model yet

    # only train registered, and it was not evaluated: candidate set, no champion crowned
    ctx, models, evals = fake_run(tracker, tmp_path, 1, {"student-int8": 0.9})
    only_train = RegistryConfig(model_name=NAME, stages=["train"])
    decision = register_run(tracker, ctx, only_train, models, evals, logged=False)
    assert [v["model"] for v in decision["versions"]] == ["student-sft"] and not decision["moved"]
    assert "not evaluated" in decision["reason"]
    assert tracker.get_alias(NAME, "champion") is None  # the model exists, the alias does not
    assert str(tracker.get_alias(NAME, "candidate").version) == "1"

    # model best: the more accurate sft version is the candidate, though int8 was registered last
    ctx, models, evals = fake_run(tracker, tmp_path, 2, {"student-sft": 0.7, "student-int8": 0.6})
    best = RegistryConfig(model_name=NAME, gate={"model": "best"})
    decision = register_run(tracker, ctx, best, models, evals, logged=False)
    assert decision["candidate"]["model"] == "student-sft" and decision["moved"]
    champion = client.get_model_version_by_alias(NAME, "champion")
    assert str(champion.version) == "2" and champion.tags["model"] == "student-sft"


def test_tracking_off_registers_nothing(tmp_path):
    null = NullTracker()
    ctx = RunContext(pipeline="demo", run_dir=str(tmp_path), parent_run_id="none", experiment="x", tracking_uri="none")
    models = [ModelArtifact(label="student-sft", path=str(tmp_path), stage="train", run_id="none")]
    assert register_run(null, ctx, RegistryConfig(model_name=NAME), models, None, logged=True) is None
    assert null.get_alias(NAME, "champion") is None and null.set_alias(NAME, "champion", "1") is None


def test_demo_registry_config():
    demo = load_pipeline(REPO / "pipelines.yaml", "demo").registry
    assert demo.gate == GateConfig(metric="accuracy", higher_is_better=True, min_delta=0.0, model="last")
    assert demo.stages == ["train", "prune", "quantize"]
    smoke = load_pipeline(REPO / "pipelines.yaml", "smoke").registry
    assert smoke.stages is None and smoke.gate == GateConfig()


@pytest.mark.parametrize(
    "pipeline,overrides,expected",
    [
        ("demo", {"registry.gate.min_delta": -0.1}, "pipelines.demo.registry.gate.min_delta: must be >= 0"),
        ("demo", {"registry.gate.metric": "acc"}, "pipelines.demo.registry.gate.metric: unknown metric 'acc'"),
        ("demo", {"registry.gate.model": "first"}, "pipelines.demo.registry.gate.model: must be one of"),
        ("demo", {"registry.gate.treshold": 1}, "pipelines.demo.registry.gate.treshold: unknown key"),
        ("demo", {"registry.stages": ["train", "train"]}, "pipelines.demo.registry.stages: a stage is listed twice"),
        ("demo", {"registry.stages": ["evaluate"]}, "pipelines.demo.registry.stages.0: must be one of"),
        ("demo", {"registry.stages": []}, "pipelines.demo.registry.stages: must have at least 1 item(s)"),
        ("demo", {"registry.stage": "train"}, "pipelines.demo.registry.stage: unknown key"),
        ("smoke", {"registry.stages": ["prune"]}, "pipelines.smoke: registry.stages: stage 'prune' is not in stages"),
        (
            "smoke",
            {"stages": ["generate", "filter", "evaluate"]},
            "pipelines.smoke: registry: no model stage (train, prune, quantize) in stages to register",
        ),
    ],
)
def test_bad_registry_config_names_the_field(pipeline, overrides, expected):
    with pytest.raises(ConfigError) as e:
        load_pipeline(REPO / "pipelines.yaml", pipeline, overrides)
    assert any(line.startswith(expected) for line in e.value.lines), e.value.lines


@pytest.mark.parametrize("theirs,ours_crowned", [(0.9, False), (0.2, True)])
def test_a_run_crowning_its_candidate_at_the_same_moment(mlflow_uri, tmp_path, theirs, ours_crowned):
    """Two runs find no champion and both crown their candidate: MLflow's check-then-insert fails the second with a
    unique-key error (seen in CI with two runs on one tracking server). That run then compares its candidate with
    the other's champion, as if it had run second, instead of failing its pipeline or overwriting a better one."""
    from mlflow.exceptions import MlflowException

    tracker = Tracker("registry-test")
    registry = RegistryConfig(model_name=NAME, stages=["train"])
    other_ctx, other_models, other_evals = fake_run(tracker, tmp_path, 1, {"student-sft": theirs})
    ctx, models, evals = fake_run(tracker, tmp_path, 2, {"student-sft": 0.5})
    real, calls = tracker.client.set_registered_model_alias, []

    def racing(name, alias, version):
        calls.append(alias)
        if alias == "champion" and calls.count("champion") == 1:  # the other run's insert lands first
            tracker.client.set_registered_model_alias = real
            register_run(tracker, other_ctx, registry, other_models, other_evals, logged=False)
            tracker.client.set_registered_model_alias = racing
            raise MlflowException(
                "(sqlite3.IntegrityError) UNIQUE constraint failed: registered_model_aliases."
                "workspace, registered_model_aliases.name, registered_model_aliases.alias"
            )
        return real(name, alias, version)

    tracker.client.set_registered_model_alias = racing
    decision = register_run(tracker, ctx, registry, models, evals, logged=False)
    ours, other = "1", "2"  # this run registered first; the other run's version came inside the race
    assert decision["candidate"]["version"] == ours and calls.count("champion") == 1 + ours_crowned
    assert decision["moved"] is ours_crowned
    assert decision["champion_before"] == {"version": other, "value": theirs}
    assert str(tracker.get_alias(NAME, "champion").version) == (ours if ours_crowned else other)

    def broken(name, alias, version):  # any other error is not retried
        raise MlflowException("connection reset")

    tracker.client.set_registered_model_alias = broken
    with pytest.raises(MlflowException, match="connection reset"):
        register_run(tracker, ctx, registry, models, evals, logged=False)
