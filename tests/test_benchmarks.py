"""Every benchmark runs: each script in benchmarks/ with --smoke (tiny sizes) ends with the
ratio it exists to print, so a change of the library's interfaces cannot leave one broken."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).parents[1] / "benchmarks").glob("*.py"))


def test_there_are_benchmarks_to_run():
    assert len(BENCHMARKS) >= 3


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.stem)
def test_each_benchmark_runs_with_smoke_and_prints_its_ratio(script):
    root = script.parents[1]
    paths = [str(root), os.environ.get("PYTHONPATH")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}
    result = subprocess.run([sys.executable, str(script), "--smoke"], capture_output=True,
                            text=True, timeout=300, cwd=root, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    last = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"(bf16 )?speedup:? .*\d+\.\d\d.*", last), last
    assert "nan" not in result.stdout and "inf " not in result.stdout
