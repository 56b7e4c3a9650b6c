"""quantize: bitsandbytes int8 and NF4 copies of the student, saved, reloaded and checked.

    distillery run demo --set 'quantize.formats=[nf4]'

Each format is loaded through `BitsAndBytesConfig`, saved as safetensors, reloaded from disk, and the reloaded
model's logits are compared with the in-memory quantized model's (they must match: a save/load round trip is
not allowed to change the model). Weight memory (`get_memory_footprint`), size on disk, and the peak memory of
loading the model and running a batch (a fresh process each; the full-precision source too) are reported. LoRA
adapters are merged in full precision by the train stage, so what is quantized here is always a plain model.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from distillery.artifacts import atomic_dir, content_hash, save_model, write_manifest
from distillery.bnb import bnb_config, require_bnb
from distillery.config import Pipeline, QuantizeConfig
from distillery.results import ModelArtifact, Traces
from distillery.runtime import RunContext

_PEAK_PROBE = """
import json, os, sys
import torch, bitsandbytes, transformers  # imported before the baseline: libraries are not the model

PROBE = ["Question: Ann has 3 pens. She buys 4 more. How many pens does Ann have now? Answer:"] * 8


def status(key):  # kB figures of /proc/self/status
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))


def measure(path, cuda):
    tok = transformers.AutoTokenizer.from_pretrained(path)
    probe = tok(PROBE, return_tensors="pt", add_special_tokens=False)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark (VmHWM) to the current RSS
        base = status("VmRSS:")
    if os.path.isfile(os.path.join(path, "adapter_config.json")):  # NF4 + healing adapters (distillery.healing)
        from distillery.healing import load_healed

        model = load_healed(path)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, device_map="auto" if cuda else "cpu")
    with torch.no_grad():
        model(**probe.to(model.device))
    peak = (torch.cuda.max_memory_allocated() if cuda else status("VmHWM:")) - base
    del model
    return {"peak_bytes": int(peak), "device": "cuda" if cuda else "cpu"}


cuda = torch.cuda.is_available()
for line in sys.stdin:  # a model folder per line, its figures per line
    path = line.strip()
    if cuda:  # CUDA's allocator counts this model's bytes alone once the last one is freed
        out = json.dumps(measure(path, True))
    else:  # RSS is not given back reliably: each model in a forked child, libraries already imported
        r, w = os.pipe()
        if (pid := os.fork()) == 0:
            os.close(r)
            try:
                os.write(w, json.dumps(measure(path, False)).encode())
                os._exit(0)
            except BaseException:
                import traceback

                traceback.print_exc()
                os._exit(1)
        os.close(w)
        with os.fdopen(r) as f:
            out = f.read()
        _, code = os.waitpid(pid, 0)
        if code or not out:
            sys.exit(f"probe of {path} failed (status {code})")
    print(out, flush=True)
