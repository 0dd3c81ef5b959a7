"""The lines run_all.sh prints around each notebook (title, estimate, durations) and the record of
a run, against known answers."""
import json
import os
import platform

import pytest

from mesa_utils import run_record


@pytest.mark.parametrize("seconds, text", [
    (0, "0 s"), (42, "42 s"), (59.6, "1 min 0 s"), (250, "4 min 10 s"), (3599, "59 min 59 s"),
    (2 * 3600 + 5 * 60 + 7, "2 h 5 min"),
])
def test_durations_read_as_a_person_says_them(seconds, text):
    assert run_record.duration(seconds) == text


def notebook(path, *cells):
    path.write_text(json.dumps({"cells": [{"cell_type": kind, "metadata": {}, "source": source}
                                          for kind, source in cells]}))
    return path


def test_the_title_is_the_first_line_of_the_first_markdown_cell(tmp_path):
    titled = notebook(tmp_path / "01_attack.ipynb", ("code", "x = 1"),
                      ("markdown", ["# 01 · The attack: a patch\n", "\n", "More text."]),
                      ("markdown", "# Not this one"))
    assert run_record.title(titled) == "01 · The attack: a patch"
    assert run_record.title(notebook(tmp_path / "02.ipynb", ("code", "# a comment"))) is None


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """An empty repository root for run_record's paths (figures/, data/runs/)."""
    monkeypatch.setattr(run_record, "ROOT", tmp_path)
    return tmp_path


def put_record(path, seconds, options=()):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"options": list(options), "notebooks": [
        {"notebook": name, "seconds": s} for name, s in seconds.items()]}))


def test_the_estimate_is_the_last_recorded_run_of_the_profile(repo, capsys):
    nb = notebook(repo / "01_attack.ipynb", ("markdown", "# 01 · The attack"))
    assert run_record.announcement("quick", nb) == (
        "=== 01_attack.ipynb (profile quick): 01 · The attack; no earlier run of this profile "
        "recorded ===")
    full = repo / "figures" / "quick" / "run_all.json"
    last = repo / "data" / "runs" / "quick" / "run_all.json"
    put_record(full, {"01_attack.ipynb": 250})
    put_record(last, {"01_attack.ipynb": 9, "06_x.ipynb": 30})
    assert run_record.announcement("quick", nb) == (
        "=== 01_attack.ipynb (profile quick): 01 · The attack; last recorded run: 4 min 10 s ===")
    assert run_record.last_seconds("quick", "06_x.ipynb") == 30    # named only: the last run's
    assert run_record.last_seconds("paper", "01_attack.ipynb") is None
    # a run with papermill options computed something else: its times say nothing of the profile
    put_record(last, {"06_x.ipynb": 3}, options=["-p", "seed", "1"])
    assert run_record.last_seconds("quick", "06_x.ipynb") is None
    full.write_text("<<<<<<< HEAD")
    assert run_record.last_seconds("quick", "01_attack.ipynb") is None
    assert "figures/quick/run_all.json is not valid JSON" in capsys.readouterr().err


def test_the_record_is_written_for_every_run_and_apart_for_the_full_one(repo, monkeypatch,
                                                                        capsys):
    monkeypatch.setenv("MESA_STORE", str(repo / "store"))
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(repo.parent))      # outside git
    begun = run_record.begin()
    assert (begun["commit"], begun["uncommitted_changes"]) == (None, None)
    assert begun["store_empty_at_start"] is True
    args = ["finish", "--begun", json.dumps(begun), "--profile", "smoke",
            "--notebook", "01_attack.ipynb", "250", "--notebook", "02_x.ipynb", "3"]
    assert run_record.main(args + ["--"]) == 0
    full = json.loads((repo / "figures" / "smoke" / "run_all.json").read_text())
    assert json.loads((repo / "data" / "runs" / "smoke" / "run_all.json").read_text()) == full
    assert full["notebooks"] == [{"notebook": "01_attack.ipynb", "seconds": 250},
                                 {"notebook": "02_x.ipynb", "seconds": 3}]
    assert (full["cores"], full["python"], full["options"], full["refresh"]) == (
        os.cpu_count(), platform.python_version(), [], False)
    assert "figures and tables: figures/smoke/" in capsys.readouterr().out
    (repo / "store" / "mesa").mkdir(parents=True)
    (repo / "store" / "mesa" / "0123456789abcdef.pt").write_bytes(b"an artefact")
    assert run_record.begin()["store_empty_at_start"] is False
    for partial in (args + ["--only", "--"], args + ["--", "-p", "seed", "1"]):
        run_record.main(partial)
        assert json.loads((repo / "figures" / "smoke" / "run_all.json").read_text()) == full
    last = json.loads((repo / "data" / "runs" / "smoke" / "run_all.json").read_text())
    assert last["options"] == ["-p", "seed", "1"]
    assert "run record: data/runs/smoke/run_all.json\n" in capsys.readouterr().out
