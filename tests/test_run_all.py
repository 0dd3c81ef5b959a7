"""run_all.sh refuses bad arguments with a clear message (before running anything), a failed
notebook never overwrites the last complete executed notebook, and a run that succeeds leaves its
record."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUN_ALL = REPO / "run_all.sh"
# Appended to the cases below that a faulty script could accept: papermill and pytest both stop
# at once on an unknown option, so a regression fails the test instead of running notebooks.
STOP = "--no-such-option"


@pytest.mark.parametrize("args, message", [
    (["--profile", "huge"], "unknown profile 'huge'; choose smoke, quick or paper"),
    (["--only", "99"], "no notebook numbered '99'; choose from: 01 02 03 04 05"),
    (["--only"], "--only needs notebook numbers"),
])
def test_run_all_rejects_bad_arguments(args, message):
    result = subprocess.run(["bash", str(RUN_ALL), *args], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 2 and message in result.stderr


@pytest.mark.parametrize("only", ["", ",", " ", "03,,04", ",03", "03,"])
def test_run_all_only_rejects_empty_numbers(only):
    result = subprocess.run(["bash", str(RUN_ALL), "--only", only, STOP], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 2
    assert "--only needs notebook numbers separated by commas, e.g. --only 03,04" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--only", "03,03"], "--only 03,03: notebook 03 is listed twice"),
    (["--only=99"], "no notebook numbered '99'; choose from: 01 02 03 04 05"),
    (["--only", "*"], "no notebook numbered '*'"),
])
def test_run_all_only_rejects_repeats_and_unknown_numbers(args, message):
    result = subprocess.run(["bash", str(RUN_ALL), *args, STOP], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 2 and message in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--test", "--only", "03"], "--only does not apply to --test, which tests every notebook"),
    (["--profile=paper", "--test"], "--test always uses the smoke profile; leave out --profile paper"),
])
def test_run_all_test_rejects_options_it_would_ignore(args, message):
    result = subprocess.run(["bash", str(RUN_ALL), *args, STOP], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 2 and message in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--workers", "0"], "--workers needs a number of workers of 1 or more, got '0'"),
    (["--workers=two"], "--workers needs a number of workers of 1 or more, got 'two'"),
    (["--workers"], "--workers needs a number of workers"),
    (["--address"], "--address needs a Ray cluster address"),
    (["--workers", "2", "--test"], "they cannot be combined with --test"),
    (["--address", "auto", "--only", "03"], "they cannot be combined with --test, "
                                            "--refresh-notebooks or --only"),
    (["--workers", "2", "-p", "seed", "1"], "takes only --cpus-per-unit N and --gpus-per-unit S"),
    (["--address", "auto", "--kind", "screen"], "for other kinds or overrides run python -m"),
])
def test_run_all_sweep_rejects_bad_arguments(args, message):
    result = subprocess.run(["bash", str(RUN_ALL), *args, STOP], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 2 and message in result.stderr


def ready_venv():
    """The environment run_all.sh can reuse without installing anything: $MESA_VENV if set, else
    the one running these tests (under `./run_all.sh --test`, the repository's .venv)."""
    venv = Path(os.environ.get("MESA_VENV") or sys.prefix)
    stamp = venv / ".requirements.sha256"
    want = hashlib.sha256((REPO / "requirements.txt").read_bytes()).hexdigest()
    if not (stamp.is_file() and stamp.read_text().strip() == want):
        pytest.skip(f"no ready environment at {venv} (set MESA_VENV)")
    return venv


def repo_copy(tmp_path, notebooks):
    """run_all.sh, requirements.txt, mesa_utils and the given notebooks in a temporary
    repository."""
    shutil.copy(RUN_ALL, tmp_path)
    shutil.copy(REPO / "requirements.txt", tmp_path)
    shutil.copytree(REPO / "mesa_utils", tmp_path / "mesa_utils",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "notebooks").mkdir()
    for name, source in notebooks.items():
        if isinstance(source, Path):
            shutil.copy(source, tmp_path / "notebooks" / name)
        else:
            (tmp_path / "notebooks" / name).write_text(json.dumps(source))
    runs = tmp_path / "data" / "runs" / "smoke"
    runs.mkdir(parents=True)
    return runs


def run_copy(tmp_path, venv, *args, env=None):
    # as a user's shell starts it: without the TQDM_DISABLE that --test sets for its own run
    shell = {name: value for name, value in os.environ.items() if name != "TQDM_DISABLE"}
    return subprocess.run(["bash", str(tmp_path / "run_all.sh"), *args], capture_output=True,
                          text=True, timeout=600,
                          env={**shell, "MESA_VENV": str(venv), **(env or {})})


def test_run_all_names_no_stale_notebook_when_papermill_rejects_its_arguments(tmp_path):
    venv = ready_venv()
    runs = repo_copy(tmp_path, {"01_attack.ipynb": REPO / "notebooks" / "01_attack.ipynb"})
    stale = runs / "01_attack.ipynb"
    stale.write_text("executed notebook of an earlier run")
    (runs / "01_attack.partial.ipynb").write_text("left by an earlier failed run")
    result = run_copy(tmp_path, venv, "--profile", "smoke", "-y", "overrides: {")
    assert result.returncode == 1
    assert ("error: papermill failed before executing 01_attack.ipynb (see its message above); "
            "no executed notebook was written") in result.stderr
    assert "data/runs/smoke/01_attack" not in result.stderr
    assert stale.read_text() == "executed notebook of an earlier run"
    assert sorted(p.name for p in runs.iterdir()) == ["01_attack.ipynb"]


def tiny_notebook():
    """A parameters cell (profile, fail) and a cell that raises when fail is true."""
    def cell(source, tags=()):
        return {"cell_type": "code", "execution_count": None, "id": f"c{len(tags)}",
                "metadata": {"tags": list(tags)}, "outputs": [], "source": source}
    return {"cells": [cell("profile = 'quick'\nfail = False", ["parameters"]),
                      cell("if fail:\n    raise RuntimeError('planned failure')\nprint(profile)")],
            "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python",
                                        "name": "python3"}},
            "nbformat": 4, "nbformat_minor": 5}