"""


class PeakProbe:
    """Peak memory of loading a model and one forward pass over a batch of 8, as a fresh process would see it:
    CUDA's max_memory_allocated on a GPU; on CPU the high-water mark of RSS (reset after the imports) over the RSS
    then. One process imports the libraries once (~20 s on 2 cores) and measures each model in a child forked from
    it, so a stage measuring three models pays for one start."""

    def __init__(self) -> None:
        import subprocess
        import sys

        repo = str(Path(__file__).resolve().parents[1])  # distillery.healing for adapter folders
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _PEAK_PROBE],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def __call__(self, path: str | Path) -> int:
        import json

        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(f"{path}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise RuntimeError(f"quantize: peak-memory probe of {path} failed: {err[-2000:]}")
        return json.loads(line)["peak_bytes"]

    def __enter__(self) -> PeakProbe:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except Exception:
            self.proc.kill()


def peak_memory(path: str | Path) -> int:
    """The peak memory of one model (see PeakProbe)."""
    with PeakProbe() as probe:
        return probe(path)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def quantize(
    model_path: str,
    fmt: str,
    cfg: QuantizeConfig,
    out_dir: Path,
    trust_remote_code: bool = False,
    probe: PeakProbe | None = None,
) -> dict:
    require_bnb()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device_map = "auto" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    full = AutoModelForCausalLM.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    params = sum(p.numel() for p in full.parameters())
    full_bytes = full.get_memory_footprint()
    del full
    model = AutoModelForCausalLM.from_pretrained(
        model_path, quantization_config=bnb_config(fmt, cfg), device_map=device_map, trust_remote_code=trust_remote_code
    )
    inputs = tok(
        ["Question: a quick probe of the round trip.\nAnswer:"], return_tensors="pt", add_special_tokens=False
    ).to(model.device)
    with atomic_dir(out_dir) as tmp:
        save_model(model, tok, tmp)
        # Compare with the model as saved: bitsandbytes' CPU path repacks fresh 4-bit weights for its kernel and
        # save_pretrained unpacks them, which moves bf16 logits a little; the file itself must round-trip exactly.
        with torch.no_grad():
            before = model(**inputs).logits.float()
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, device_map=device_map, trust_remote_code=trust_remote_code)
        with torch.no_grad():
            after = reloaded(**inputs).logits.float()
        diff = float((before - after).abs().max())
        if diff > 1e-3:
            raise RuntimeError(
                f"quantize {fmt}: the reloaded model differs from the saved one (max |Δlogit| {diff:.3g})"
            )
        figures = {
            "params": params,
            "memory_bytes": reloaded.get_memory_footprint(),
            "full_precision_bytes": full_bytes,
            "disk_bytes": dir_bytes(tmp),
            "reload_max_abs_diff": diff,
        }
        figures["compression"] = full_bytes / figures["memory_bytes"]
        figures["peak_bytes"] = probe(tmp) if probe else peak_memory(tmp)
        write_manifest(tmp, {"kind": "model", "format": fmt, "base": model_path, "figures": figures})
    return {"path": str(out_dir), "format": fmt, "figures": figures}


@task(name="quantize", cache_policy=NO_CACHE)
def quantize_task(
    cfg: Pipeline, ctx: RunContext, student: ModelArtifact, kept: Traces | None = None
) -> list[ModelArtifact]:
    """One quantized copy of the full-precision `student` per `quantize.formats`, labelled student-<format>; with
    quantize.heal, also student-nf4-healed: healing adapters distilled from `student` on the `kept` traces."""
    made = []
    with ctx.tracker().stage("quantize", ctx.parent_run_id) as run, ExitStack() as stack:
        run.log_params({"source_model": student.path, **cfg.quantize.model_dump()})
        probe = stack.enter_context(PeakProbe())
        run.log_metrics({"full_precision.peak_bytes": probe(student.path)})
        for fmt in cfg.quantize.formats:
            res = quantize(
                student.path, fmt, cfg.quantize, ctx.stage_dir("quantize") / fmt, cfg.student.trust_remote_code, probe
            )
            run.log_metrics({f"{fmt}.{k}": v for k, v in res["figures"].items()})
            if cfg.log_models:
                run.log_artifact(res["path"], fmt)
            made.append(
                ModelArtifact(
                    label=f"student-{fmt}",
                    path=res["path"],
                    stage="quantize",
                    run_id=run.run_id,
                    params=res["figures"]["params"],
                    figures=res["figures"],
                    content_hash=content_hash(res["path"]),
                    artifact=fmt,
                )
            )
        if cfg.quantize.heal is not None:
            nf4 = next(m for m in made if m.artifact == "nf4")
            made.append(heal_nf4(cfg, ctx, student, kept, run, probe, nf4.params))
    return made


def heal_nf4(
    cfg: Pipeline, ctx: RunContext, student: ModelArtifact, kept: Traces | None, run, probe, params: int | None
) -> ModelArtifact:
    """Quantization-aware healing of the stage's NF4 copy (distillery.healing), measured as the formats are."""
    from distillery.artifacts import read_jsonl
    from distillery.healing import heal
    from distillery.training import mlflow_callback, training_records

    if kept is None:
        raise ValueError("quantize.heal: no kept traces to distil on (stage 'filter' must run before quantize)")
    if cfg.data.chat_template:
        raise ValueError("quantize.heal: chat pipelines are not supported yet (data.chat_template is on)")
    records = training_records(read_jsonl(Path(kept.path)), chat=False)
    res = heal(
        str(ctx.stage_dir("quantize") / "nf4"),
        student.path,
        records,
        ctx.stage_dir("quantize") / "nf4-healed",
        cfg.quantize.heal,
        cfg.student.trust_remote_code,
        [mlflow_callback(run)],
    )
    figures = res["figures"]
    figures["peak_bytes"] = probe(res["path"])
    run.log_metrics({f"nf4-healed.{k}": v for k, v in figures.items()})
    if cfg.log_models:
        run.log_artifact(res["path"], "nf4-healed")
    return ModelArtifact(
        label="student-nf4-healed",
        path=res["path"],
        stage="quantize",
        run_id=run.run_id,
        params=params,  # the NF4 model's; the adapters' count is in the figures
        figures=figures,
        content_hash=content_hash(res["path"]),
        artifact="nf4-healed",
    )
