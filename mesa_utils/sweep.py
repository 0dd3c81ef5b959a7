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
from .store import shown
from .units import (KINDS, PIPELINE, add_run_arguments, config_from_arguments, kinds_named,
                    pending_in_any, pending_triggers, unit_folder, unit_path, unit_record,
                    write_unit)


def _unit_task(profile: str, overrides: dict, trigger: int, threads: int, kinds: list) -> list:
    """One trigger's units of the kinds named `kinds`, in order, in a Ray worker process:
    their records (units.unit_record)."""
    import torch
    torch.set_num_threads(max(1, threads))
    ctx = setup(make_config(profile, **overrides))
    return [unit_record(ctx, trigger, KINDS[kind]) for kind in kinds]


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
              outputs: str | None = None, root=None, kind: str = PIPELINE) -> dict:
    """Run every pending unit of the profile (with `overrides`) of the kind named `kind`
    (units.PIPELINE, the default: every kind of notebooks 01-04, trigger by trigger; "screen"
    for 08's screen; units.KINDS) as Ray tasks, one per trigger. workers: the local Ray's CPUs
    (default all; ignored with `address`, which joins a running cluster, "auto" for the local
    one). gpus_per_unit may be fractional (several units per GPU). Returns {"folder" (the
    kind's, or the pipeline's that holds its kinds'), "done", "skipped", "failed": {trigger:
    error}} by trigger."""
    import ray
    overrides = dict(overrides or {})
    cfg = make_config(profile, **overrides)
    kinds = kinds_named(cfg, kind)
    folders = {k.name: unit_folder(cfg, outputs, root, kind=k) for k in kinds}
    folder = folders[kinds[0].name].parent if kind == PIPELINE else folders[kind]
    cifar = load_cifar(cfg.dataset)         # its fingerprint: finished units must share it
    pending = {k.name: pending_triggers(cfg, folders[k.name], k, cifar.fingerprint)
               for k in kinds}
    todo = pending_in_any(cfg, outputs, root, kinds, cifar.fingerprint)
    skipped = [t for t in kinds[0].triggers(cfg) if t not in todo]
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
        running = {task.remote(profile, overrides, t, cpus_per_unit,
                               [k.name for k in kinds if t in pending[k.name]]): t
                   for t in todo}
        bar = progress(range(len(running)), f"{kind} units ({profile})")
        for _ in bar:
            ready, _ = ray.wait(list(running), num_returns=1)
            trigger = running.pop(ready[0])
            log = unit_path(folder, trigger).with_suffix(".error.txt")
            try:
                for record in ray.get(ready[0]):
                    unit_kind = KINDS[record["kind"]]
                    write_unit(unit_path(folders[unit_kind.name], trigger), record, cfg,
                               unit_kind)
                log.unlink(missing_ok=True)     # an earlier run's failure is no longer true
                result["done"].append(trigger)
            except Exception as error:      # one unit's failure must not stop the others
                log.parent.mkdir(parents=True, exist_ok=True)
                log.write_text("".join(traceback.format_exception(error)))  # remote traceback
                cause = getattr(error, "cause", None) or error    # RayTaskError wraps it
                result["failed"][trigger] = f"{type(cause).__name__}: {cause}".splitlines()[0]
                print(f"unit {trigger} failed: {result['failed'][trigger]} (traceback: "
                      f"{shown(log)})", file=sys.stderr)
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
                       args.gpus_per_unit, args.outputs, kind=args.kind)
    print(f"{args.kind} units in {shown(result['folder'])}: {len(result['done'])} run, "
          f"{len(result['skipped'])} already there, {len(result['failed'])} failed"
          + "".join(f"\n  trigger {t}: {e}" for t, e in result["failed"].items()))
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
