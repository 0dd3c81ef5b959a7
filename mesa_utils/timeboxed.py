"""A time-boxed run of the per-trigger units, for a machine lent for minutes (a GPU with its own
torch, no papermill, no Ray, no internet): the command `./run_all.sh --prepare-device` prints.

    python -m mesa_utils.timeboxed --profile paper --out "$OUT" [--budget 540] [--workers 2]

In order: it checks the modules the units import and names any that is missing, before any
work; runs the retraining benchmark into OUT/benchmark.txt; trains the clean model once (the
unit processes then read it from the store); starts `--workers` unit processes, each on its
own share of the pending triggers and each told the deadline, so that none starts a unit it
cannot finish; refreshes OUT/units.tgz after every finished unit (written aside, then renamed),
so that a timeout or a failing unit still brings back every finished one; at the end of the
budget it stops what still runs (an unfinished unit leaves no file: unit files are written
atomically) and writes OUT/summary.json. Units already in figures/<outputs>/<kind>/ (the
committed ones) are not run again. OUT receives at most 4 + workers files (8 at 4 workers).
"""
import argparse
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

# What the units import beyond the standard library (module: the package that provides it).
NEEDED = {"torch": "torch", "numpy": "numpy", "pandas": "pandas", "tqdm": "tqdm",
          "PIL": "pillow", "scipy": "scipy"}
MAX_WORKERS = 4             # 4 + workers files come back; the device returns at most 8
POLL_SECONDS = 2.0
STOP_SECONDS = 15.0         # kept for stopping the workers and writing the last archive


def missing_modules(needed=None) -> list:
    """The packages (pip names) of `needed` ({module: package}, default NEEDED) that cannot be
    imported here."""
    return [package for module, package in (needed or NEEDED).items()
            if importlib.util.find_spec(module) is None]


def archive_units(folder: Path, archive: Path, root: Path) -> list:
    """Write every unit file in `folder` and its subfolders (the pipeline's kinds) into the
    gzipped tar `archive`, named relative to `root` (untar at the repository root to restore
    them), atomically: a reader sees the old archive or the new one, never half of one.
    Returns the archived files' paths relative to `folder`."""
    paths = sorted(Path(folder).rglob("unit_*.json"))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in paths:
            tar.add(path, arcname=str(path.relative_to(root)))
    aside = archive.with_name(f".{archive.name}.partial")
    aside.write_bytes(buffer.getvalue())
    os.replace(aside, archive)
    return [str(p.relative_to(folder)) for p in paths]


def _stop(workers: list, log) -> None:
    """SIGTERM every running worker, then SIGKILL what is left after a few seconds."""
    for worker in workers:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
    waited = time.time() + 5
    for worker in workers:
        try:
            worker.wait(max(0.1, waited - time.time()))
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    log("stopped the workers still running at the end of the budget")