def test_run_all_runs_the_studies_from_06_only_when_named(tmp_path):
    venv = ready_venv()
    runs = repo_copy(tmp_path, {"01_tiny.ipynb": tiny_notebook(),
                                "06_study.ipynb": tiny_notebook()})
    default = run_copy(tmp_path, venv, "--profile", "smoke")
    assert default.returncode == 0, default.stderr
    assert sorted(p.name for p in runs.iterdir()) == ["01_tiny.ipynb", "run_all.json"]
    named = run_copy(tmp_path, venv, "--profile", "smoke", "--only", "06")
    assert named.returncode == 0, named.stderr
    assert sorted(p.name for p in runs.iterdir()) == ["01_tiny.ipynb", "06_study.ipynb",
                                                      "run_all.json"]


def test_run_all_records_each_run_and_the_full_one_apart(tmp_path):
    venv = ready_venv()
    titled = tiny_notebook()
    titled["cells"].insert(0, {"cell_type": "markdown", "id": "title", "metadata": {},
                               "source": "# 01 · A tiny title\n\nwhat it does"})
    runs = repo_copy(tmp_path, {"01_tiny.ipynb": titled, "02_tiny.ipynb": tiny_notebook(),
                                "06_study.ipynb": tiny_notebook()})
    full_record = tmp_path / "figures" / "smoke" / "run_all.json"
    last_record = runs / "run_all.json"
    # a relative MESA_STORE is the repository's store/; outside git: no commit
    env = {"MESA_STORE": "store", "GIT_CEILING_DIRECTORIES": str(tmp_path.parent)}
    full = run_copy(tmp_path, venv, "--profile", "smoke", env=env)
    assert full.returncode == 0, full.stderr
    assert ("=== 01_tiny.ipynb (profile smoke): 01 · A tiny title; no earlier run of this "
            "profile recorded ===") in full.stdout
    record = json.loads(full_record.read_text())
    assert json.loads(last_record.read_text()) == record
    assert [n["notebook"] for n in record["notebooks"]] == ["01_tiny.ipynb", "02_tiny.ipynb"]
    assert all(isinstance(n["seconds"], int) for n in record["notebooks"])
    assert (record["profile"], record["commit"], record["uncommitted_changes"]) == (
        "smoke", None, None)
    assert (record["store_empty_at_start"], record["options"], record["refresh"]) == (
        True, [], False)
    assert record["started"] <= record["finished"] and record["seconds"] >= 0
    assert record["cores"] == os.cpu_count() and record["cpu"] and record["torch"]
    assert record["python"].count(".") == 2
    assert ("run record: data/runs/smoke/run_all.json, figures/smoke/run_all.json"
            in full.stdout)
    (tmp_path / "store" / "clean").mkdir(parents=True)
    (tmp_path / "store" / "clean" / "0123456789abcdef.pt").write_bytes(b"an artefact")
    named = run_copy(tmp_path, venv, "--profile", "smoke", "--only", "01,06", env=env)
    assert named.returncode == 0, named.stderr
    seconds = record["notebooks"][0]["seconds"]
    assert f"A tiny title; last recorded run: {seconds} s ===" in named.stdout
    assert ("=== 06_study.ipynb (profile smoke); no earlier run of this profile recorded ==="
            in named.stdout)
    last = json.loads(last_record.read_text())
    assert [n["notebook"] for n in last["notebooks"]] == ["01_tiny.ipynb", "06_study.ipynb"]
    assert last["store_empty_at_start"] is False
    assert json.loads(full_record.read_text()) == record      # a partial run leaves it alone


