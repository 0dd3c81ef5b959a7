"""The committed notebooks carry the outputs of a real `quick` run, stamped with where they came from.

`./run_all.sh --refresh-notebooks` runs every notebook in the quick profile (papermill writes the
executed copies to data/runs/quick/), then calls `refresh` for each: the committed notebook keeps
its own cells (sources, metadata, and its parameters cell with profile = None, so that nbval under
MESA_PROFILE=smoke still runs smoke) and takes the outputs of the executed cell with the same id.
Its metadata gets a stamp, `mesa_outputs`:

    {"profile": "quick", "commit": <the commit whose code made the outputs>,
     "date": <UTC ISO date-time of the run>, "sources_sha256": sources_digest(notebook),
     "run_seconds": <papermill's duration of the notebook>}

`stamp_problems` lists why a committed notebook fails that promise (no stamp, another profile,
sources edited after the run, no outputs, an error output, ...); a test runs it over notebooks/.

Command line (what run_all.sh calls):

    python -m mesa_utils.committed refresh --executed-dir data/runs/quick --commit SHA \\
        --profile quick notebooks/01_attack.ipynb ...
"""
import argparse
import copy
import datetime
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

from .store import REPO_ROOT, atomic_write

STAMP_KEY = "mesa_outputs"
# papermill tags the cell holding the parameters it injected; the committed notebook must not
# keep it, or every later run (nbval's smoke run included) would use the injected values.
INJECTED_TAG = "injected-parameters"
REFRESH_HINT = "refresh with ./run_all.sh --refresh-notebooks"
# `git rev-parse HEAD` gives a full hash (SHA-1, or SHA-256 in such repositories); a short hash
# or a name such as HEAD would not pin the code.
_FULL_HASH = re.compile(r"^([0-9a-f]{40}|[0-9a-f]{64})$")


def _source(cell) -> str:
    # In the file a source is a string or a list of lines; both mean the joined text.
    source = cell.get("source", "")
    return source if isinstance(source, str) else "".join(source)


def _is_injected(cell) -> bool:
    return INJECTED_TAG in cell.get("metadata", {}).get("tags", [])


def _has_error(cell) -> bool:
    return any(output.get("output_type") == "error" for output in cell.get("outputs", []))


def sources_digest(nb: dict) -> str:
    """Hex SHA-256 over the cells' types and sources, in order (outputs, execution counts and
    metadata left out): a stamp holding it proves its outputs were made by exactly these sources."""
    cells = [[cell["cell_type"], _source(cell)] for cell in nb["cells"]]
    return hashlib.sha256(json.dumps(cells, ensure_ascii=False).encode()).hexdigest()


