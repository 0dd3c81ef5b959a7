"""The committed notebooks carry the outputs of a real quick run of their own sources, stamped with
the commit and profile (mesa_utils.committed): refresh on small synthetic notebooks, each problem
stamp_problems must find, and the check over the notebooks committed in notebooks/."""
import copy
import json
import subprocess
from pathlib import Path

import pytest

from mesa_utils import committed
from mesa_utils.committed import build, refresh, sources_digest, stamp_problems

REPO = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
STAMP = {"profile": "quick", "commit": COMMIT}


def cell(kind, source, cell_id, tags=None, outputs=None, count=None):
    made = {"cell_type": kind, "id": cell_id, "metadata": {} if tags is None else {"tags": tags},
            "source": source}
    if kind == "code":
        made.update(outputs=outputs or [], execution_count=count)
    return made


def stdout(text):
    return {"name": "stdout", "output_type": "stream", "text": [text]}


def source_notebook():
    """As committed: a title, the parameters cell (profile = None) and two code cells."""
    return {"cells": [cell("markdown", ["# Title\n", "Some text."], "md1"),
                      cell("code", ["# Parameters\n", "profile = None"], "par", ["parameters"]),
                      cell("code", ["x = 6 * 7\n", "print(x)"], "c1"),
                      cell("code", "print('second')", "c2")],
            "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                        "language": "python"}},
            "nbformat": 4, "nbformat_minor": 5}


def executed_notebook(profile="quick"):
    """What papermill writes for source_notebook(): its injected cell after the parameters cell,
    its timings in every cell's metadata and in the notebook's, and the outputs."""
    timing = {"papermill": {"duration": 0.1, "status": "completed"},
              "execution": {"iopub.status.idle": "2026-11-23T12:10:49Z"}}
    nb = source_notebook()
    md, par, c1, c2 = nb["cells"]
    injected = cell("code", f'# Parameters\nprofile = "{profile}"\n', "inj",
                    ["injected-parameters"], count=2)
    par.update(execution_count=1)
    c1.update(outputs=[stdout("42\n")], execution_count=3)
    c2.update(outputs=[stdout("second\n"), {"output_type": "display_data", "metadata": {},
                                           "data": {"text/plain": ["<Figure>"]}}],
              execution_count=4)
    for one in (md, par, injected, c1, c2):
        one["metadata"] = {**copy.deepcopy(timing), "tags": one["metadata"].get("tags", [])}
    nb["cells"] = [md, par, injected, c1, c2]
    nb["metadata"]["papermill"] = {"parameters": {"profile": profile}, "duration": 12.34,
                                   "end_time": "2026-11-23T12:10:49.584351+00:00",
                                   "exception": None}
    return nb


def write(path, nb):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(nb, indent=1))
    return path


def pair(tmp_path, executed=None):
    """The committed notebook and papermill's executed copy, as files."""
    return (write(tmp_path / "notebooks" / "01_x.ipynb", source_notebook()),
            write(tmp_path / "runs" / "01_x.ipynb", executed or executed_notebook()))


def test_refresh_takes_the_outputs_by_cell_and_keeps_the_committed_cells(tmp_path):
    source, executed = pair(tmp_path)
    refresh(source, executed, STAMP)
    text = source.read_text(encoding="utf-8")
    nb = json.loads(text)
    assert text.endswith("}\n") and text.startswith('{\n "cells": [\n  {\n')    # nbformat's layout
    assert [c["id"] for c in nb["cells"]] == ["md1", "par", "c1", "c2"]       # no injected cell
    md, par, c1, c2 = nb["cells"]
    assert md == source_notebook()["cells"][0]
    # The parameters cell is the committed one, so a later nbval run picks its own profile.
    assert {k: par[k] for k in ("source", "metadata")} == {
        "source": ["# Parameters\n", "profile = None"], "metadata": {"tags": ["parameters"]}}
    assert (par["outputs"], par["execution_count"]) == ([], 1)
    assert (c1["outputs"], c1["execution_count"]) == ([stdout("42\n")], 3)
    assert c2["outputs"][0] == stdout("second\n") and c2["outputs"][1]["output_type"] == "display_data"
    assert all(c["metadata"] in ({}, {"tags": ["parameters"]}) for c in nb["cells"])  # no timings
    assert set(nb["metadata"]) == {"kernelspec", "mesa_outputs"}
    assert nb["metadata"]["mesa_outputs"] == {
        "profile": "quick", "commit": COMMIT, "date": "2026-11-23T12:10:49+00:00",
        "run_seconds": 12.3, "sources_sha256": sources_digest(source_notebook())}
    assert stamp_problems(nb, repo=None) == []


def test_refresh_replaces_an_old_stamp_and_papermill_metadata(tmp_path):
    source, executed = pair(tmp_path)
    stale = source_notebook()
    stale["metadata"].update(papermill={"parameters": {"profile": "smoke"}},
                             mesa_outputs={"profile": "smoke", "commit": "f" * 40})
    write(source, stale)
    refresh(source, executed, STAMP)
    metadata = json.loads(source.read_text())["metadata"]
    assert "papermill" not in metadata
    assert (metadata["mesa_outputs"]["profile"], metadata["mesa_outputs"]["commit"]) == (
        "quick", COMMIT)


