"""run_all.sh refuses bad arguments with a clear message (before running anything)."""
import subprocess
from pathlib import Path

import pytest

RUN_ALL = Path(__file__).resolve().parents[1] / "run_all.sh"
# Appended to the cases below that a faulty script could accept: papermill and pytest both stop
# at once on an unknown option, so a regression fails the test instead of running notebooks.
STOP = "--no-such-option"


@pytest.mark.parametrize("args, message", [
    (["--profile", "huge"], "unknown profile 'huge'; choose smoke, quick or paper"),
    (["--only", "09"], "no notebook numbered '09'; choose from: 01 02 03 04 05"),
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
    (["--only=09"], "no notebook numbered '09'; choose from: 01 02 03 04 05"),
    (["--only", "*"], "no notebook numbered '*'"),
])
def test_run_all_only_rejects_repeats_and_unknown_numbers(args, message):
    result = subprocess.run(["bash", str(RUN_ALL), *args, STOP], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 2 and message in result.stderr