def _read(path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _run_date(papermill: dict) -> str:
    """The UTC ISO date-time the run ended (papermill records it), else now."""
    end = papermill.get("end_time")
    when = (datetime.datetime.fromisoformat(end) if end
            else datetime.datetime.now(datetime.timezone.utc))
    return when.astimezone(datetime.timezone.utc).isoformat(timespec="seconds")


def build(source_path, executed_path, stamp: dict) -> dict:
    """The committed notebook: `source_path`'s cells with the outputs and execution counts of
    `executed_path`'s (papermill's copy), and the `mesa_outputs` stamp (`stamp` merged into the
    run's date, duration and the sources' digest). ValueError when the executed notebook does not
    belong to these sources, ran other parameters than the stamp's profile, or recorded an error."""
    source, executed = _read(source_path), _read(executed_path)
    where = f"{executed_path} (executed) for {source_path}"
    papermill = executed.get("metadata", {}).get("papermill")
    if not isinstance(papermill, dict):
        raise ValueError(f"{where}: not a notebook executed by papermill (no papermill metadata)")
    # Any parameter beyond the profile (a seed, an override) made the outputs of another config.
    wanted = {"profile": stamp.get("profile")}
    if papermill.get("parameters") != wanted:
        raise ValueError(f"{where}: it ran with parameters {papermill.get('parameters')}, not "
                         f"{wanted}; run the notebooks again with ./run_all.sh --refresh-notebooks")
    errors = [i for i, cell in enumerate(executed["cells"]) if _has_error(cell)]
    if errors:
        raise ValueError(f"{where}: cell {errors[0]} recorded an error; its run failed, so its "
                         "outputs cannot be committed")
    ran = [cell for cell in executed["cells"] if not _is_injected(cell)]
    if len(ran) != len(source["cells"]):
        raise ValueError(f"{where}: {len(ran)} cells ran, the notebook has "
                         f"{len(source['cells'])}; it was edited after the run: run it again")
    for i, (mine, theirs) in enumerate(zip(source["cells"], ran)):
        if (mine.get("id"), mine["cell_type"], _source(mine)) != (
                theirs.get("id"), theirs["cell_type"], _source(theirs)):
            raise ValueError(f"{where}: cell {i} (id {mine.get('id')}) differs from the one "
                             "that ran; the notebook was edited after the run: run it again")

    nb = copy.deepcopy(source)
    # Checked above: each cell and the one that ran in its place have the same id.
    for cell, theirs in zip(nb["cells"], ran):
        if cell["cell_type"] == "code":
            # Only outputs and the count: the source cell's metadata stays, so papermill's
            # per-cell timings ("papermill", "execution") never reach the committed notebook.
            cell["outputs"] = copy.deepcopy(theirs.get("outputs", []))
            cell["execution_count"] = theirs.get("execution_count")
    nb["metadata"].pop("papermill", None)
    record = {"profile": None, "commit": None, "date": _run_date(papermill)}
    if isinstance(papermill.get("duration"), (int, float)):
        record["run_seconds"] = round(papermill["duration"], 1)
    record.update(stamp)
    record["sources_sha256"] = sources_digest(nb)     # always computed, never taken on trust
    nb["metadata"][STAMP_KEY] = record
    return nb


def write_notebook(path, nb: dict) -> Path:
    """Write `nb` as nbformat does (indent 1, sorted keys, UTF-8, final newline), atomically."""
    text = (json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
    return atomic_write(path, lambda f: f.write(text))


def refresh(source_path, executed_path, stamp: dict) -> None:
    """Replace the committed notebook `source_path` by its cells with the outputs of
    `executed_path` and the stamp (see `build`, which raises ValueError before anything is
    written when the executed notebook does not fit)."""
    write_notebook(source_path, build(source_path, executed_path, stamp))


def commit_known(commit: str, repo=REPO_ROOT):
    """Whether `commit` is a commit of the git checkout at `repo`; None when that cannot be told:
    no git, not a git checkout, or a shallow clone (whose history stops before older commits)."""
    def git(*args):
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    try:
        if git("rev-parse", "--is-inside-work-tree").stdout.strip() != "true":
            return None
        if git("cat-file", "-e", f"{commit}^{{commit}}").returncode == 0:
            return True
        return None if git("rev-parse", "--is-shallow-repository").stdout.strip() == "true" else False
    except OSError:
        return None


def stamp_problems(nb: dict, expected_profile="quick", repo=REPO_ROOT) -> list:
    """Why the committed notebook `nb` does not carry the outputs of a `expected_profile` run of
    its own sources at a known commit (empty when it does). Each message says the problem and the
    fix. The commit's existence is checked in the git checkout `repo` (skipped when repo is None
    or is no git checkout)."""
    problems = []
    stamp = nb.get("metadata", {}).get(STAMP_KEY)
    if not isinstance(stamp, dict):
        problems.append(f"no '{STAMP_KEY}' stamp in the notebook's metadata, so nothing says which "
                        f"run made its outputs: {REFRESH_HINT}")
    else:
        if stamp.get("profile") != expected_profile:
            problems.append(f"its outputs are from the profile {stamp.get('profile')!r}, not "
                            f"{expected_profile!r}: {REFRESH_HINT}")
        if stamp.get("sources_sha256") != sources_digest(nb):
            problems.append("its sources were edited after its outputs were made (the stamp's "
                            f"sources_sha256 does not match them): {REFRESH_HINT}")
        commit = stamp.get("commit")
        if not isinstance(commit, str) or not _FULL_HASH.match(commit):
            problems.append(f"the stamp names no commit (a full hash), got {commit!r}: "
                            f"{REFRESH_HINT}")
        elif repo is not None and commit_known(commit, repo) is False:
            problems.append(f"the stamp's commit {commit} is not in this repository (history "
                            f"rewritten, or never pushed): {REFRESH_HINT} on a pushed commit")
    cells = nb.get("cells", [])
    if not any(cell.get("outputs") for cell in cells if cell.get("cell_type") == "code"):
        problems.append(f"no code cell has outputs: {REFRESH_HINT}")
    if any(_has_error(cell) for cell in cells):
        problems.append("a cell holds an error output, so its run failed: fix the error, then "
                        f"{REFRESH_HINT}")
    if any(_is_injected(cell) for cell in cells):
        problems.append("it holds papermill's injected-parameters cell, which would override its "
                        f"parameters cell in every later run (nbval's smoke run too): {REFRESH_HINT}")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mesa_utils.committed",
                                     description="Refresh the committed notebooks' outputs.")
    commands = parser.add_subparsers(dest="command", required=True)
    ref = commands.add_parser("refresh", help="copy the outputs of executed notebooks into the "
                              "committed ones, with the stamp")
    ref.add_argument("notebooks", nargs="+", help="committed notebooks, e.g. notebooks/01_*.ipynb")
    ref.add_argument("--executed-dir", required=True, help="papermill's copies, same file names")
    ref.add_argument("--commit", required=True, help="the commit whose code ran them")
    ref.add_argument("--profile", required=True)
    args = parser.parse_args(argv)
    stamp = {"profile": args.profile, "commit": args.commit}
    # Every notebook is checked before any is written: a refusal leaves all of them as they were.
    try:
        built = [(path, build(path, Path(args.executed_dir) / Path(path).name, stamp))
                 for path in args.notebooks]
    except (ValueError, OSError) as err:
        print(f"error: {err}; no committed notebook was changed", file=sys.stderr)
        return 1
    for path, nb in built:
        write_notebook(path, nb)
        print(f"refreshed {path} (profile {args.profile}, commit {args.commit[:12]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
