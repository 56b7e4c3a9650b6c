"""MLflow model URIs as model paths: `models:/<name>@<alias>`, `models:/<name>/<version>` and `runs:/<run id>/<path>`.

So a pipeline can start from last night's champion, or chain teacher → assistant → student: the teacher of one
pipeline is the registered student of another. The URI is resolved against `MLFLOW_TRACKING_URI` to one version
(an alias moves; the version it pointed at when the run started is what the run used, and its lineage says so),
downloaded once into the cache (a version's files never change) and handed on as a local model folder.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass
from pathlib import Path

PREFIXES = ("models:/", "runs:/")
MODELS = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[A-Za-z0-9_-]+)|/(?P<version>\d+))$")
RUNS = re.compile(r"^runs:/(?P<run_id>[0-9a-zA-Z]+)/(?P<path>.+)$")


class ModelUriError(ValueError):
    """A model URI that names nothing: the message is one line naming the model, version, alias or run."""


@dataclass(frozen=True)
class Resolved:
    """What a model URI pointed at when it was resolved: recorded as the run's lineage."""

    uri: str
    download_uri: str  # what is fetched: models:/name/<version> (an alias resolved) or the runs:/ URI itself
    name: str | None = None
    version: str | None = None
    run_id: str | None = None

    def tags(self, role: str) -> dict[str, str]:
        return {f"distillery.{role}.{k}": str(v) for k, v in asdict(self).items() if v is not None}


def is_uri(ref: str) -> bool:
    return ref.startswith(PREFIXES)


def syntax_problem(ref: str) -> str | None:
    if ref.startswith("models:/") and not MODELS.match(ref):
        return f"{ref!r}: expected models:/<name>@<alias> or models:/<name>/<version>"
    if ref.startswith("runs:/") and not RUNS.match(ref):
        return f"{ref!r}: expected runs:/<run id>/<artifact path>"
    return None


def resolve(ref: str, client=None) -> Resolved:
    """The version (or run) a URI names now, or ModelUriError saying what does not exist."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if problem := syntax_problem(ref):
        raise ModelUriError(problem)
    client = client or MlflowClient()
    if m := RUNS.match(ref):
        try:
            client.get_run(m["run_id"])
        except MlflowException:
            raise ModelUriError(f"{ref}: no run {m['run_id']} in the tracking store {_store()}") from None
        return Resolved(ref, ref, run_id=m["run_id"])
    m = MODELS.match(ref)
    name = m["name"]
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        raise ModelUriError(f"{ref}: no registered model {name!r} in the tracking store {_store()}") from None
    try:
        mv = (
            client.get_model_version_by_alias(name, m["alias"])
            if m["alias"]
            else client.get_model_version(name, m["version"])
        )
    except MlflowException:
        if m["alias"]:
            known = ", ".join(sorted(model.aliases or {})) or "none"
            raise ModelUriError(f"{ref}: model {name!r} has no alias {m['alias']!r} (aliases: {known})") from None
        latest = max((int(v.version) for v in client.search_model_versions(f"name='{name}'")), default=0)
        raise ModelUriError(f"{ref}: model {name!r} has no version {m['version']} (latest: {latest})") from None
    return Resolved(ref, f"models:/{name}/{mv.version}", name=name, version=str(mv.version), run_id=mv.run_id)


def _store() -> str:
    from mlflow import get_tracking_uri

    return get_tracking_uri()


def model_folder(root: Path) -> Path:
    """The folder with config.json in what was downloaded: the root, or the one folder below it that has it."""
    if (root / "config.json").is_file():
        return root
    found = sorted(p.parent for p in root.glob("*/config.json"))
    if len(found) == 1:
        return found[0]
    raise ModelUriError(f"{root}: the downloaded artifact is not a model folder (no config.json)")


def download(resolved: Resolved) -> Path:
    """The model's files, fetched once per tracking store and version into the cache, atomically."""
    import mlflow
    from filelock import FileLock

    from distillery.artifacts import atomic_dir
    from distillery.demo.assets import cache_dir

    key = hashlib.sha256(f"{_store()}\n{resolved.download_uri}".encode()).hexdigest()[:16]
    label = re.sub(r"[^\w.-]+", "-", resolved.download_uri.split(":/", 1)[1]).strip("-")[:80]
    dest = cache_dir() / "mlflow" / f"{label}-{key}"
    done = dest / ".complete"
    if not done.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{dest}.lock", timeout=3600):
            if not done.exists():
                with atomic_dir(dest) as tmp:
                    mlflow.artifacts.download_artifacts(artifact_uri=resolved.download_uri, dst_path=str(tmp))
                    (Path(tmp) / ".complete").write_text(resolved.download_uri + "\n")
    return model_folder(dest)
