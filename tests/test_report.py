"""The generated report and README headline: committed text equals what the tables generate,
the markers and missing tables give clear errors, and the text follows the tables."""

import json
import shutil

import pandas as pd
import pytest

from mesa_utils import report
from mesa_utils.analysis import interval_finding
from mesa_utils.store import REPO_ROOT


def test_the_committed_report_and_readme_headline_are_what_the_tables_generate():
    for path, text in report.generated().items():
        assert path.read_text(encoding="utf-8") == text, (
            f"{path.relative_to(REPO_ROOT)} differs from what figures/quick's tables generate: "
            "run python -m mesa_utils.report and commit the result")


def test_the_headline_replaces_only_what_lies_between_its_markers():
    readme = f"intro\n{report.HEADLINE_BEGIN}\nold table\n{report.HEADLINE_END}\nrest\n"
    assert report.readme_with(readme, "new") == (
        f"intro\n{report.HEADLINE_BEGIN}\nnew\n{report.HEADLINE_END}\nrest\n")
    for broken in ("no markers", readme + report.HEADLINE_END):
        with pytest.raises(ValueError, match="headline markers"):
            report.readme_with(broken, "new")
    begin, end = report.markers("notebooks")
    both = f"{readme}{begin}\nold map\n{end}\n"
    assert report.readme_with(both, "map", "notebooks") == f"{readme}{begin}\nmap\n{end}\n"


def test_the_default_runs_sentence_and_map_come_from_its_record(tmp_path):
    run = {"profile": "quick", "commit": "0123456789abcdef", "uncommitted_changes": False,
           "started": "2026-12-04T21:00:00+00:00", "seconds": 3000, "refresh": True,
           "notebooks": [{"notebook": f"0{n}_x.ipynb", "seconds": 60 * n} for n in range(1, 6)],
           "store_empty_at_start": True, "cpu": "Some CPU", "cores": 2, "torch": "2.13.0"}
    (tmp_path / "run_all.json").write_text(json.dumps(run))
    assert report.default_run(tmp_path) == (
        "`./run_all.sh --refresh-notebooks` ran notebooks 01-05 of the `quick` profile in "
        "50 min 0 s from an empty store on Some CPU (2 cores, no GPU, torch 2.13.0), "
        "2026-12-04, commit 0123456.")
    rows = report.notebook_map(tmp_path).splitlines()
    assert len(rows) == 2 + len(report.NOTEBOOKS)
    assert rows[2].startswith("| [01 attack](notebooks/01_attack.ipynb) | Sec. 5")
    assert rows[5].endswith("| 4 min 0 s (default run) |")
    assert "named run" in rows[7]                    # 06: not in the default run
    (tmp_path / "run_all.json").unlink()
    with pytest.raises(FileNotFoundError, match="written by a whole default run"):
        report.default_run(tmp_path)


def test_a_missing_table_names_the_notebook_that_makes_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"run notebook 04 .*--only 04"):
        report.table(tmp_path, "04_defense_summary")


def test_the_verdict_follows_the_tables(tmp_path):
    """A copy of figures/quick whose 04 summary puts MESA's mixture above the baseline: the
    headline says so (a sentence written by hand would not change)."""
    folder = tmp_path / "quick"
    shutil.copytree(REPO_ROOT / "figures" / "quick", folder)
    summary = pd.read_csv(folder / "04_defense_summary.csv").set_index("method")
    summary.loc["mesa_mixture", ["mean_asr_%", "mean_asr_low_%", "mean_asr_high_%"]] = [40, 38, 42]
    summary.reset_index().to_csv(folder / "04_defense_summary.csv", index=False)
    text = report.headline(folder)
    assert "MESA's mixture leaves 40.0% [38.0, 42.0]" in text
    assert "the baseline's interval lies below MESA's" in text


@pytest.mark.parametrize("mesa, baseline, expected", [
    ((1, 2), (3, 4), "MESA lower"), ((3, 4), (1, 2), "baseline lower"),
    ((1, 3), (2, 4), "overlap"), ((1, 2), (2, 3), "overlap")])    # touching intervals overlap
def test_interval_findings_have_known_answers(mesa, baseline, expected):
    def row(interval):
        return {"low_%": interval[0], "high_%": interval[1]}
    assert interval_finding(row(mesa), row(baseline)) == expected


def test_fig3_at_the_paper_budget_is_set_beside_the_profiles_claims(tmp_path):
    claims = pd.DataFrame({"claim": ["a collapses", "b expands"], "holds": [0, 2],
                           "cases": [3, 6]})
    (tmp_path / "quick").mkdir()
    claims.to_csv(tmp_path / "quick" / "03_claims.csv", index=False)
    assert report.claims_by_budget(tmp_path / "quick")[1] is None
    (tmp_path / "quick-paper-generators").mkdir()
    claims.assign(holds=[0, 5]).to_csv(tmp_path / "quick-paper-generators" / "03_claims.csv",
                                       index=False)
    table, budget = report.claims_by_budget(tmp_path / "quick")
    assert budget == tmp_path / "quick-paper-generators"
    assert table[report.PAPER_BUDGET].tolist() == [0, 5]
    assert report._budget_sentence(tmp_path / "quick")[1].endswith(
        "1 of its 2 claims come out as at 300 steps x 64; changed: b expands (2 -> 5 of 6).")
    claims.assign(claim=["a collapses", "c"]).to_csv(
        tmp_path / "quick-paper-generators" / "03_claims.csv", index=False)
    with pytest.raises(ValueError, match="checks other claims"):
        report.claims_by_budget(tmp_path / "quick")
