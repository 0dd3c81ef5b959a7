#!/usr/bin/env bash
# MESA reproduction: set up the environment if needed, then run the numbered notebooks with
# papermill for one profile (default: quick), the test suite, or the per-trigger units as Ray tasks.
#
#   ./run_all.sh                          notebooks 01-05 (the paper's pipeline), quick profile
#   ./run_all.sh --profile smoke|quick|paper [papermill options, e.g. -p seed 1 -y 'triggers: [170]']
#   ./run_all.sh --only 03,04             only these notebooks, run in numeric order; 06-09 run
#                                         only so (06 SampDetox, ~30 min in quick; 07 the claim
#                                         under other protocols, ~2 h; 08 the hard-trigger screen;
#                                         09 triggers of unknown size)
#   ./run_all.sh --test                   unit tests + every notebook under nbval (smoke profile)
#   ./run_all.sh --profile paper --workers N [--address A] [sweep options, e.g. --gpus-per-unit 0.25]
#                                         the per-trigger units of 01-04 as Ray tasks, then the
#                                         notebooks 01-05, which read them (mesa_utils/sweep.py):
#                                         N local workers, or a running cluster at A ('auto');
#                                         results in figures/<profile>/units/, finished units skipped
#   ./run_all.sh --prepare-device         copy what a GPU machine without internet needs (the CIFAR-10
#                                         archive) into .device/ and print the one command to run
#                                         there (the retraining benchmark, then the units)
#   ./run_all.sh --refresh-notebooks [--only 07]
#                                         notebooks 01-05 (or those named), quick profile, then
#                                         their outputs into the committed notebooks, stamped with
#                                         the commit (which must hold all code: no uncommitted
#                                         changes, no other options)
#
# Executed notebooks are kept in data/runs/<profile>/; figures and CSV tables go to
# figures/<profile>/ (with overrides: figures/<profile>-<config hash>/), each notebook's with its
# NN_run.json (the config that made them). The first error stops the run (non-zero exit). A run
# that succeeds writes its record (times, commit, machine) to data/runs/<profile>/run_all.json,
# the whole default pipeline also to figures/<profile>/run_all.json: the next run's estimates.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
VENV=${MESA_VENV:-$ROOT/.venv}
PROFILE=quick
PROFILE_GIVEN=0
MODE=run
REFRESH=0
ONLY=
ONLY_GIVEN=0
SWEEP=0
PREPARE=0
WORKERS=
ADDRESS=
PASSTHROUGH=()
while (($#)); do
    case "$1" in
        --profile) [[ $# -ge 2 ]] || { echo "error: --profile needs a value (smoke, quick or paper)" >&2; exit 2; }
                   PROFILE=$2; PROFILE_GIVEN=1; shift 2 ;;
        --profile=*) PROFILE=${1#--profile=}; PROFILE_GIVEN=1; shift ;;
        --test) MODE=test; shift ;;
        --refresh-notebooks) REFRESH=1; shift ;;
        --only) [[ $# -ge 2 ]] || { echo "error: --only needs notebook numbers separated by commas, e.g. --only 03,04" >&2; exit 2; }
                ONLY=$2; ONLY_GIVEN=1; shift 2 ;;
        --only=*) ONLY=${1#--only=}; ONLY_GIVEN=1; shift ;;
        --workers) [[ $# -ge 2 ]] || { echo "error: --workers needs a number of workers, e.g. --workers 2" >&2; exit 2; }
                   WORKERS=$2; SWEEP=1; shift 2 ;;
        --workers=*) WORKERS=${1#--workers=}; SWEEP=1; shift ;;
        --address) [[ $# -ge 2 && $2 != -* ]] || { echo "error: --address needs a Ray cluster address, e.g. --address auto" >&2; exit 2; }
                   ADDRESS=$2; SWEEP=1; shift 2 ;;
        --address=*) ADDRESS=${1#--address=}; SWEEP=1; shift ;;
        --prepare-device) PREPARE=1; shift ;;
        -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
        *) PASSTHROUGH+=("$1"); shift ;;
    esac
done
case "$PROFILE" in
    smoke|quick|paper) ;;
    *) echo "error: unknown profile '$PROFILE'; choose smoke, quick or paper" >&2; exit 2 ;;
esac
# --test would silently ignore these: it tests every notebook, in the smoke profile.
if [[ $MODE == test && $ONLY_GIVEN == 1 ]]; then
    echo "error: --only does not apply to --test, which tests every notebook" >&2; exit 2
fi
if [[ $MODE == test && $PROFILE_GIVEN == 1 && $PROFILE != smoke ]]; then
    echo "error: --test always uses the smoke profile; leave out --profile $PROFILE" >&2; exit 2
fi

