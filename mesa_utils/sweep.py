"""Run a profile's per-trigger units (units.py) as Ray tasks, on this machine or a cluster.

    python -m mesa_utils.sweep --profile paper --workers 4            # local Ray, 4 units at once
    python -m mesa_utils.sweep --profile paper --address auto --gpus-per-unit 0.25
    python -m mesa_utils.sweep --profile quick --workers 2 --kind screen  # 08's screen units
    ./run_all.sh --profile smoke --workers 2                          # the same, from run_all.sh

The driver checks that the cluster answers and can hold a unit's CPUs and GPUs, builds (or
loads) the clean model, which every unit shares, then starts one task per trigger that has no
unit file yet: finished units are skipped, so a rerun resumes. Each
task builds its config from the same profile and overrides, runs the unit (itself resuming from
the artefact store) and returns its record; the driver writes the unit files, so results gather
in one folder wherever the tasks ran. A failing unit is reported with its trigger and traceback
(written beside the unit files as unit_<trigger>.error.txt) while the others go on; the exit
status is non-zero when any failed. On a cluster (`--address`), nodes that do not share this
repository's data/ folder each train the clean model once.
"""
import argparse
import math
import socket
import sys
import traceback

from .config import make_config
from .data import load_cifar
from .train import clean_model, progress, setup
from .units import (KINDS, PIPELINE, add_run_arguments, config_from_arguments, pending_triggers,
                    unit_folder, unit_path, unit_record, write_unit)


def _unit_task(profile: str, overrides: dict, trigger: int, threads: int, kind: str) -> dict:
    """One unit of the kind named `kind` in a Ray worker process: its record
    (units.unit_record)."""
    import torch
    torch.set_num_threads(max(1, threads))
    return unit_record(setup(make_config(profile, **overrides)), trigger, KINDS[kind])


def check_share(cpus_per_unit, gpus_per_unit) -> None:
    """A unit's resource request as Ray takes it: a whole number of CPUs >= 1, a finite GPU
    share >= 0 (a fraction packs several units on one GPU, above 1 spans GPUs in whole ones)."""
    if isinstance(cpus_per_unit, bool) or not isinstance(cpus_per_unit, int) or cpus_per_unit < 1:
        raise ValueError(f"--cpus-per-unit must be an integer >= 1, got {cpus_per_unit!r}")
    if not (isinstance(gpus_per_unit, (int, float)) and math.isfinite(gpus_per_unit)
            and gpus_per_unit >= 0) or (gpus_per_unit > 1 and gpus_per_unit != int(gpus_per_unit)):
        raise ValueError(f"--gpus-per-unit must be a share in [0, 1] or a whole number of GPUs, "
                         f"got {gpus_per_unit!r}")


