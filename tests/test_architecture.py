"""The layering the README's Architecture section promises, read from the code's import statements
(module-level and function-level alike): no training module imported by inference, no cycles, no
Prefect outside flows/, shared layers below the stages, and a light `import medgen`."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SHARED = (
    "medgen.volume",
    "medgen.errors",
    "medgen.config",
    "medgen.provenance",
    "medgen.seeding",
    "medgen.io",
    "medgen.datasets",
    "medgen.models",
    "medgen.training",
)
STAGES = (
    "medgen.ingestion",
    "medgen.synthesis",
    "medgen.denoising",
    "medgen.quality",
    "medgen.export",
    "medgen.demo_data",
)
TRAINING = (
    "medgen.training",
    "medgen.synthesis.train_autoencoder",
    "medgen.synthesis.train_diffusion",
    "medgen.synthesis.train_controlnet",
    "medgen.denoising.train",
)
# which stage may import which (besides itself and the shared layers)
STAGE_MAY_IMPORT = {
    "medgen.ingestion": (),
    "medgen.synthesis": (),
    "medgen.denoising": (),
    "medgen.demo_data": (),
    "medgen.quality": ("medgen.synthesis",),
    "medgen.export": ("medgen.synthesis", "medgen.quality"),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    pkg = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return found


def _graph() -> dict[str, set[str]]:
    files = [p for p in (ROOT / "medgen").rglob("*.py")]
    names = {_module_name(p): p for p in files}
    graph = {}
    for name, path in names.items():
        if name == "medgen":  # the lazy public API names everything on purpose
            continue
        graph[name] = {m for m in _imports(path) if m in names and m != name and m != "medgen"}
    return graph


def _within(module: str, prefixes: tuple[str, ...] | str) -> bool:
    prefixes = (prefixes,) if isinstance(prefixes, str) else prefixes
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_no_inference_module_imports_training():
    bad = [
        f"{m} -> {d}"
        for m, deps in _graph().items()
        if not _within(m, TRAINING) and m != "medgen.cli"
        for d in deps
        if _within(d, TRAINING)
    ]
    assert not bad, bad


def test_shared_layers_do_not_import_stages_and_stages_keep_their_lanes():
    bad = []
    for m, deps in _graph().items():
        for d in deps:
            if _within(m, SHARED) and (_within(d, STAGES) or d == "medgen.cli"):
                bad.append(f"{m} -> {d}")
            for stage, allowed in STAGE_MAY_IMPORT.items():
                if _within(m, stage) and _within(d, STAGES) and not _within(d, (stage, *allowed)):
                    bad.append(f"{m} -> {d}")
    assert not bad, bad


def test_import_graph_has_no_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for d in sorted(graph.get(node, ())):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d) :] + [d]) if d in stack else f"{node} -> {d}")
            elif d not in state:
                visit(d, stack + [d])
        state[node] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    assert not cycles, cycles


def test_only_flows_import_prefect():
    offenders = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in (".venv", "flows", "tests", "build") or "site-packages" in rel.parts:
            continue
        if any(m == "prefect" or m.startswith("prefect.") or m.startswith("prefect_") for m in _imports(path)):
            offenders.append(str(rel))
    assert not offenders, offenders


def test_the_architecture_test_sees_real_imports():
    """Guard against a vacuous graph: known edges must be found."""
    graph = _graph()
    assert "medgen.models.score" in graph["medgen.denoising.denoiser"]
    assert "medgen.training.loop" in graph["medgen.synthesis.train_diffusion"]
    assert _within("medgen.denoising.train", TRAINING) and not _within("medgen.denoising.denoiser", TRAINING)


def test_import_medgen_stays_light():
    code = "import sys, medgen; heavy = [m for m in ('torch', 'monai', 'SimpleITK', 'prefect', 'pydicom') if m in sys.modules]; print(','.join(heavy))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.strip()
    assert out == "", f"import medgen loaded {out}"
