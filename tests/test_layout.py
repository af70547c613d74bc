"""The source stays in pieces a reader can hold: no file under src/zerotune over MAX_FILE_LINES lines, no
function (or method) over MAX_FUNCTION_LINES, counted from its ``def`` (decorators too) to its last line."""

import ast
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "src" / "zerotune"
MAX_FILE_LINES = 450
MAX_FUNCTION_LINES = 80


def _sources() -> list[Path]:
    files = sorted(SOURCE.rglob("*.py"))
    assert len(files) > 50, f"found only {len(files)} files under {SOURCE}"
    return files


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno] + [decorator.lineno for decorator in node.decorator_list])
            yield node.name, first, node.end_lineno - first + 1


def test_no_file_is_too_long():
    long_files = {str(path.relative_to(SOURCE)): count for path in _sources()
                  if (count := len(path.read_text().splitlines())) > MAX_FILE_LINES}
    assert not long_files, f"over {MAX_FILE_LINES} lines (split along a seam): {long_files}"


def test_no_function_is_too_long():
    long_functions = [f"{path.relative_to(SOURCE)}:{line} {name} ({count} lines)"
                      for path in _sources()
                      for name, line, count in _functions(ast.parse(path.read_text(), str(path)))
                      if count > MAX_FUNCTION_LINES]
    assert not long_functions, f"over {MAX_FUNCTION_LINES} lines: {long_functions}"


def test_the_check_sees_a_long_function():
    """The counting itself: a 90-line function is caught, an 80-line one is not."""
    def source(lines: int) -> str:
        return "def f():\n" + "    x = 1\n" * (lines - 1)

    assert [count for _, _, count in _functions(ast.parse(source(90)))] == [90]
    assert [count for _, _, count in _functions(ast.parse(source(80)))] == [80]