def test_run_all_keeps_the_last_complete_notebook_when_a_run_fails(tmp_path):
    venv = ready_venv()
    runs = repo_copy(tmp_path, {"01_tiny.ipynb": tiny_notebook()})
    final, partial = runs / "01_tiny.ipynb", runs / "01_tiny.partial.ipynb"
    final.write_text("executed notebook of an earlier run")
    failed = run_copy(tmp_path, venv, "--profile", "smoke", "-p", "fail", "True")
    assert failed.returncode == 1
    assert ("error: 01_tiny.ipynb failed; the executed notebook with the error is "
            "data/runs/smoke/01_tiny.partial.ipynb") in failed.stderr
    assert final.read_text() == "executed notebook of an earlier run"
    assert "planned failure" in partial.read_text()
    done = run_copy(tmp_path, venv, "--profile", "smoke")
    assert done.returncode == 0, done.stderr
    assert not partial.exists() and "smoke" in final.read_text()


def test_run_all_runs_its_own_checkouts_code_in_an_environment_another_made(tmp_path):
    venv = ready_venv()          # made by the repository's checkout: its .pth names that one
    runs = repo_copy(tmp_path, {})
    with open(tmp_path / "mesa_utils" / "__init__.py", "a") as marker:
        marker.write("WHERE = 'the copy'\n")
    notebook = tiny_notebook()
    notebook["cells"][1]["source"] = "import mesa_utils\nprint(mesa_utils.WHERE)"
    (tmp_path / "notebooks" / "01_tiny.ipynb").write_text(json.dumps(notebook))
    result = run_copy(tmp_path, venv, "--profile", "smoke")
    assert result.returncode == 0, result.stderr
    assert "the copy" in (runs / "01_tiny.ipynb").read_text()


@pytest.mark.parametrize("args, message", [
    (["-p", "sed", "1"], "-p sed: 01_tiny.ipynb has no parameter 'sed' (its parameters: fail, "
                         "profile); papermill would ignore it"),
    (["-y", "{fail: true, seeed: 2}"], "-y seeed: 01_tiny.ipynb has no parameter 'seeed'"),
    (["-p", "profile", "quick"], "-p profile: set it with run_all.sh's --profile"),
    (["-p", "fail"], "papermill options -p fail: -p needs 2 value(s)"),
])
def test_run_all_refuses_parameters_the_notebooks_do_not_have_before_any_run(tmp_path, args,
                                                                            message):
    venv = ready_venv()
    runs = repo_copy(tmp_path, {"01_tiny.ipynb": tiny_notebook()})
    result = run_copy(tmp_path, venv, "--profile", "smoke", *args)
    assert result.returncode == 2 and f"error: {message}" in result.stderr
    assert list(runs.iterdir()) == [] and "=== 01_tiny" not in result.stdout


def test_the_parameter_check_reads_every_form_papermill_takes(tmp_path):
    from mesa_utils.notebook_parameters import notebook_parameters, passed_parameters
    import base64
    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps(tiny_notebook()))
    assert notebook_parameters(path) == {"profile", "fail"}
    (tmp_path / "p.yaml").write_text("seed: 1\n")
    options = ["--cwd", "notebooks", "-p", "a", "1", "--parameters=b", "2", "-r", "c", "x",
               "-y", "d: 1", "--log-output", "-f", str(tmp_path / "p.yaml"),
               "-b", base64.b64encode(b"e: 2").decode(), "--kernel=python3"]
    assert sorted(passed_parameters(options)) == ["a", "b", "c", "d", "e", "seed"]
    assert passed_parameters(["-y", "overrides: {"]) == {}     # papermill reports it itself


