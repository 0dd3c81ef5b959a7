"""What run_all.sh says in the terminal around each notebook, and the record it keeps of a run.

    python -m mesa_utils.run_record begin
        prints, as JSON, what must be read before the first notebook starts (the time, the
        commit, whether the artefact store was empty); `finish` takes it back
    python -m mesa_utils.run_record announce PROFILE NOTEBOOK
        the line before a notebook: its title and how long its last recorded run took
    python -m mesa_utils.run_record duration SECONDS
        "4 min 10 s"
    python -m mesa_utils.run_record finish --begun JSON --profile P [--only] [--refresh]
            [--notebook NAME SECONDS]... -- [papermill options]
        writes the record of a successful run and prints its total time and where its results are

The record goes to data/runs/<profile>/run_all.json after every successful run, and to
figures/<profile>/run_all.json only after the profile's whole default pipeline (no --only, no
papermill options): a partial run never overwrites the record of a full one, and the next run
estimates its notebooks from it.
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

# The repository's root, as store.REPO_ROOT: importing store would import torch (seconds),
# too slow for the lines printed around every notebook.
ROOT = Path(__file__).resolve().parents[1]
RECORD = "run_all.json"


def figures_record(profile: str) -> Path:
    return ROOT / "figures" / profile / RECORD


def runs_record(profile: str) -> Path:
    return ROOT / "data" / "runs" / profile / RECORD


def duration(seconds) -> str:
    """`seconds` for a person: "42 s", "4 min 10 s", "2 h 5 min"."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def title(notebook) -> str | None:
    """The first line of the notebook's first markdown cell without its leading '#'s, or None
    when it has no markdown cell."""
    cells = json.loads(Path(notebook).read_text(encoding="utf-8"))["cells"]
    for cell in cells:
        if cell["cell_type"] == "markdown":
            first = "".join(cell["source"]).strip().split("\n", 1)[0]
            return first.lstrip("#").strip() or None
    return None


def _read_record(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:   # e.g. merge-conflict markers in the committed one
        print(f"note: {path.relative_to(ROOT)} is not valid JSON ({err}); its estimates are "
              "left out until a run rewrites it", file=sys.stderr)
        return None


def last_seconds(profile: str, name: str) -> int | None:
    """The seconds notebook `name` took in the last recorded run of `profile`: that of the full
    pipeline (figures/), else the last run with no papermill options (data/runs/: a notebook
    run only when named, 06 on); None when neither ran it."""
    full, last = _read_record(figures_record(profile)), _read_record(runs_record(profile))
    if last and last.get("options"):
        last = None             # it computed another config: its times are not the profile's
    for record in (full, last):
        for entry in (record or {}).get("notebooks", []):
            if entry.get("notebook") == name:
                return entry.get("seconds")
    return None


def announcement(profile: str, notebook) -> str:
    """The line printed before a notebook runs: what it is and about how long it takes."""
    name = Path(notebook).name
    about = title(notebook)
    seconds = last_seconds(profile, name)
    estimate = ("no earlier run of this profile recorded" if seconds is None
                else f"last recorded run: {duration(seconds)}")
    return f"=== {name} (profile {profile}){': ' + about if about else ''}; {estimate} ==="


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def code_state() -> dict:
    """HEAD and whether the code (outputs.CODE_PATHS, untracked files included, as run_all.sh
    checks for --refresh-notebooks) differs from it; both None outside git."""
    from .outputs import CODE_PATHS

    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=30)
    try:
        head = git("rev-parse", "--verify", "--quiet", "HEAD")
        status = git("status", "--porcelain", "--", *CODE_PATHS)
    except (OSError, subprocess.SubprocessError):     # no git: say so rather than guess
        return {"commit": None, "uncommitted_changes": None}
    if status.returncode != 0:                        # not a checkout
        return {"commit": None, "uncommitted_changes": None}
    return {"commit": head.stdout.strip() or None,
            "uncommitted_changes": bool(status.stdout.strip())}


def store_is_empty() -> bool:
    """Whether the artefact store (store.Store's root) holds no artefact file: a run from an
    empty store retrains everything, so its times are those of a first run."""
    from .store import Store
    return not any(path.is_file() for path in Store().root.rglob("*.pt"))  # as Store.path names


def begin() -> dict:
    return {"started": _now(), **code_state(), "store_empty_at_start": store_is_empty()}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass                    # not Linux
    return platform.processor()


def record(begun: dict, profile: str, notebooks: list, options: list, refresh: bool) -> dict:
    """The record of a finished run; `notebooks` is [(name, seconds)] in the order they ran."""
    import torch        # here, not above: only this command, once a run, needs its version
    finished = _now()
    seconds = (datetime.datetime.fromisoformat(finished)
               - datetime.datetime.fromisoformat(begun["started"])).total_seconds()
    return {"profile": profile, "commit": begun["commit"],
            "uncommitted_changes": begun["uncommitted_changes"],
            "started": begun["started"], "finished": finished, "seconds": round(seconds),
            "notebooks": [{"notebook": name, "seconds": int(s)} for name, s in notebooks],
            "store_empty_at_start": begun["store_empty_at_start"],
            "cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "options": list(options), "refresh": refresh}


def write(run: dict, full: bool) -> list:
    """Write `run` into data/runs/<profile>/, and into figures/<profile>/ when `full`; returns
    the paths written."""
    from .store import write_json
    paths = [runs_record(run["profile"])] + ([figures_record(run["profile"])] if full else [])
    for path in paths:
        write_json(path, run)
    return paths


def summary(run: dict, paths: list) -> str:
    profile, shown = run["profile"], [str(path.relative_to(ROOT)) for path in paths]
    figures = (f"figures/{profile}/" if not run["options"] else
               f"the figures/ folder each notebook printed (not figures/{profile}/: the papermill "
               "options change the config)")
    return "\n".join([
        f"=== all {len(run['notebooks'])} notebooks done in {duration(run['seconds'])} ===",
        f"figures and tables: {figures}",
        f"executed notebooks: data/runs/{profile}/",
        f"run record: {', '.join(shown)}"])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Everything after "--" is papermill's: options of its own that argparse must not read.
    split = argv.index("--") if "--" in argv else len(argv)
    ours, options = argv[:split], argv[split + 1:]
    parser = argparse.ArgumentParser(prog="python -m mesa_utils.run_record",
                                     description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("begin", help="what to read before the first notebook, as JSON")
    announce = commands.add_parser("announce", help="the line printed before a notebook")
    announce.add_argument("profile")
    announce.add_argument("notebook")
    length = commands.add_parser("duration", help="seconds for a person")
    length.add_argument("seconds", type=float)
    finish = commands.add_parser("finish", help="write the record of a successful run")
    finish.add_argument("--begun", required=True, help="what `begin` printed")
    finish.add_argument("--profile", required=True)
    finish.add_argument("--only", action="store_true", help="the notebooks were named by --only")
    finish.add_argument("--refresh", action="store_true", help="a --refresh-notebooks run")
    finish.add_argument("--notebook", nargs=2, action="append", default=[],
                        metavar=("NAME", "SECONDS"), help="one per notebook, in the order run")
    args = parser.parse_args(ours)
    if args.command == "begin":
        print(json.dumps(begin()))
    elif args.command == "announce":
        print(announcement(args.profile, args.notebook))
    elif args.command == "duration":
        print(duration(args.seconds))
    else:
        run = record(json.loads(args.begun), args.profile, args.notebook, options, args.refresh)
        print(summary(run, write(run, full=not args.only and not options)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
