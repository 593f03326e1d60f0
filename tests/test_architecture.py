"""The architecture is checked, not hoped for: import-linter's contracts (pyproject.toml), and an
independent AST scan for import cycles, private-name imports and hand-rolled uid or
metres-per-degree arithmetic."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pipeline"


def modules() -> dict[str, Path]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def imported_modules(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, ast.AST]]:
    """Every pipeline module ``name`` imports, at any depth of the file (functions included)."""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t not in (name, "pipeline"):
                found.append((t, node))
    return found


def test_import_linter_contracts_are_kept():
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    forbidden = {tuple(c["forbidden_modules"]): c for c in contracts if c["type"] == "forbidden"}
    # the start-up budget's contracts: torch only in the model code, distributed only in the cluster
    # and fault-injection modules (tests/test_startup.py checks the commands themselves)
    torch_ok = {i.split(" -> ")[0] for i in forbidden[("torch", "torchvision")]["ignore_imports"]}
    assert torch_ok == {"pipeline.embed", "pipeline.weights", "pipeline.resources", "pipeline.search.scorers",
                        "pipeline.search.device", "pipeline.search.popcount", "pipeline.decode"}  # fmt: skip
    dist_ok = {i.split(" -> ")[0] for i in forbidden[("distributed",)]["ignore_imports"]}
    assert dist_ok == {"pipeline.cluster", "pipeline.cluster.plugin", "pipeline.faults"}
    exe = Path(sys.executable).with_name("lint-imports")
    res = subprocess.run([str(exe)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "0 broken" in res.stdout and f"{len(contracts)} kept" in res.stdout, res.stdout[-2000:]


def test_no_import_cycle_among_pipeline_modules_counting_function_level_imports():
    known = modules()
    graph = {m: {t for t, _ in imported_modules(m, p, known)} for m, p in known.items()}
    cycles = []
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t) :] + [t]))
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles[:5]


def test_no_module_imports_another_modules_private_names():
    known = modules()
    bad = []
    for name, path in known.items():
        tree = ast.parse(path.read_text())
        aliases = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline"):
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        bad.append(f"{name}: from {node.module} import {a.name}")
                    if f"{node.module}.{a.name}" in known:
                        aliases.add(a.asname or a.name)
            elif isinstance(node, ast.Import):
                aliases |= {a.asname or a.name for a in node.names if a.name.startswith("pipeline")}
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                bad.append(f"{name}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not bad, bad


def _shifts_by(tree: ast.AST, amounts: set[int]) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.BinOp)
            and isinstance(node.op, (ast.LShift, ast.RShift))
            and not isinstance(node.left, ast.Constant)  # 1 << 20 is a size, not a uid
        ):
            right = node.right
            if isinstance(right, ast.Call) and right.args:  # np.uint64(40)
                right = right.args[0]
            if isinstance(right, ast.Constant) and right.value in amounts:
                lines.append(node.lineno)
    return lines


@pytest.mark.parametrize("module", sorted(modules()))
def test_uid_bits_and_metres_per_degree_live_in_one_place(module):
    """uids are packed only by grid.pack_uid / unpack_uid; degrees become metres only in geo."""
    path = modules()[module]
    source = path.read_text()
    tree = ast.parse(source)
    if module != "pipeline.grid":
        assert not _shifts_by(tree, {20, 40}), f"{module} shifts uid bits by hand at lines {_shifts_by(tree, {20, 40})}"
    if module != "pipeline.geo":
        assert "111320" not in source.replace("_", "") and "EARTH_M_PER_DEG" not in source, module


def test_every_command_module_has_the_same_two_functions():
    from pipeline.cli import build_parser
    from pipeline.commands import COMMANDS, name_of

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")  # argparse keeps subparsers here
    assert sorted(sub.choices) == sorted(name_of(c) for c in COMMANDS)
    files = {p.stem for p in (PACKAGE / "commands").glob("*.py")} - {"__init__", "common"}
    assert files == {name_of(c) for c in COMMANDS}  # no command module left unwired
    for c in COMMANDS:
        assert callable(c.add_parser) and callable(c.main)
        assert name_of(c) in (sys.modules["pipeline.cli"].__doc__ or "")  # the CLI docstring lists it