def test_run_all_refuses_to_run_beside_another_run_in_the_same_checkout(tmp_path):
    import fcntl
    venv = ready_venv()
    runs = repo_copy(tmp_path, {"01_tiny.ipynb": tiny_notebook()})
    with open(tmp_path / "data" / ".run_all.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)          # the other run
        refused = run_copy(tmp_path, venv, "--profile", "smoke")
    assert refused.returncode == 2 and "another ./run_all.sh is running" in refused.stderr
    assert list(runs.iterdir()) == []
    done = run_copy(tmp_path, venv, "--profile", "smoke")        # released: it runs
    assert done.returncode == 0, done.stderr


# --refresh-notebooks commits outputs as those of the quick profile at HEAD; these cases also run
# with no Python to set up with, so a faulty script stops at once (exit 1) instead of running.
NO_PYTHON = {**os.environ, "PYTHON": "no-such-python"}


@pytest.mark.parametrize("args, message", [
    (["--test"], "--refresh-notebooks cannot be combined with --test"),
    (["--profile", "smoke"], "--refresh-notebooks always uses the quick profile; leave out "
                             "--profile smoke"),
    (["-p", "seed", "1"], "--refresh-notebooks takes no papermill options (got: -p seed 1 "
                          f"{STOP})"),
])
def test_run_all_refresh_rejects_options_that_change_the_outputs(args, message):
    result = subprocess.run(["bash", str(RUN_ALL), "--refresh-notebooks", *args, STOP],
                            capture_output=True, text=True, timeout=600, env=NO_PYTHON)
    assert result.returncode == 2 and message in result.stderr


def git(repo, *args):
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=Test", "-c",
                    "user.email=test@example.com", "-c", "commit.gpgsign=false", *args],
                   capture_output=True, text=True, check=True)


def test_run_all_refresh_needs_the_code_committed(tmp_path):
    repo_copy(tmp_path, {"01_tiny.ipynb": tiny_notebook()})
    env = {**NO_PYTHON, "GIT_CEILING_DIRECTORIES": str(tmp_path.parent)}

    def refresh():
        return subprocess.run(["bash", str(tmp_path / "run_all.sh"), "--refresh-notebooks"],
                              capture_output=True, text=True, timeout=600, env=env)
    outside = refresh()
    assert outside.returncode == 2
    assert "--refresh-notebooks needs a git checkout" in outside.stderr
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "run_all.sh", "requirements.txt", "notebooks", "mesa_utils")
    git(tmp_path, "commit", "-q", "-m", "code")
    clean = refresh()       # passes every check, then stops at the set-up: no Python
    assert clean.returncode == 1 and "error: no-such-python not found" in clean.stderr
    (tmp_path / "notebooks" / "01_tiny.ipynb").write_text(json.dumps(tiny_notebook(), indent=2))
    (tmp_path / "mesa_utils" / "new.py").write_text("")
    dirty = refresh()
    assert dirty.returncode == 2
    assert ("--refresh-notebooks needs a clean tree; commit your changes first: the stamp names "
            "the commit whose code made the outputs") in dirty.stderr
    assert " M notebooks/01_tiny.ipynb" in dirty.stderr and "?? mesa_utils/new.py" in dirty.stderr


def test_run_all_shows_progress_and_outputs_in_the_terminal_not_in_the_notebook(tmp_path):
    venv = ready_venv()
    notebook = tiny_notebook()
    notebook["cells"][1]["source"] = ("from mesa_utils.train import progress\n"
                                      "for _ in progress(range(3), 'tiny loop'):\n"
                                      "    pass\n"
                                      "print('loop finished')")
    runs = repo_copy(tmp_path, {"01_tiny.ipynb": notebook})
    result = run_copy(tmp_path, venv, "--profile", "smoke")
    assert result.returncode == 0, result.stderr
    terminal = result.stdout + result.stderr
    assert "tiny loop:   0%| | 0/3" in terminal.replace(" " * 10, " ")   # the bar, as text
    assert "loop finished" in terminal                          # the cell's output, as it came
    executed = json.loads((runs / "01_tiny.ipynb").read_text())["cells"][-1]   # after papermill's
    assert [("".join(o.get("text", "")), o["output_type"]) for o in executed["outputs"]] == [
        ("loop finished\n", "stream")]


