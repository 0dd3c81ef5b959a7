"""Where a notebook's figures and tables go: every result traceable, none lost.

`NotebookOutputs(cfg, "03")` writes notebook 03's figures (PNG) and tables (CSV) into a
staging folder; `publish()`, the notebook's last step, moves them into figures/<folder>/ and
writes 03_run.json beside them: the complete config, the fields that differ from the profile,
the code's commit and the time. Hence:
- a notebook that fails half-way leaves that notebook's previous complete outputs untouched
  (its staging folder is cleared when the notebook next starts);
- a run of a profile as it is writes to figures/<profile>/; a run with any override writes to
  figures/<profile>-<hash of the complete config>/, unless `folder` names another, so an
  experiment never overwrites the profile's results;
- files of an earlier run that this run does not make stay in place; NN_run.json lists the
  files this run made.
"""
import datetime
import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

from .config import PROFILES, make_config, results_dict, to_dict
from .store import REPO_ROOT, atomic_write, shown, spec_key, write_json

_FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def overridden_fields(cfg) -> dict:
    """{dotted field: value} where `cfg` differs from its profile (config.HOW_FIELDS aside:
    they decide where a run computes, not what it computes)."""
    profile = results_dict(make_config(cfg.profile))
    return {name: value for name, value in results_dict(cfg).items() if profile[name] != value}


def output_folder(cfg, folder: str | None = None) -> str:
    """The folder under figures/ for `cfg`'s outputs: `folder` when given, the profile's name
    for the profile as it is, else <profile>-<config hash>."""
    if folder is None:
        if not overridden_fields(cfg):
            return cfg.profile
        return f"{cfg.profile}-{spec_key(results_dict(cfg))[:8]}"
    if not _FOLDER_NAME.fullmatch(folder):
        raise ValueError(f"output folder {folder!r} must be a plain name of letters, digits, "
                         "'.', '_' and '-' (it is created under figures/)")
    return folder


# What makes the results: a change here, uncommitted, means the commit did not make them
# (run_all.sh's CODE_PATHS is the same list; tests/test_outputs.py holds the two together).
CODE_PATHS = ("mesa_utils", "notebooks", "requirements.txt", "run_all.sh")


def code_version() -> dict:
    """The repository's commit and whether the code (CODE_PATHS; not figures or the README,
    which runs write and edit) had uncommitted changes."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=30).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD") or None
        changed = bool(git("status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS))
    except (OSError, subprocess.SubprocessError):   # no git: say so rather than guess
        return {"commit": None, "uncommitted_changes": None}
    return {"commit": commit, "uncommitted_changes": changed if commit else None}


class NotebookOutputs:
    """Figures and tables of one notebook (`notebook` = its number, e.g. "03"), staged, then
    published together by `publish()`."""

    def __init__(self, cfg, notebook: str, folder: str | None = None, root=None):
        changed = overridden_fields(cfg) if folder in PROFILES else {}
        if folder in PROFILES and (folder != cfg.profile or changed):
            what = (f"overrides {', '.join(sorted(changed))}" if folder == cfg.profile
                    else f"is of the profile {cfg.profile!r}")
            raise ValueError(f"outputs {folder!r} is a profile's own folder, which holds the "
                             f"outputs of that profile as configured, but this run {what}: "
                             "leave outputs unset (the folder is then named by the config's "
                             "hash) or choose another name")
        self.cfg, self.notebook = cfg, notebook
        self.folder = Path(root or REPO_ROOT / "figures") / output_folder(cfg, folder)
        self.staging = self.folder / f".staging-{notebook}"
        shutil.rmtree(self.staging, ignore_errors=True)     # a failed earlier run's leftovers
        self.staging.mkdir(parents=True)

    def __str__(self) -> str:
        """The output folder as a notebook prints it: relative to the repository."""
        return shown(self.folder)

    def _path(self, name, suffix) -> Path:
        return self.staging / f"{self.notebook}_{name}{suffix}"

    def figure(self, fig, name: str) -> None:
        """Stage `fig` as <notebook>_<name>.png. Returns None, so that a notebook cell ending
        in this call shows the figure, not the staging path."""
        atomic_write(self._path(name, ".png"), functools.partial(
            fig.savefig, dpi=120, bbox_inches="tight", format="png"))

    def table(self, df, name: str) -> Path:
        """Stage the tidy table `df` as <notebook>_<name>.csv."""
        return atomic_write(self._path(name, ".csv"), functools.partial(df.to_csv, index=False))

    def publish(self) -> Path:
        """Move the staged files into the output folder, then write <notebook>_run.json;
        returns the folder."""
        files = sorted(p.name for p in self.staging.iterdir() if not p.name.endswith(".tmp"))
        for name in files:
            os.replace(self.staging / name, self.folder / name)
        record = {"notebook": self.notebook, "profile": self.cfg.profile,
                  "overridden": overridden_fields(self.cfg), **code_version(),
                  "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(
                      timespec="seconds"),
                  "files": files, "config": to_dict(self.cfg)}
        write_json(self.folder / f"{self.notebook}_run.json", record)
        shutil.rmtree(self.staging, ignore_errors=True)
        return self.folder