def check_reachable(address: str, seconds: float = 10.0) -> None:
    """Refuse a cluster address (host:port) that accepts no connection within `seconds`:
    ray.init would retry it for minutes."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--address must be 'auto' or host:port, got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=seconds).close()
    except OSError as error:
        raise ConnectionError(f"no Ray cluster answers at {address} ({error}): start it "
                              "(ray start --head) or correct --address") from None


def check_grantable(resources: dict, cpus_per_unit, gpus_per_unit) -> None:
    """Refuse a unit that the cluster's resources ({"CPU": n, "GPU": m}, as
    ray.cluster_resources gives them) can never hold: its tasks would wait forever."""
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    if cpus_per_unit > cpus:
        raise ValueError(f"--cpus-per-unit {cpus_per_unit} asks more CPUs than the cluster has "
                         f"({cpus:g}): no unit could ever start; lower it or raise --workers")
    if gpus_per_unit > gpus:
        raise ValueError(f"--gpus-per-unit {gpus_per_unit:g} asks more GPUs than the cluster has "
                         f"({gpus:g}): no unit could ever start; run without it on a machine "
                         "without GPUs")


def run_sweep(profile: str, overrides: dict | None = None, workers: int | None = None,
              address: str | None = None, cpus_per_unit: int = 1, gpus_per_unit: float = 0.0,
              outputs: str | None = None, root=None, kind=None) -> dict:
    """Run every pending unit of the profile (with `overrides`; of `kind`, by default the
    pipeline's units of 01-04, units.SCREEN for 08's screen) as Ray tasks. workers: the
    local Ray's CPUs (default all; ignored with `address`, which joins a running cluster,
    "auto" for the local one). gpus_per_unit may be fractional (several units per GPU).
    Returns {"folder", "done", "skipped", "failed": {trigger: error}}."""
    import ray
    overrides = dict(overrides or {})
    kind = kind or PIPELINE
    cfg = make_config(profile, **overrides)
    folder = unit_folder(cfg, outputs, root, kind)
    cifar = load_cifar(cfg.dataset)         # its fingerprint: finished units must share it
    todo = pending_triggers(cfg, folder, kind, cifar.fingerprint)
    skipped = [t for t in kind.triggers(cfg) if t not in todo]
    result = {"folder": folder, "done": [], "skipped": skipped, "failed": {}}
    if not todo:
        return result
    check_share(cpus_per_unit, gpus_per_unit)
    if address and address != "auto":
        check_reachable(address)
    # The driver's bar counts units; the stages' own bars inside workers would interleave.
    quiet = {"env_vars": {"TQDM_DISABLE": "1"}}
    if address:
        ray.init(address=address, runtime_env=quiet, ignore_reinit_error=True)
    else:
        ray.init(num_cpus=workers, include_dashboard=False, runtime_env=quiet,
                 ignore_reinit_error=True)
    try:
        check_grantable(ray.cluster_resources(), cpus_per_unit, gpus_per_unit)
        clean_model(setup(cfg, cifar=cifar))     # shared by every unit: built before they start
        task = ray.remote(num_cpus=cpus_per_unit, num_gpus=gpus_per_unit,
                          max_retries=0)(_unit_task)
        running = {task.remote(profile, overrides, t, cpus_per_unit, kind.name): t for t in todo}
        bar = progress(range(len(running)), f"{kind.name} units ({profile})")
        for _ in bar:
            ready, _ = ray.wait(list(running), num_returns=1)
            trigger = running.pop(ready[0])
            try:
                write_unit(unit_path(folder, trigger), ray.get(ready[0]), cfg, kind)
                # an earlier run's failure of this unit is no longer true
                unit_path(folder, trigger).with_suffix(".error.txt").unlink(missing_ok=True)
                result["done"].append(trigger)
            except Exception as error:      # one unit's failure must not stop the others
                log = unit_path(folder, trigger).with_suffix(".error.txt")
                log.parent.mkdir(parents=True, exist_ok=True)
                log.write_text("".join(traceback.format_exception(error)))  # remote traceback
                cause = getattr(error, "cause", None) or error    # RayTaskError wraps it
                result["failed"][trigger] = f"{type(cause).__name__}: {cause}".splitlines()[0]
                print(f"unit {trigger} failed: {result['failed'][trigger]} (traceback: {log})",
                      file=sys.stderr)
    finally:
        ray.shutdown()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mesa_utils.sweep",
                                     description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    parser.add_argument("--workers", type=int, default=None,
                        help="CPUs of the local Ray (default: all); units run one per CPU")
    parser.add_argument("--address", default=None, help="join a running Ray cluster "
                        "('auto' or host:port) instead of starting a local one")
    parser.add_argument("--cpus-per-unit", type=int, default=1)
    parser.add_argument("--gpus-per-unit", type=float, default=0.0,
                        help="GPU share of a unit, e.g. 0.25 packs four units per GPU")
    args = parser.parse_args(argv)
    profile, overrides, _ = config_from_arguments(parser, args)
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers must be 1 or more, got {args.workers}")
    try:
        check_share(args.cpus_per_unit, args.gpus_per_unit)
    except ValueError as error:
        parser.error(str(error))
    result = run_sweep(profile, overrides, args.workers, args.address, args.cpus_per_unit,
                       args.gpus_per_unit, args.outputs, kind=KINDS[args.kind])
    print(f"units in {result['folder']}: {len(result['done'])} run, "
          f"{len(result['skipped'])} already there, {len(result['failed'])} failed"
          + "".join(f"\n  trigger {t}: {e}" for t, e in result["failed"].items()))
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
