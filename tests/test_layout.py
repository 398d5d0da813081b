"""The layering that README's layout section draws: db/ below engine/, engine/'s groups in
order, and nothing under engine/ or db/ that imports streamlit or the pages."""

import ast
from pathlib import Path

import engine

ROOT = Path(__file__).resolve().parent.parent
GROUPS = ("runtime", "data", "model", "training", "loop")


def imported_modules(path: Path) -> set[str]:
    """Every module that a file imports, at any depth of the file (function-level imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_every_engine_module_lives_in_a_group_with_a_docstring():
    assert [p.name for p in (ROOT / "engine").glob("*.py")] == ["__init__.py"]
    groups = sorted(p.name for p in (ROOT / "engine").iterdir() if (p / "__init__.py").exists())
    assert groups == sorted(GROUPS)
    for group in GROUPS:
        assert ast.get_docstring(ast.parse((ROOT / "engine" / group / "__init__.py").read_text()))
        assert group in engine.__doc__


def test_no_import_climbs_from_a_lower_group_to_a_higher_one():
    climbs = []
    for group in GROUPS:
        for path in (ROOT / "engine" / group).glob("*.py"):
            for name in imported_modules(path):
                parts = name.split(".")
                if (
                    parts[0] == "engine"
                    and len(parts) > 1
                    and parts[1] in GROUPS
                    and GROUPS.index(parts[1]) > GROUPS.index(group)
                ):
                    climbs.append(f"{path.relative_to(ROOT)} imports {name}")
    assert climbs == []


def test_engine_and_db_draw_nothing_and_db_knows_no_engine():
    for folder, forbidden in (
        ("engine", ("streamlit", "views", "plotly")),
        ("db", ("streamlit", "views", "engine")),
    ):
        for path in (ROOT / folder).rglob("*.py"):
            roots = {name.split(".")[0] for name in imported_modules(path)}
            assert not roots & set(forbidden), f"{path.relative_to(ROOT)} imports {roots & set(forbidden)}"
