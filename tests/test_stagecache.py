"""Content-addressed stages: what a stage key depends on, and when a recorded result may be reused."""

from __future__ import annotations

from distillery.config import load_pipeline, parse_overrides
from distillery.results import Evaluation, ModelArtifact, Traces
from distillery.stagecache import SECTIONS, decode, encode, lookup, record, stage_key

from .conftest import REPO


def smoke(*sets: str):
    return load_pipeline(REPO / "pipelines.yaml", "smoke", parse_overrides(list(sets)))


def model(tmp_path, name: str, content: bytes = b"weights") -> ModelArtifact:
    from distillery.artifacts import content_hash

    folder = tmp_path / name
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(content)
    return ModelArtifact(label=name, path=str(folder), stage="train", content_hash=content_hash(folder))


def test_a_key_changes_with_its_own_settings_and_inputs_only(tmp_path):
    m = model(tmp_path, "m")
    base = stage_key("train", smoke(), [m])
    assert stage_key("train", smoke(), [m]) == base  # deterministic
    assert stage_key("train", smoke("train.learning_rate=1e-3"), [m]) != base  # its own setting
    assert stage_key("train", smoke("train.seed=1"), [m]) != base  # a seed
    assert stage_key("train", smoke("evaluate.batch_size=4"), [m]) == base  # a downstream stage's setting
    assert stage_key("generate", smoke("train.learning_rate=1e-3"), [m]) == stage_key("generate", smoke(), [m])
    assert stage_key("train", smoke(), [model(tmp_path, "other", b"other weights")]) != base  # other input content
    assert stage_key("train", smoke(), [m, None]) != base
    assert set(SECTIONS) == {"generate", "filter", "train", "prune", "quantize", "evaluate", "draft"}


def test_results_round_trip_and_a_record_is_reused_only_while_its_files_are_intact(tmp_path):
    m = model(tmp_path, "student-sft")
    results = {
        "train": m,
        "quantize": [m, ModelArtifact(label="student-nf4", path=m.path, stage="quantize", artifact="nf4")],
        "evaluate": {"teacher": Evaluation("teacher", "/t", {"accuracy": 0.9}, {"tasks": {}})},
        "filter": Traces(str(tmp_path / "student-sft" / "model.safetensors"), "filter", report={"kept": 3}),
    }
    for stage, result in results.items():
        assert decode(encode(result)) == result
        record(tmp_path / "runs", stage, "k" * 64, result, "/runs/x", "parent-1")
        found, doc = lookup(tmp_path / "runs", stage, "k" * 64)
        assert found == result and doc["parent_run_id"] == "parent-1" and doc["run_dir"] == "/runs/x"
    assert lookup(tmp_path / "runs", "train", "j" * 64) is None  # another key
    (tmp_path / "student-sft" / "model.safetensors").write_bytes(b"changed")  # the files changed since
    assert lookup(tmp_path / "runs", "train", "k" * 64) is None
    assert lookup(tmp_path / "runs", "train", "k" * 64) is None  # and the record is gone