# --prepare-device: the units run on a GPU machine with its own torch (and pandas, tqdm, ...)
# but no internet and no ../shared: the data archive travels in .device/ (git-ignored).
if [[ $PREPARE == 1 ]]; then
    (( ${#PASSTHROUGH[@]} == 0 && ONLY_GIVEN == 0 && SWEEP == 0 && REFRESH == 0 )) && [[ $MODE == run ]] || {
        echo "error: --prepare-device takes no other options except --profile" >&2; exit 2; }
    archive=${MESA_CIFAR10_ARCHIVE:-}
    if [[ -z $archive ]]; then
        for candidate in data/cifar10-jpg.tar.gz ../shared/data/cifar10-jpg.tar.gz; do
            [[ -f $candidate ]] && { archive=$candidate; break; }
        done
    fi
    [[ -z ${MESA_CIFAR10_ARCHIVE:-} || -f $archive ]] || {
        echo "error: no CIFAR-10 archive to carry: \$MESA_CIFAR10_ARCHIVE names $archive, which does not exist; correct or unset it" >&2; exit 1; }
    [[ -n $archive ]] || {
        echo "error: no CIFAR-10 archive to carry: set MESA_CIFAR10_ARCHIVE or put cifar10-jpg.tar.gz in data/ or ../shared/data/" >&2; exit 1; }
    # A checksum beside the archive is checked here, not first on the device: its time is scarce.
    if [[ -f $archive.sha256 ]]; then
        expected=$(awk 'NR == 1 {print $1}' "$archive.sha256")
        [[ $expected =~ ^[0-9a-fA-F]{64}$ ]] || {
            echo "error: the checksum file $archive.sha256 holds no SHA-256 (64 hex digits first); write the archive's (sha256sum) or delete the file" >&2; exit 1; }
        [[ ${expected,,} == "$(sha256sum "$archive" | cut -d' ' -f1)" ]] || {
            echo "error: $archive does not match its checksum $archive.sha256 (corrupt or truncated copy); replace it with a good copy" >&2; exit 1; }
    fi
    mkdir -p .device
    install -m 0644 "$archive" .device/cifar10-jpg.tar.gz
    [[ ! -f $archive.sha256 ]] || install -m 0644 "$archive.sha256" .device/cifar10-jpg.tar.gz.sha256
    echo "prepared .device/ ($(du -sh .device | cut -f1)): carry it to the GPU machine with the working tree and run there, from the repository root:"
    # mesa_utils/timeboxed.py: imports checked first, every finished unit in $OUT/units.tgz as
    # it finishes, no unit started past the budget (540 s of the device's 600 per command).
    echo "  MESA_CIFAR10_ARCHIVE=.device/cifar10-jpg.tar.gz PYTHONPATH=. PYTHONUNBUFFERED=1 python3 -m mesa_utils.timeboxed --profile $PROFILE --out \"\$OUT\" --budget 540 --workers 2"
    echo "then, here: tar xzf <files_at>/units.tgz (the units go to figures/$PROFILE/units/; summary.json beside it says what finished)"
    exit 0
fi

# The sweep runs the pipeline's units as Ray tasks, then the notebooks read them: its options are
# the units' resources only, since notebooks of another config would not read its units.
if [[ $SWEEP == 1 ]]; then
    [[ $MODE != test && $REFRESH == 0 && $ONLY_GIVEN == 0 ]] || {
        echo "error: --workers/--address run the per-trigger units as Ray tasks; they cannot be combined with --test, --refresh-notebooks or --only" >&2; exit 2; }
    [[ -z $WORKERS || $WORKERS =~ ^[1-9][0-9]*$ ]] || {
        echo "error: --workers needs a number of workers of 1 or more, got '$WORKERS'" >&2; exit 2; }
    for ((i = 0; i < ${#PASSTHROUGH[@]}; i += 2)); do
        [[ ${PASSTHROUGH[i]} == --cpus-per-unit || ${PASSTHROUGH[i]} == --gpus-per-unit ]] &&
            (( i + 1 < ${#PASSTHROUGH[@]} )) || {
            echo "error: with --workers/--address, run_all.sh takes only --cpus-per-unit N and --gpus-per-unit S (got: ${PASSTHROUGH[*]}); for other kinds or overrides run python -m mesa_utils.sweep" >&2; exit 2; }
    done
fi

# --refresh-notebooks commits the outputs as those of the quick profile of the code at HEAD:
# whatever would make them the outputs of another config, or of uncommitted code, is refused here.
CODE_PATHS=(mesa_utils notebooks requirements.txt run_all.sh)
if [[ $REFRESH == 1 ]]; then
    refuse() { echo "error: --refresh-notebooks $1" >&2; exit 2; }
    [[ $MODE != test ]] || refuse "cannot be combined with --test"
    [[ $PROFILE == quick ]] || refuse "always uses the quick profile; leave out --profile $PROFILE"
    (( ${#PASSTHROUGH[@]} == 0 )) || refuse "takes no papermill options (got: ${PASSTHROUGH[*]}): the committed outputs must be those of the quick profile as committed"
    command -v git >/dev/null || refuse "needs git: the stamp names the commit whose code made the outputs"
    git rev-parse --is-inside-work-tree >/dev/null 2>&1 || refuse "needs a git checkout: the stamp names the commit whose code made the outputs"
    COMMIT=$(git rev-parse --verify --quiet HEAD) || refuse "needs a commit to stamp the outputs with; commit the code first"
    changed=$(git status --porcelain -- "${CODE_PATHS[@]}")
    [[ -z $changed ]] || refuse "$(printf 'needs a clean tree; commit your changes first: the stamp names the commit whose code made the outputs. Uncommitted:\n%s' "$changed")"
fi

# --- the notebooks to run (checked before the set-up, which can take minutes) -------------------
shopt -s nullglob
NOTEBOOKS=(notebooks/[0-9][0-9]_*.ipynb)
# Notebooks from STUDIES_FROM on go beyond the paper's figures and take long (06 SampDetox ~30 min
# in quick, 07 hours): they run when --only names them, never by default (--test runs every one).
STUDIES_FROM=06
if [[ $MODE == run ]]; then
    (( ${#NOTEBOOKS[@]} )) || { echo "error: no notebooks found in notebooks/" >&2; exit 1; }
    NUMBERS=$(basename -a "${NOTEBOOKS[@]}" | cut -c1-2 | paste -sd ' ')
    if [[ $ONLY_GIVEN == 0 ]]; then
        PIPELINE=()
        for nb in "${NOTEBOOKS[@]}"; do
            [[ $(basename "$nb" | cut -c1-2) < $STUDIES_FROM ]] && PIPELINE+=("$nb")
        done
        NOTEBOOKS=("${PIPELINE[@]}")
    fi
fi
if [[ $MODE == run && $ONLY_GIVEN == 1 ]]; then
    only=${ONLY//[[:space:]]/}              # "03, 04" means 03,04
    [[ $only =~ ^[^,]+(,[^,]+)*$ ]] || {
        echo "error: --only needs notebook numbers separated by commas, e.g. --only 03,04 (got '$ONLY')" >&2; exit 2; }
    IFS=, read -r -a ITEMS <<< "$only"
    seen=,
    for number in "${ITEMS[@]}"; do
        [[ $number =~ ^[0-9]{2}$ && " $NUMBERS " == *" $number "* ]] || {
            echo "error: --only $ONLY: no notebook numbered '$number'; choose from: $NUMBERS" >&2; exit 2; }
        # A repeated number is an error rather than dropped: it is most likely a typo for another
        # notebook (03,03 for 03,04), which deduplicating would silently leave out.
        [[ $seen != *,$number,* ]] || {
            echo "error: --only $ONLY: notebook $number is listed twice" >&2; exit 2; }
        seen+=$number,
    done
    CHOSEN=()
    for nb in "${NOTEBOOKS[@]}"; do
        if [[ $seen == *,$(basename "$nb" | cut -c1-2),* ]]; then CHOSEN+=("$nb"); fi
    done
    NOTEBOOKS=("${CHOSEN[@]}")
fi

# Two runs in one checkout would share the staging folders and partial notebooks (and the set-up
# of .venv): one at a time. The lock goes with this process, however it ends.
if [[ $MODE == run ]] && command -v flock >/dev/null; then
    mkdir -p data
    exec 9>data/.run_all.lock
    flock -n 9 || {
        echo "error: another ./run_all.sh is running in this checkout (it holds data/.run_all.lock); wait for it to end, or run from another clone" >&2; exit 2; }
fi

# --- environment: a virtual environment from requirements.txt, reused while it matches -------
PYTHON=${PYTHON:-python3}
# 3.11 at least: diffusers (SampDetox, notebook 06) needs it; 3.12 at most: every pin has wheels.
command -v "$PYTHON" >/dev/null || { echo "error: $PYTHON not found; install Python 3.11 or 3.12" >&2; exit 1; }
"$PYTHON" -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 12))' || {
    echo "error: $("$PYTHON" --version 2>&1) found; Python 3.11 or 3.12 is needed (diffusers needs 3.11; set PYTHON=...)" >&2; exit 1; }
STAMP=$VENV/.requirements.sha256
WANT=$(sha256sum requirements.txt | cut -d' ' -f1)
if [[ ! -x $VENV/bin/python || ! -f $STAMP || $(cat "$STAMP") != "$WANT" ]]; then
    echo "setting up $VENV from requirements.txt (first run: a few minutes)"
    "$PYTHON" -m venv "$VENV" || { echo "error: could not create a virtual environment (install the venv module, e.g. python3-venv)" >&2; exit 1; }
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -r requirements.txt || {
        echo "error: pip could not install requirements.txt (no access to a package index?)" >&2; exit 1; }
    # Make mesa_utils importable from any kernel of this environment (papermill, nbval, Jupyter).
    "$VENV/bin/python" -c 'import site, sys; open(site.getsitepackages()[0] + "/mesa_repo.pth", "w").write(sys.argv[1] + "\n")' "$ROOT"
    echo "$WANT" > "$STAMP"
fi
export PATH=$VENV/bin:$PATH
# This checkout's mesa_utils, also when the environment was made by another checkout (a copied
# or moved clone, or MESA_VENV): its mesa_repo.pth names that one, and PYTHONPATH comes first.
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}

if [[ $MODE == test ]]; then
    export MESA_PROFILE=smoke
    # No progress bars under test: nbval waits at most 5 s (fixed) for a cell's messages after
    # it returns, and a bar's widget updates are many (one such timeout in 08, 2026-12-06).
    export TQDM_DISABLE=1
    exec python -m pytest tests notebooks --nbval-lax -p no:cacheprovider "${PASSTHROUGH[@]}"
fi
if [[ $SWEEP == 1 ]]; then
    python -m mesa_utils.sweep --profile "$PROFILE" ${WORKERS:+--workers "$WORKERS"} \
        ${ADDRESS:+--address "$ADDRESS"} "${PASSTHROUGH[@]}" || {
        echo "error: the sweep left units unfinished (above); the notebooks were not run" >&2; exit 1; }
    PASSTHROUGH=()      # the sweep's: the notebooks read its units under the profile's config
fi

# --- run the numbered notebooks in order --------------------------------------------------------
# A parameter no notebook has (-p sed 1) would only be warned about and the defaults published.
python -m mesa_utils.notebook_parameters "${NOTEBOOKS[@]}" -- "${PASSTHROUGH[@]}" || exit 2
OUTDIR=data/runs/$PROFILE
mkdir -p "$OUTDIR"
# Read before the first notebook: whether the store was empty says what the run's times mean.
BEGUN=$(python -m mesa_utils.run_record begin)
TIMES=()
# The library's progress bars go to this terminal, not into the notebooks (train.progress), and
# papermill prints each cell's outputs here as they come: the terminal shows what runs.
export MESA_TERMINAL_PROGRESS=1
for nb in "${NOTEBOOKS[@]}"; do
    name=$(basename "$nb")
    # papermill writes to a partial file, moved onto $OUTDIR/$name only on success: a failed run
    # never overwrites the last complete executed notebook. One left by an earlier run goes first.
    partial=$OUTDIR/${name%.ipynb}.partial.ipynb
    rm -f "$partial"
    python -m mesa_utils.run_record announce "$PROFILE" "$nb"
    t0=$(date +%s)
    if ! papermill "$nb" "$partial" --cwd notebooks -p profile "$PROFILE" \
            --log-output --no-progress-bar "${PASSTHROUGH[@]}"; then
        if [[ -f $partial ]]; then
            echo "error: $name failed; the executed notebook with the error is $partial" >&2
        else
            echo "error: papermill failed before executing $name (see its message above); no executed notebook was written" >&2
        fi
        exit 1
    fi
    mv -f "$partial" "$OUTDIR/$name"
    seconds=$(( $(date +%s) - t0 ))
    echo "=== $name done in $(python -m mesa_utils.run_record duration "$seconds") ==="
    TIMES+=(--notebook "$name" "$seconds")
done
# The run's record, before the refresh: a refresh run's, in figures/quick/, is committed with the
# outputs it made.
RECORD=(--begun "$BEGUN" --profile "$PROFILE" "${TIMES[@]}")
[[ $ONLY_GIVEN == 0 ]] || RECORD+=(--only)
[[ $REFRESH == 0 ]] || RECORD+=(--refresh)
python -m mesa_utils.run_record finish "${RECORD[@]}" -- "${PASSTHROUGH[@]}"
[[ $REFRESH == 1 ]] || exit 0

# --- --refresh-notebooks: the executed outputs into the committed notebooks -------------------
# The run takes long: the stamp is true only if HEAD and the code are still those that ran.
if [[ $(git rev-parse HEAD) != "$COMMIT" || -n $(git status --porcelain -- "${CODE_PATHS[@]}") ]]; then
    echo "error: HEAD or the code changed during the run (it started at $COMMIT); the committed notebooks are left as they were. Run --refresh-notebooks again on a clean tree" >&2
    exit 1
fi
python -m mesa_utils.committed refresh --executed-dir "$OUTDIR" --commit "$COMMIT" --profile quick "${NOTEBOOKS[@]}"
echo "committed notebooks refreshed from $OUTDIR (stamp: profile quick, commit $COMMIT); review and commit them with figures/quick/"
