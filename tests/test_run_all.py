"""run_all.sh refuses bad arguments with a clear message (before running anything)."""
import subprocess
from pathlib import Path

import pytest

RUN_ALL = Path(__file__).resolve().parents[1] / "run_all.sh"


@pytest.mark.parametrize("args, message", [
    (["--profile", "huge"], "unknown profile 'huge'; choose smoke, quick or paper"),
    (["--only", "09"], "no notebook numbered '09'; choose from: 01 02 03 04 05"),
    (["--only"], "--only needs notebook numbers"),
])
def test_run_all_rejects_bad_arguments(args, message):
    result = subprocess.run(["bash", str(RUN_ALL), *args], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 2 and message in result.stderr
