"""The documentation site builds strictly, its generated pages match their scripts, the README stays short, and
no tracked file points outside the repository or at an issue tracker's numbers."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Built from parts so that this file does not match itself.
OUTSIDE_PATH = "../" + "shared"
ISSUE_NUMBER = re.compile(r"\bissue \d+", re.IGNORECASE)


def script_output(*args: str) -> str:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, check=True)
    return done.stdout


def test_mkdocs_builds_strictly(tmp_path):
    """Broken links, missing anchors and pages left out of the nav are warnings, and --strict fails on them."""
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "site" / "config-reference" / "index.html").is_file()


def test_config_reference_page_is_current():
    """Compared with the script's live output, so a field added to the schema today shows up here."""
    page = (ROOT / "docs" / "config-reference.md").read_text()
    assert page == script_output("scripts/config_reference.py"), (
        "docs/config-reference.md is stale: run python3 scripts/config_reference.py > docs/config-reference.md")


def test_config_reference_lists_every_key():
    from zerotune.config import field_specs

    page = (ROOT / "docs" / "config-reference.md").read_text()
    assert [key for key, _, _ in field_specs() if f"| `{key}` |" not in page] == []


def test_benchmarks_page_lists_every_results_file():
    page = (ROOT / "docs" / "benchmarks-all.md").read_text()
    assert page == script_output("scripts/bench_table.py", "--all"), (
        "docs/benchmarks-all.md is stale: run python3 scripts/bench_table.py --all > docs/benchmarks-all.md")
    for path in (ROOT / "benchmarks" / "results").glob("*.json"):
        assert f"`{path.name}` |" in page, path.name


def test_readme_is_at_most_200_lines():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail into docs/"


def test_no_tracked_file_points_outside_the_repository():
    """Results files keep what their runs recorded; everything else must make sense in a clone on its own."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True)
    offenders = []
    for name in tracked.stdout.split("\0"):
        path = ROOT / name
        if not name or name.startswith("benchmarks/results/") or not path.is_file():
            continue
        text = path.read_bytes().decode("utf-8", errors="ignore")
        if OUTSIDE_PATH in text:
            offenders.append(f"{name}: {OUTSIDE_PATH}")
        offenders += [f"{name}: {match.group(0)!r}" for match in ISSUE_NUMBER.finditer(text)]
    assert offenders == [], offenders