def main(argv=None) -> int:
    missing = missing_modules()
    if missing:
        print(f"error: the units need {', '.join(missing)}, which this Python "
              f"({sys.executable}) cannot import: install them (pip install "
              f"{' '.join(missing)}) or use an environment that has them", file=sys.stderr)
        return 2
    from .units import (PIPELINE, add_run_arguments, config_from_arguments, kinds_named,
                        pending_in_any, unit_folder)
    from .store import REPO_ROOT

    parser = argparse.ArgumentParser(prog="python -m mesa_utils.timeboxed",
                                     description=__doc__.split("\n")[0])
    add_run_arguments(parser)
    parser.add_argument("--out", default=os.environ.get("OUT"),
                        help="folder that comes back from the machine (default: $OUT)")
    parser.add_argument("--budget", type=float, default=540.0,
                        help="seconds from now to the end of everything, archive included")
    parser.add_argument("--workers", type=int, default=2,
                        help=f"unit processes sharing the device, 1 to {MAX_WORKERS}")
    parser.add_argument("--unit-seconds", type=float, default=0.0,
                        help="expected seconds of one unit, before the first has finished")
    parser.add_argument("--no-benchmark", action="store_true",
                        help="skip the retraining benchmark")
    args = parser.parse_args(argv)
    started = time.time()
    _, overrides, cfg = config_from_arguments(parser, args)
    if not args.out:
        parser.error("--out is needed (or $OUT): the folder whose files come back")
    out = Path(args.out)
    if not out.is_dir() or not os.access(out, os.W_OK):
        parser.error(f"--out {out} must be an existing folder this user can write")
    if not 1 <= args.workers <= MAX_WORKERS:
        parser.error(f"--workers must be 1 to {MAX_WORKERS} (each writes a log into --out, "
                     f"and at most 8 files come back), got {args.workers}")
    if not 60 <= args.budget <= 3600:
        parser.error(f"--budget must be 60 to 3600 seconds, got {args.budget:g}")
    if args.unit_seconds < 0:
        parser.error(f"--unit-seconds must be >= 0, got {args.unit_seconds:g}")
    kinds = kinds_named(cfg, args.kind)
    deadline = started + args.budget - STOP_SECONDS
    folder = unit_folder(cfg, args.outputs, kind=kinds[0])
    if args.kind == PIPELINE:       # the folder that holds the pipeline kinds' folders
        folder = folder.parent
    log_file = open(out / "run.log", "a", buffering=1)

    def log(message):
        line = f"[{time.time() - started:6.0f} s] {message}"
        print(line, flush=True)
        log_file.write(line + "\n")

    # other configs' files refuse here
    pending = pending_in_any(cfg, args.outputs, None, kinds)
    already = len(kinds[0].triggers(cfg)) - len(pending)
    log(f"{cfg.profile} {args.kind} units in {folder.relative_to(REPO_ROOT)}: {len(pending)} "
        f"pending, {already} already there; budget {args.budget:.0f} s, {args.workers} workers")
    summary = {"profile": cfg.profile, "kind": args.kind, "overrides": overrides,
               "budget_s": args.budget, "workers": args.workers, "already_there": already}

    if not args.no_benchmark and pending:
        command = [sys.executable, str(REPO_ROOT / "benchmarks" / "retrain_bank.py"),
                   *(["--smoke"] if cfg.profile == "smoke" else ["--profile", cfg.profile])]
        try:
            result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT,
                                    timeout=max(1.0, min(120.0, (deadline - time.time()) / 4)),
                                    env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
            (out / "benchmark.txt").write_text(result.stdout + result.stderr)
            log(f"benchmark: {(result.stdout.strip().splitlines() or ['no output'])[-1]}")
        except subprocess.TimeoutExpired:
            log("benchmark: stopped, over its share of the budget")

    import torch
    from .train import clean_model, setup
    if pending:
        ctx = setup(cfg)
        summary["device"] = (torch.cuda.get_device_name(ctx.device)
                             if ctx.device.type == "cuda" else str(ctx.device))
        clean_started = time.time()
        clean_model(ctx)
        summary["clean_model_s"] = round(time.time() - clean_started, 1)
        log(f"clean model on {summary['device']}: {summary['clean_model_s']:.0f} s")

    shares = [pending[i::args.workers] for i in range(args.workers)]
    workers = []
    for i, share in enumerate(s for s in shares if s):
        command = [sys.executable, "-m", "mesa_utils.units", "--profile", cfg.profile,
                   "--overrides", json.dumps(overrides), "--kind", args.kind,
                   "--only", ",".join(map(str, share)), "--deadline", str(deadline),
                   "--unit-seconds", str(args.unit_seconds),
                   *(["--outputs", args.outputs] if args.outputs else [])]
        worker_log = open(out / f"worker_{i}.log", "a")
        workers.append(subprocess.Popen(command, cwd=REPO_ROOT, stdout=worker_log,
                                        stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONPATH": str(REPO_ROOT),
                                             "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}))
        log(f"worker {i}: triggers {', '.join(map(str, share))}")

    archived = archive_units(folder, out / "units.tgz", REPO_ROOT) if folder.exists() else []
    stopped = False
    while any(w.poll() is None for w in workers):
        if time.time() > deadline + STOP_SECONDS / 2:
            _stop(workers, log)
            stopped = True
            break
        time.sleep(POLL_SECONDS)
        finished = sorted(str(p.relative_to(folder)) for p in folder.rglob("unit_*.json"))
        if finished != archived:
            archived = archive_units(folder, out / "units.tgz", REPO_ROOT)
            done = len(pending) - len(pending_in_any(cfg, args.outputs, None, kinds))
            log(f"{done} of {len(pending)} triggers finished; units.tgz holds "
                f"{len(archived)} unit files")
    if folder.exists():
        archived = archive_units(folder, out / "units.tgz", REPO_ROOT)
    left = pending_in_any(cfg, args.outputs, None, kinds)
    stopped_codes = {-signal.SIGTERM, -signal.SIGKILL} if stopped else set()
    failed = [i for i, w in enumerate(workers) if w.returncode not in {0, None, *stopped_codes}]
    summary.update(seconds=round(time.time() - started, 1),
                   finished_here=sorted(set(pending) - set(left)), left=left,
                   worker_exit_codes=[w.returncode for w in workers], stopped_at_budget=stopped)
    aside = out / ".summary.json.partial"
    aside.write_text(json.dumps(summary, indent=1))
    os.replace(aside, out / "summary.json")
    log(f"done in {summary['seconds']:.0f} s: {len(summary['finished_here'])} units finished "
        f"here, {len(left)} left" + (f"; worker(s) {failed} failed: see their logs"
                                     if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
