"""The README's front door stays true: CI runs its test command, and its benchmark table is the newest run of
each workload, as scripts/bench_table.py prints it from benchmarks/results."""

import json
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def bench_table_module() -> dict:
    return runpy.run_path(str(ROOT / "scripts" / "bench_table.py"))


def test_ci_runs_the_readme_test_command():
    """.ci/run's pytest line is the README's second set-up command, the first line of its second bash block;
    the first block installs and runs the quickstart."""
    readme = (ROOT / "README.md").read_text()
    command = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if "pytest" in line][0]
    assert command in readme
    blocks = readme.split("```bash\n")
    assert blocks[1].split("\n")[0].endswith("zerotune quickstart")
    assert blocks[2].split("\n")[0] == command


def test_bench_table_matches_the_results_files():
    table = bench_table_module()["headline_table"]()
    workloads = {result["workload"] for _, result in bench_table_module()["bench_results"]()}
    assert table.count("\n") == len(workloads) + 1  # a header, a rule and one row per workload
    assert table in (ROOT / "README.md").read_text(), (
        "README's benchmark table is stale: paste in the output of python3 scripts/bench_table.py")


def write_result(folder: Path, name: str, date: str, command: str, ratio: float, **extra) -> None:
    side = {"tokens_per_second_per_gpu": 1000.0, "peak_gib": 10.0}
    result = {"workload": "w1", "gpu": "NVIDIA H200", "date": date, "commit": "0000000", "command": command,
              "ours": side, "baseline": side, "ratio": ratio, **extra}
    (folder / name).write_text(json.dumps(result))


def test_headline_is_the_newest_default_run(tmp_path):
    """Overrides, caveats and experiments never make the headline; among default runs the newest date wins,
    then the later run of the same command."""
    write_result(tmp_path, "2026-01-01-w1.json", "2026-01-01", "zerotune bench w1", 1.1)
    write_result(tmp_path, "2026-01-02-w1.json", "2026-01-02", "zerotune bench w1 --out-dir /x", 1.2)
    write_result(tmp_path, "2026-01-02-w1-run2.json", "2026-01-02", "zerotune bench w1", 1.3)
    write_result(tmp_path, "2026-01-03-w1-off.json", "2026-01-03", "zerotune bench w1 model.compile=off", 1.4)
    write_result(tmp_path, "2026-01-03-w1-flawed.json", "2026-01-03", "zerotune bench w1", 1.5, caveat="host")
    write_result(tmp_path, "2026-01-03-w1-patch.json", "2026-01-03", "zerotune bench w1", 1.6, experiment="x")
    module = bench_table_module()
    module["headline_results"].__globals__["RESULTS"] = tmp_path
    assert [name for name, _ in module["headline_results"]()] == ["2026-01-02-w1-run2.json"]
