"""Kill the real training CLI mid-run (SIGTERM, then SIGKILL) and resume it to the end."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess

import pytest
from support import REPO, read_until, subprocess_env, train_command, write_cache

from tf_agg3d.models import checkpoints as ckpt_lib

TOTAL = 24
EVERY = 4


def _start(tmp_path, cache, model_dir):
    cmd = train_command(
        tmp_path,
        model_dir,
        "--phase",
        "rpn",
        "--max-steps",
        TOTAL,
        "--set",
        f"train.checkpoint_every_steps={EVERY}",
        cache=cache,
    )
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for_step(proc, at_least, lines, timeout=150):
    """Reads the log until a step >= `at_least` is logged; returns that step."""

    def step(line):
        m = re.search(r"\] step (\d+)/", line)
        return m and int(m.group(1)) >= at_least and int(m.group(1))

    return read_until(proc, step, lines, timeout, f"training never reached step {at_least}")


@pytest.mark.slow
def test_sigterm_and_sigkill_then_resume_to_the_end(tmp_path):
    cache = write_cache(tmp_path / "cache", n_scans=3)
    model_dir = str(tmp_path / "model")

    # 1. SIGTERM between checkpoints: the run saves where it is, then exits with 143.
    proc, lines = _start(tmp_path, cache, model_dir), []
    _wait_for_step(proc, EVERY + 2, lines)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    lines.append(out)
    assert proc.returncode == 143, "".join(lines)[-3000:]
    saved = ckpt_lib.checkpoint_step(ckpt_lib.latest_phase_checkpoint(model_dir, "rpn"))
    assert EVERY + 2 <= saved < TOTAL
    with open(os.path.join(model_dir, "train_summary_rpn.json")) as f:
        assert json.load(f)["status"] == "interrupted"

    # 2. Resume; SIGKILL after the next periodic checkpoint: nothing is saved on the way out.
    proc, lines = _start(tmp_path, cache, model_dir), []
    target = (saved // EVERY + 1) * EVERY + 1
    _wait_for_step(proc, target, lines)
    resumed = os.path.join(model_dir, "checkpoints", "rpn", f"ckpt-{saved}")
    assert f"resumed from {resumed}" in "".join(lines)
    proc.kill()
    proc.wait(timeout=60)
    last = ckpt_lib.checkpoint_step(ckpt_lib.latest_phase_checkpoint(model_dir, "rpn"))
    assert last % EVERY == 0 and saved < last < TOTAL

    # 3. The rerun resumes from that periodic checkpoint and finishes.
    proc, lines = _start(tmp_path, cache, model_dir), []
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    assert f"resumed from {os.path.join(model_dir, 'checkpoints', 'rpn', f'ckpt-{last}')}" in out
    with open(os.path.join(model_dir, "train_summary_rpn.json")) as f:
        summary = json.load(f)
    assert summary["status"] == "finished"
    assert (summary["start_step"], summary["final_step"]) == (last, TOTAL)
    assert ckpt_lib.checkpoint_step(ckpt_lib.latest_model_checkpoint(model_dir)) == TOTAL
