"""A smoke-profile stage killed with SIGKILL part-way (in the middle of writing an artefact),
then run again, gives the same table as an uninterrupted run and leaves no temporary file."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]

# Stage 01 in a process of its own. Argument 2 > 0 makes the n-th artefact write die half-way:
# some bytes reach the temporary file, then the process is SIGKILLed (no clean-up runs).
STAGE = """
import os, signal, sys
import torch
from mesa_utils.config import make_config
from mesa_utils.train import attack_table, backdoored_model, setup

table, kill_at = sys.argv[1], int(sys.argv[2])
real_save, calls = torch.save, []

def save_or_die(obj, f, *args, **kwargs):
    calls.append(1)
    if len(calls) == kill_at:
        f.write(b"half an artefact")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)

torch.save = save_or_die
ctx = setup(make_config("smoke", device="cpu"))
attack_table(ctx, [backdoored_model(ctx, t) for t in ctx.cfg.triggers]).to_csv(table, index=False)
"""


def _stage(store, table, kill_at=0):
    env = {**os.environ, "MESA_STORE": str(store), "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", STAGE, str(table), str(kill_at)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)


def test_a_stage_killed_mid_write_resumes_to_the_same_table(tmp_path):
    whole = _stage(tmp_path / "store_a", tmp_path / "a.csv")
    assert whole.returncode == 0, whole.stderr[-2000:]

    store = tmp_path / "store_b"
    killed = _stage(store, tmp_path / "b.csv", kill_at=2)    # clean model saved, then dies
    assert killed.returncode == -signal.SIGKILL and not (tmp_path / "b.csv").exists()
    assert list(store.rglob("*.tmp")), "the kill should leave a half-written temporary file"
    [clean] = (store / "clean").glob("*.pt")
    clean_written = clean.stat().st_mtime_ns

    resumed = _stage(store, tmp_path / "b.csv")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert clean.stat().st_mtime_ns == clean_written           # reused, not retrained
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "a.csv"),
                                  pd.read_csv(tmp_path / "b.csv"))
    assert not list(store.rglob("*.tmp"))