def test_a_refreshed_notebook_is_valid_nbformat(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    source, executed = pair(tmp_path)
    refresh(source, executed, STAMP)
    nbformat.validate(nbformat.read(source, as_version=4))


def edited_source(nb):
    nb["cells"][3]["source"] = "x = 6 * 9\nprint(x)"


def added_cell(nb):
    nb["cells"].append(cell("code", "print('new')", "c3"))


def changed_id(nb):
    nb["cells"][4]["id"] = "other"


def changed_type(nb):
    nb["cells"][0]["cell_type"] = "raw"


@pytest.mark.parametrize("edit, message", [
    (edited_source, "cell 2 (id c1) differs from the one that ran"),
    (added_cell, "5 cells ran, the notebook has 4"),
    (changed_id, "cell 3 (id c2) differs from the one that ran"),
    (changed_type, "cell 0 (id md1) differs from the one that ran"),
])
def test_refresh_refuses_a_run_of_other_sources(tmp_path, edit, message):
    executed = executed_notebook()
    edit(executed)
    source, executed_path = pair(tmp_path, executed)
    before = source.read_bytes()
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        refresh(source, executed_path, STAMP)
    assert source.read_bytes() == before


def test_refresh_refuses_a_run_that_recorded_an_error(tmp_path):
    executed = executed_notebook()
    executed["cells"][4]["outputs"].append({"output_type": "error", "ename": "RuntimeError",
                                            "evalue": "boom", "traceback": []})
    source, executed_path = pair(tmp_path, executed)
    before = source.read_bytes()
    with pytest.raises(ValueError, match="cell 4 recorded an error"):
        refresh(source, executed_path, STAMP)
    assert source.read_bytes() == before


@pytest.mark.parametrize("parameters", [{"profile": "smoke"}, {"profile": "quick", "seed": 1}])
def test_refresh_refuses_a_run_with_other_parameters(tmp_path, parameters):
    executed = executed_notebook()
    executed["metadata"]["papermill"]["parameters"] = parameters
    source, executed_path = pair(tmp_path, executed)
    with pytest.raises(ValueError, match="it ran with parameters"):
        refresh(source, executed_path, STAMP)


def test_the_command_line_changes_no_notebook_when_one_does_not_fit(tmp_path, capsys):
    good = write(tmp_path / "notebooks" / "01_x.ipynb", source_notebook())
    bad = write(tmp_path / "notebooks" / "02_y.ipynb", source_notebook())
    write(tmp_path / "runs" / "01_x.ipynb", executed_notebook())
    write(tmp_path / "runs" / "02_y.ipynb", executed_notebook("smoke"))
    before = good.read_bytes()
    args = ["refresh", "--executed-dir", str(tmp_path / "runs"), "--commit", COMMIT,
            "--profile", "quick", str(good), str(bad)]
    assert committed.main(args) == 1
    assert "no committed notebook was changed" in capsys.readouterr().err
    assert good.read_bytes() == before
    write(tmp_path / "runs" / "02_y.ipynb", executed_notebook())
    assert committed.main(args) == 0
    for path in (good, bad):
        assert json.loads(path.read_text())["metadata"]["mesa_outputs"]["commit"] == COMMIT


def test_the_digest_follows_the_sources_and_nothing_else():
    nb = source_notebook()
    digest = sources_digest(nb)
    assert len(digest) == 64 and int(digest, 16) >= 0
    same = copy.deepcopy(nb)
    same["cells"][2].update(outputs=[stdout("42\n")], execution_count=7, metadata={"x": 1})
    same["cells"][2]["source"] = "".join(same["cells"][2]["source"])   # one string, same text
    same["metadata"]["mesa_outputs"] = STAMP
    assert sources_digest(same) == digest
    for change in (lambda c: c.update(source="x = 6 * 9\nprint(x)"),
                   lambda c: c.update(cell_type="markdown")):
        other = copy.deepcopy(nb)
        change(other["cells"][2])
        assert sources_digest(other) != digest
    swapped = copy.deepcopy(nb)
    swapped["cells"][2:4] = swapped["cells"][3:1:-1]
    assert sources_digest(swapped) != digest


def refreshed():
    """A good committed notebook: built from the synthetic run."""
    nb = source_notebook()
    nb["cells"][2]["outputs"] = [stdout("42\n")]
    nb["metadata"]["mesa_outputs"] = {"profile": "quick", "commit": COMMIT,
                                      "date": "2026-11-23T12:10:49+00:00",
                                      "sources_sha256": sources_digest(nb)}
    return nb


def no_stamp(nb):
    del nb["metadata"]["mesa_outputs"]


def smoke_stamp(nb):
    nb["metadata"]["mesa_outputs"]["profile"] = "smoke"


def edited_after_run(nb):
    nb["cells"][2]["source"] = "x = 6 * 9\nprint(x)"


def no_commit(nb):
    del nb["metadata"]["mesa_outputs"]["commit"]


def short_commit(nb):
    nb["metadata"]["mesa_outputs"]["commit"] = "HEAD"


def no_outputs(nb):
    nb["cells"][2]["outputs"] = []


def error_output(nb):
    nb["cells"][3]["outputs"] = [{"output_type": "error", "ename": "E", "evalue": "",
                                  "traceback": []}]


def injected_kept(nb):
    nb["cells"].insert(2, cell("code", 'profile = "quick"\n', "inj", ["injected-parameters"]))
    nb["metadata"]["mesa_outputs"]["sources_sha256"] = sources_digest(nb)


@pytest.mark.parametrize("spoil, problem", [
    (no_stamp, "no 'mesa_outputs' stamp in the notebook's metadata"),
    (smoke_stamp, "its outputs are from the profile 'smoke', not 'quick'"),
    (edited_after_run, "its sources were edited after its outputs were made"),
    (no_commit, "the stamp names no commit (a full hash), got None"),
    (short_commit, "the stamp names no commit (a full hash), got 'HEAD'"),
    (no_outputs, "no code cell has outputs"),
    (error_output, "a cell holds an error output"),
    (injected_kept, "it holds papermill's injected-parameters cell"),
])
def test_stamp_problems_finds_each_problem_and_names_the_fix(spoil, problem):
    assert stamp_problems(refreshed(), repo=None) == []
    nb = refreshed()
    spoil(nb)
    problems = stamp_problems(nb, repo=None)
    assert len(problems) == 1 and problems[0].startswith(problem), problems
    assert "fix the error" in problems[0] or problems[0].endswith(
        "refresh with ./run_all.sh --refresh-notebooks")


def test_stamp_problems_wants_the_expected_profile():
    assert stamp_problems(refreshed(), expected_profile="paper", repo=None) == [
        "its outputs are from the profile 'quick', not 'paper': refresh with "
        "./run_all.sh --refresh-notebooks"]


def git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=Test",
                           "-c", "user.email=test@example.com", "-c", "commit.gpgsign=false",
                           *args], capture_output=True, text=True, check=True).stdout.strip()


