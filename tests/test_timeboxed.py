"""The time-boxed device command on the smoke profile: missing modules named before any work,
an archive a reader never sees half-written, no unit started past the deadline, and a run cut
off half-way (as the device's hard limit does) brings back every unit it finished, intact, and
the next run resumes from them."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from mesa_utils import timeboxed
from mesa_utils.config import make_config
from mesa_utils.units import (ATTACK, KINDS, config_key, pipeline_kinds, run_pipeline, run_units,
                              unit_folder)

REPO = Path(__file__).resolve().parents[1]


def test_missing_modules_are_named_before_any_work(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(timeboxed.NEEDED, "no_such_module_for_mesa", "no-such-package")
    assert timeboxed.missing_modules() == ["no-such-package"]
    assert timeboxed.main(["--profile", "smoke", "--out", str(tmp_path)]) == 2
    assert "no-such-package" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["--workers", "5"], "--workers must be 1 to 4"),
    (["--budget", "10"], "--budget must be 60 to 3600 seconds"),
    (["--unit-seconds", "-1"], "--unit-seconds must be >= 0"),
])
def test_bad_options_are_refused_before_any_work(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        timeboxed.main(["--profile", "smoke", "--out", str(tmp_path), *args])
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_the_archive_holds_the_unit_files_relative_to_the_root(tmp_path):
    folder = tmp_path / "figures" / "paper" / "units"
    for kind, trigger in (("attack", 3), ("defence", 11)):
        (folder / kind).mkdir(parents=True, exist_ok=True)
        (folder / kind / f"unit_{trigger}.json").write_text(json.dumps({"trigger": trigger}))
    (folder / "attack" / ".unit_5.json.partial").write_text("{")     # a write in progress
    archive = tmp_path / "units.tgz"
    assert timeboxed.archive_units(folder, archive, tmp_path) == ["attack/unit_3.json",
                                                                  "defence/unit_11.json"]
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == ["figures/paper/units/attack/unit_3.json",
                                          "figures/paper/units/defence/unit_11.json"]
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith("partial")] == []


def test_no_unit_starts_that_the_deadline_does_not_leave_time_for(tmp_path, monkeypatch,
                                                                  capsys):
    monkeypatch.setenv("MESA_STORE", str(tmp_path / "store"))
    cfg = make_config("smoke", device="cpu")
    folder = run_units(cfg, root=tmp_path, kind=ATTACK, deadline=time.time() + 60,
                       unit_seconds=3600)
    assert list(folder.glob("unit_*.json")) == []
    assert "deadline: 2 unit(s) left for a later run (170, 0)" in capsys.readouterr().out
    folder = run_pipeline(cfg, root=tmp_path, deadline=time.time() + 60, unit_seconds=3600)
    assert list(folder.rglob("unit_*.json")) == []
    assert "deadline: 2 trigger(s) left for a later run (170, 0)" in capsys.readouterr().out


def _copy_repo(tmp_path) -> Path:
    """mesa_utils and benchmarks in a folder of their own (REPO_ROOT is where mesa_utils is), so
    that the run writes its figures there; the decoded CIFAR-10 cache is shared, read-only."""
    copy = tmp_path / "repo"
    for part in ("mesa_utils", "benchmarks"):
        shutil.copytree(REPO / part, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "data").mkdir()
    if (REPO / "data" / "cifar10").is_dir():
        (copy / "data" / "cifar10").symlink_to(REPO / "data" / "cifar10")
    return copy


def _start(copy, out, store, *args):
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(copy), "MESA_STORE": str(store)}
    return subprocess.Popen([sys.executable, "-m", "mesa_utils.timeboxed", "--profile", "smoke",
                             "--out", str(out), "--workers", "1", "--budget", "900", *args],
                            cwd=copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _archived(archive) -> dict:
    with tarfile.open(archive) as tar:
        return {name: tar.extractfile(name).read() for name in tar.getnames()}


def test_a_run_cut_off_half_way_brings_back_every_finished_unit_and_the_next_resumes(tmp_path):
    copy, store = _copy_repo(tmp_path), tmp_path / "store"
    first = _start(copy, tmp_path / "out1", store, "--no-benchmark")
    archive = tmp_path / "out1" / "units.tgz"
    give_up = time.time() + 600
    while not (archive.exists() and _archived(archive)):
        assert first.poll() is None, first.stdout.read()
        assert time.time() < give_up, "no unit finished in 10 minutes"
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)           # the device's hard limit: no clean-up
    first.wait()
    cfg = make_config("smoke")
    folder = unit_folder(cfg, root=copy / "figures", kind=ATTACK).parent
    kept = _archived(archive)
    assert 1 <= len(kept) < 2 * len(pipeline_kinds(cfg))     # cut before the last unit
    for name, data in kept.items():                # intact, and the files the run wrote
        unit = json.loads(data)
        assert unit["config_key"] == config_key(cfg, KINDS[unit["kind"]])
        assert name.endswith(f"_{unit['trigger']}.json")
        assert (copy / name).read_bytes() == data
    assert sorted(str(p.relative_to(copy)) for p in folder.rglob("unit_*.json")) == list(kept)

    second = _start(copy, tmp_path / "out2", store)
    output, _ = second.communicate(timeout=900)
    assert second.returncode == 0, output
    summary = json.loads((tmp_path / "out2" / "summary.json").read_text())
    assert summary["already_there"] + len(summary["finished_here"]) == len(cfg.triggers)
    assert cfg.triggers[-1] in summary["finished_here"]       # the one not begun before
    assert summary["left"] == [] and summary["stopped_at_budget"] is False
    assert len(_archived(tmp_path / "out2" / "units.tgz")) == 2 * len(pipeline_kinds(cfg))
