"""Checkpointed training: a training process killed (SIGKILL, no clean-up) mid-way and started again on the same
output resumes from its last complete checkpoint and ends with exactly the weights of an uninterrupted run."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from distillery.methods import sft
from distillery.training import COMPLETE, FINGERPRINT, SFTParams
from distillery.training import trainer_dir as checkpoints_of

from .conftest import REPO

PARAMS = dict(max_steps=6, batch_size=8, learning_rate=3e-3, logging_steps=1, max_length=128, checkpoint_every=2)

KILLED = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from transformers import TrainerCallback
    from distillery.demo import task
    from distillery.methods import sft
    from distillery.training import SFTParams

    class Die(TrainerCallback):  # the machine goes away after step 5: checkpoint-4 is complete, step 5 is lost
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                os.kill(os.getpid(), 9)

    records = [p.as_record() for p in task.problems(seed=99, count=64)]
    sft(sys.argv[1], records, Path(sys.argv[2]), SFTParams(**{params}), callbacks=[Die()])
    """
).format(params=PARAMS)


def weights(folder):
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(tiny_student, gold_records, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "whole"
    figures = sft(str(tiny_student), gold_records, out, SFTParams(**PARAMS))
    return out, figures


def kill_mid_way(tiny_student, out):
    r = subprocess.run([sys.executable, "-c", KILLED, str(tiny_student), str(out)], cwd=REPO, capture_output=True)
    assert r.returncode == -9, r.stderr.decode()[-2000:]
    trainer_dir = checkpoints_of(out)
    assert not out.exists() and (trainer_dir / "checkpoint-4" / COMPLETE).is_file()
    return trainer_dir


def test_a_killed_training_resumes_to_the_same_weights_and_not_from_other_settings(
    uninterrupted, tiny_student, gold_records, tmp_path
):
    import shutil

    import torch

    whole, whole_figs = uninterrupted
    out = tmp_path / "resumed"
    trainer_dir = kill_mid_way(tiny_student, out)
    assert sorted(p.name for p in trainer_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]  # keep 2
    changed = tmp_path / "changed"  # the same checkpoints, to be continued with another learning rate
    shutil.copytree(trainer_dir, checkpoints_of(changed))
    # debris: a checkpoint the kill interrupted while it was being written is never resumed from
    (trainer_dir / "checkpoint-6").mkdir()
    (trainer_dir / "checkpoint-6" / "model.safetensors").write_bytes(b"half")

    figures = sft(str(tiny_student), gold_records, out, SFTParams(**PARAMS))
    assert figures["resumed_from_step"] == 4 and figures["steps"] == 6 and whole_figs["resumed_from_step"] == 0
    a, b = weights(whole), weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # optimizer, schedule, RNG, data order

    def losses(folder):
        history = json.loads((folder / "manifest.json").read_text())["loss_history"]
        return [(h["step"], h["loss"]) for h in history if "loss" in h]

    assert losses(out) == losses(whole) and len(losses(out)) == 6  # one loss curve: steps 1-4 from the checkpoint
    assert not trainer_dir.exists()  # the model is saved: the checkpoints are removed

    fingerprint = checkpoints_of(changed) / FINGERPRINT
    assert json.loads(fingerprint.read_text())["args"]["learning_rate"] == 3e-3
    figures = sft(str(tiny_student), gold_records, changed, SFTParams(**{**PARAMS, "learning_rate": 1e-3}))
    assert figures["resumed_from_step"] == 0 and figures["steps"] == 6  # other settings: trained from the start


def test_checkpoints_fall_on_logging_boundaries():
    """A resumed Trainer restarts its running loss at the checkpoint: saving on a logging window's edge keeps every
    logged loss equal to an uninterrupted run's."""
    from distillery.training import SFTParams, save_steps

    def every(n: int, logging: int) -> int:
        return save_steps(SFTParams(checkpoint_every=n, logging_steps=logging))

    assert (every(5, 10), every(10, 10), every(25, 10), every(7, 1), every(0, 10)) == (10, 10, 30, 7, 500)
