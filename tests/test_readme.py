"""The README's numbers are produced, not typed: its default table is what `iia report` prints from the shipped
CSV (scripts/readme_tables.sh regenerates both)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_default_table_equals_report_of_the_shipped_csv(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    text = (ROOT / "README.md").read_text()
    start = text.index("<!-- default-table -->\n```\n") + len("<!-- default-table -->\n```\n")
    shown = text[start:text.index("\n```", start)].splitlines()
    r = cli(["report", ROOT / "results" / "readme" / "mnist-testbed.csv"], terminal_width=80)
    assert r.exit_code == 0, r.output
    printed = [line.rstrip() for line in r.stdout.rstrip("\n").splitlines()]
    assert shown == printed


def test_shipped_rows_carry_a_clean_revision():
    import csv

    with open(ROOT / "results" / "readme" / "mnist-testbed.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(r["git_revision"] and not r["git_revision"].endswith("-dirty") for r in rows)
    assert all(r["ci_low"] and r["ci_high"] for r in rows)  # every shown number has its interval
