"""The README's front door stays true: CI runs its test command, and the config reference is complete."""

from pathlib import Path

from zerotune.config import field_specs

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if "pytest" in line][0]
    assert command in readme
    blocks = readme.split("```bash\n")
    assert blocks[1].split("\n")[0].endswith("zerotune quickstart")
    assert blocks[2].split("\n")[0] == command


def test_config_reference_lists_every_key():
    readme = (ROOT / "README.md").read_text()
    for key, spec, _ in field_specs():
        assert f"`{key}`" in readme, key


def test_config_reference_matches_the_schema(capsys):
    """Every row of the README's config reference is the one scripts/config_reference.py prints now (the
    help text included), so a changed default or help cannot leave the README stale."""
    import runpy

    runpy.run_path(str(ROOT / "scripts" / "config_reference.py"), run_name="__main__")
    readme = (ROOT / "README.md").read_text().splitlines()
    stale = [row[:80] for row in capsys.readouterr().out.splitlines() if row.startswith("| `") and row not in readme]
    assert not stale, f"README's config reference is stale (python scripts/config_reference.py): {stale}"


def test_bench_table_matches_the_results_files():
    import runpy

    table = runpy.run_path(str(ROOT / "scripts" / "bench_table.py"))["table"]()
    assert table.count("\n") >= 3  # a header, a rule and results
    assert table in (ROOT / "README.md").read_text(), "README's bench table is stale: python scripts/bench_table.py"