def test_stamp_problems_wants_a_commit_of_the_repository(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "file").write_text("code\n")
    git(repo, "add", "file")
    git(repo, "commit", "-q", "-m", "code")
    nb = refreshed()
    nb["metadata"]["mesa_outputs"]["commit"] = git(repo, "rev-parse", "HEAD")
    assert stamp_problems(nb, repo=repo) == []
    nb["metadata"]["mesa_outputs"]["commit"] = COMMIT
    assert stamp_problems(nb, repo=repo) == [
        f"the stamp's commit {COMMIT} is not in this repository (history rewritten, or never "
        "pushed): refresh with ./run_all.sh --refresh-notebooks on a pushed commit"]
    # A shallow clone's history stops before older commits: one missing there is not a problem.
    (repo / "file").write_text("more code\n")
    git(repo, "commit", "-q", "-am", "more code")
    git(tmp_path, "clone", "-q", "--depth", "1", f"file://{repo}", "shallow")
    nb["metadata"]["mesa_outputs"]["commit"] = git(repo, "rev-parse", "HEAD~1")
    assert stamp_problems(nb, repo=tmp_path / "shallow") == []
    assert stamp_problems(nb, repo=repo) == []
    nb["metadata"]["mesa_outputs"]["commit"] = COMMIT
    # Outside a git checkout (an unpacked archive) the commit cannot be looked up: only that
    # check is left out.
    plain = tmp_path / "plain"
    plain.mkdir()
    assert stamp_problems(nb, repo=plain) == []
    smoke_stamp(nb)
    assert len(stamp_problems(nb, repo=plain)) == 1


@pytest.mark.parametrize("path", sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb")),
                         ids=lambda path: path.name)
def test_committed_notebooks_carry_stamped_quick_outputs(path):
    problems = stamp_problems(json.loads(path.read_text(encoding="utf-8")))
    assert problems == [], f"notebooks/{path.name}: " + "; ".join(problems)


# A path of a machine: from the root through a folder, as a run's prints would show it.
MACHINE_PATH = r"(?<![\w.~])/(?:home|root|tmp|work|Users|check|mnt|opt|srv|var)/[\w.-]+"


def test_no_committed_output_or_table_holds_a_machines_path():
    import re
    holding = {path.relative_to(REPO).as_posix()
               for folder in ("notebooks", "figures") for path in (REPO / folder).rglob("*")
               if path.is_file() and path.suffix in (".ipynb", ".csv", ".json", ".md")
               and re.search(MACHINE_PATH, path.read_text(encoding="utf-8"))}
    # 01, 02 and 04-07 still print out.folder (absolute): at their next refresh they must
    # print `out` (store.shown), as 03 and 08 do, or this fails
    assert holding == set(), (f"{sorted(holding)} hold an absolute path of a machine: print "
                              "paths with store.shown (a notebook prints its folder as {out})")