def test_run_all_refresh_puts_stamped_quick_outputs_into_the_committed_notebooks(tmp_path):
    venv = ready_venv()
    notebook = tiny_notebook()
    notebook["cells"][0]["source"] = "profile = None"
    notebook["cells"][1]["source"] = ("import os\n"
                                      "print(profile, os.environ.get('MESA_TERMINAL_PROGRESS'))")
    repo_copy(tmp_path, {"01_tiny.ipynb": notebook})
    (tmp_path / ".gitignore").write_text("/data/\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-q", "-m", "code")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    result = run_copy(tmp_path, venv, "--refresh-notebooks")
    assert result.returncode == 0, result.stderr
    committed = json.loads((tmp_path / "notebooks" / "01_tiny.ipynb").read_text())
    assert [c["source"] for c in committed["cells"]] == [c["source"] for c in notebook["cells"]]
    assert committed["cells"][1]["outputs"][0]["text"] == ["quick 1\n"]   # no progress bars
    stamp = committed["metadata"]["mesa_outputs"]
    assert (stamp["profile"], stamp["commit"]) == ("quick", head)
    from mesa_utils.committed import stamp_problems
    assert stamp_problems(committed, repo=tmp_path) == []
    record = json.loads((tmp_path / "figures" / "quick" / "run_all.json").read_text())
    assert (record["commit"], record["uncommitted_changes"], record["refresh"]) == (
        head, False, True)


def test_prepare_device_carries_the_archive_and_prints_the_command(tmp_path):
    repo_copy(tmp_path, {})
    archive = tmp_path / "elsewhere" / "cifar10-jpg.tar.gz"
    archive.parent.mkdir()
    archive.write_bytes(b"archive bytes")
    env = {**os.environ, "MESA_CIFAR10_ARCHIVE": str(archive)}
    result = subprocess.run(["bash", str(tmp_path / "run_all.sh"), "--profile", "paper",
                             "--prepare-device"], capture_output=True, text=True, env=env,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / ".device" / "cifar10-jpg.tar.gz").read_bytes() == b"archive bytes"
    assert ("python3 -m mesa_utils.timeboxed --profile paper --out \"$OUT\" --budget 540"
            in result.stdout)
    refused = subprocess.run(["bash", str(tmp_path / "run_all.sh"), "--prepare-device",
                              "--only", "01"], capture_output=True, text=True, env=env,
                             timeout=60)
    assert refused.returncode == 2 and "takes no other options" in refused.stderr
    missing = subprocess.run(["bash", str(tmp_path / "run_all.sh"), "--prepare-device"],
                             capture_output=True, text=True, timeout=60,
                             env={**env, "MESA_CIFAR10_ARCHIVE": str(tmp_path / "none.tgz")})
    assert missing.returncode == 1 and "no CIFAR-10 archive to carry" in missing.stderr
    assert "none.tgz, which does not exist" in missing.stderr
    checksum = archive.parent / "cifar10-jpg.tar.gz.sha256"
    for text, message in (("", "holds no SHA-256"), ("0" * 64, "does not match its checksum")):
        checksum.write_text(text)
        bad = subprocess.run(["bash", str(tmp_path / "run_all.sh"), "--prepare-device"],
                             capture_output=True, text=True, timeout=60, env=env)
        assert bad.returncode == 1 and message in bad.stderr
    checksum.write_text(hashlib.sha256(b"archive bytes").hexdigest() + "  cifar10-jpg.tar.gz\n")
    good = subprocess.run(["bash", str(tmp_path / "run_all.sh"), "--prepare-device"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert good.returncode == 0, good.stderr
    assert (tmp_path / ".device" / "cifar10-jpg.tar.gz.sha256").read_text() == checksum.read_text()


def test_run_all_refuses_a_python_older_than_3_11(tmp_path):
    # A stand-in for Python 3.10: it runs the version check with sys.version_info set to 3.10.
    fake = tmp_path / "python3.10"
    fake.write_text('#!/bin/sh\n'
                    'if [ "$1" = --version ]; then echo "Python 3.10.12"; exit 0; fi\n'
                    'exec python3 -c "import sys; sys.version_info = (3, 10, 12); '
                    'exec(sys.argv[1])" "$2"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "MESA_VENV": str(tmp_path / "venv")}
    result = subprocess.run(["bash", str(RUN_ALL), "--test"], capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 1
    assert ("Python 3.10.12 found; Python 3.11 or 3.12 is needed (diffusers needs 3.11"
            in result.stderr)
    assert not (tmp_path / "venv").exists()
