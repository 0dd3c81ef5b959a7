"""Outputs are traceable and never lost: a run with overrides gets its own folder, each
notebook's files are published together with the config that made them, and a notebook that
fails half-way leaves the previous complete outputs untouched."""
import json

import pandas as pd
import pytest

from mesa_utils import store
from mesa_utils.config import make_config, to_dict
from mesa_utils.outputs import NotebookOutputs, output_folder, overridden_fields


def test_the_profile_as_it_is_writes_to_its_own_folder():
    assert output_folder(make_config("smoke")) == "smoke"
    assert output_folder(make_config("smoke", device="cpu")) == "smoke"  # where, not what


def test_a_run_with_overrides_writes_elsewhere_unless_told():
    steps = make_config("smoke", **{"mesa.steps": 12})
    seed = make_config("smoke", seed=1)
    assert overridden_fields(steps) == {"mesa.steps": 12}
    assert output_folder(steps).startswith("smoke-") and output_folder(steps) != "smoke"
    assert output_folder(steps) != output_folder(seed)
    assert output_folder(steps) == output_folder(make_config("smoke", **{"mesa.steps": 12}))
    assert output_folder(steps, "steps12") == "steps12"
    with pytest.raises(ValueError, match="plain name"):
        output_folder(steps, "../elsewhere")


def test_a_profiles_own_folder_takes_only_that_profile_as_configured(tmp_path):
    steps = make_config("smoke", **{"mesa.steps": 12})
    with pytest.raises(ValueError, match="outputs 'smoke' is a profile's own folder.*overrides "
                                         "mesa.steps"):
        NotebookOutputs(steps, "01", "smoke", root=tmp_path)
    with pytest.raises(ValueError, match="outputs 'quick' .* is of the profile 'smoke'"):
        NotebookOutputs(make_config("smoke"), "01", "quick", root=tmp_path)
    assert list(tmp_path.iterdir()) == []                  # refused before anything is made
    assert NotebookOutputs(make_config("smoke", device="cpu"), "01", "smoke",
                           root=tmp_path).folder == tmp_path / "smoke"


def _run(cfg, root, value, publish=True):
    out = NotebookOutputs(cfg, "07", root=root)
    out.table(pd.DataFrame({"value": [value]}), "result")
    if publish:
        out.publish()
    return out


def test_published_outputs_carry_the_complete_config(tmp_path):
    cfg = make_config("smoke", seed=3)
    folder = _run(cfg, tmp_path, 1).folder
    record = json.loads((folder / "07_run.json").read_text())
    assert record["config"] == json.loads(json.dumps(to_dict(cfg)))
    assert record["overridden"] == {"seed": 3} and record["files"] == ["07_result.csv"]
    assert "commit" in record and record["finished"]
    assert sorted(p.name for p in folder.iterdir()) == ["07_result.csv", "07_run.json"]


def test_a_failed_run_leaves_the_previous_outputs_intact(tmp_path):
    cfg = make_config("smoke")
    folder = _run(cfg, tmp_path, 1).folder
    before = (folder / "07_run.json").read_text()
    failed = _run(cfg, tmp_path, 2, publish=False)          # stops before its last cell
    assert pd.read_csv(folder / "07_result.csv").value.tolist() == [1]
    assert (folder / "07_run.json").read_text() == before
    assert failed.staging.exists()
    _run(cfg, tmp_path, 3)                                  # the next run clears the leftovers
    assert pd.read_csv(folder / "07_result.csv").value.tolist() == [3]
    assert not failed.staging.exists()


def test_the_code_that_stamps_results_is_one_list_in_python_and_in_run_all():
    import re
    from pathlib import Path
    from mesa_utils.outputs import CODE_PATHS
    script = (Path(__file__).parents[1] / "run_all.sh").read_text()
    listed = re.search(r"^CODE_PATHS=\((.*)\)$", script, re.M).group(1).split()
    assert tuple(listed) == CODE_PATHS


def test_figures_and_the_readme_do_not_count_as_uncommitted_code(tmp_path, monkeypatch):
    import subprocess
    from mesa_utils import outputs
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)
    git("init", "-q")
    for name in ("README.md", "figures/a.csv", "mesa_utils/x.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("1")
    git("add", ".")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "c")
    monkeypatch.setattr(outputs, "REPO_ROOT", tmp_path)
    (tmp_path / "README.md").write_text("2")
    (tmp_path / "figures" / "a.csv").write_text("2")
    assert outputs.code_version()["uncommitted_changes"] is False
    (tmp_path / "mesa_utils" / "x.py").write_text("2")
    assert outputs.code_version()["uncommitted_changes"] is True


def test_a_notebook_prints_its_folder_relative_to_the_repository(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "REPO_ROOT", tmp_path)        # a repository checked out here
    cfg = make_config("smoke", seed=3)
    inside = _run(cfg, tmp_path / "figures", 1, publish=False)
    assert str(inside) == f"figures/{inside.folder.name}"
    outside = _run(cfg, tmp_path.parent / f"{tmp_path.name}-elsewhere", 1, publish=False)
    assert str(outside) == str(outside.folder)
