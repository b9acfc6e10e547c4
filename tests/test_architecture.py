"""The shape of ``ssb/``: imports run one way, no import cycle, no stage imports another, small modules.

The imports are read with ``ast`` (nothing is executed), including those inside functions; an import under
``if TYPE_CHECKING:`` never runs and is not counted.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 400

# Top to bottom: a module may import its own layer or any layer below it, never one above. Written once, here.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    # the package root is the Python API's front door: its lazy attributes (PEP 562) reach ssb.run.api
    ("cli", ("ssb.cli", "ssb.__main__", "ssb")),
    ("run", ("ssb.run",)),
    (
        "stages",
        ("ssb.rollout", "ssb.curate", "ssb.onpolicy", "ssb.capture", "ssb.train", "ssb.eval", "ssb.toy", "ssb.zoo"),
    ),
    ("engines/store", ("ssb.engines", "ssb.store")),
    ("core", ("ssb.core", "ssb.config", "ssb.toy.world")),  # the toy world is data (ssb.core.data serves it)
    ("kernels", ("ssb_kernels",)),
]
# A stage talks to another only through files on disk: no stage imports another (the toy tools are one unit).
STAGES = ("ssb.rollout", "ssb.curate", "ssb.onpolicy", "ssb.capture", "ssb.train", "ssb.eval", "ssb.toy", "ssb.zoo")


def _modules() -> dict[str, Path]:
    """Every module of ``ssb`` and ``ssb_kernels`` (the ``kernels/`` folder), by dotted name."""
    out = {}
    for pkg, root in (("ssb", REPO / "ssb"), ("ssb_kernels", REPO / "kernels")):
        for f in sorted(root.rglob("*.py")):
            parts = [pkg, *f.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(name: str, path: Path) -> set[str]:
    """The modules of ``MODULES`` that ``name`` imports (a package import means its ``__init__``)."""
    found: set[str] = set()
    is_pkg = path.name == "__init__.py"

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: resolve against this module's package
                    pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                    pkg = pkg[: len(pkg) - child.level + 1]
                    base = ".".join([*pkg, *([base] if base else [])])
                for a in child.names:
                    found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base)
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    out = set()
    for mod in found:  # "ssb.core.files" -> itself; "ssb_kernels.reference.x" -> the longest known prefix
        while mod and mod not in MODULES:
            mod = mod.rpartition(".")[0]
        if mod and mod != name:
            out.add(mod)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _prefix_match(name: str, prefix: str) -> bool:
    return name == prefix or (prefix != "ssb" and name.startswith(prefix + "."))


def layer_of(name: str) -> int:
    """Index in LAYERS of the longest prefix that names ``name``'s layer."""
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if _prefix_match(name, p) and len(p) > best_len:
                best, best_len = i, len(p)
    if best is None:
        raise AssertionError(f"{name}: no layer in tests/test_architecture.py LAYERS; add it there")
    return best


def stage_of(name: str) -> str | None:
    if any(_prefix_match(name, p) for _, ps in LAYERS[:2] for p in ps) or layer_of(name) != 2:
        return None
    return next(s for s in STAGES if _prefix_match(name, s))


def test_every_module_has_a_layer():
    for name in MODULES:
        layer_of(name)


def test_imports_run_one_way():
    upward = [
        f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
        for a, deps in GRAPH.items()
        for b in sorted(deps)
        if layer_of(b) < layer_of(a)
    ]
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_no_stage_imports_another():
    crossing = [
        f"{a} imports {b}"
        for a, deps in GRAPH.items()
        for b in sorted(deps)
        if stage_of(a) and stage_of(b) and stage_of(a) != stage_of(b)
    ]
    assert not crossing, "stages talk through files, not imports:\n" + "\n".join(crossing)


def test_no_import_cycle():
    """Tarjan's strongly connected components over the module graph; any component of 2+ modules is a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            strongconnect(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_walker_sees_a_planted_cycle_and_an_upward_import(tmp_path):
    """The checks above are only as good as the graph: it must see function-level and ``from pkg import mod``
    imports, and skip TYPE_CHECKING blocks."""
    src = (
        "from typing import TYPE_CHECKING\n"
        "from ssb import rollout\n"
        "if TYPE_CHECKING:\n    from ssb.run import plan\n"
        "def f():\n    from ssb.core.files import read_json\n"
    )
    f = tmp_path / "probe.py"
    f.write_text(src)
    assert _imports("ssb.core.probe", f) == {"ssb.rollout", "ssb.core.files"}
    assert layer_of("ssb.rollout") < layer_of("ssb.core.probe")  # so it would be reported as upward


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith("ssb")))
def test_module_is_small(name):
    n = len(MODULES[name].read_text().splitlines())
    assert n <= MAX_LINES, f"{MODULES[name].relative_to(REPO)}: {n} lines (limit {MAX_LINES}); split it by job"


def test_config_choices_match_their_owners():
    """Choices validated at load (ssb.config.CHOICES) are the values their owners accept."""
    from ssb_kernels.choices import DIVERGENCES, IMPLS, VARIANTS

    from ssb.config import CHOICES
    from ssb.core.grading import GRADING_MODES
    from ssb.core.models import DTYPE_NAMES, resolve_dtype
    from ssb.eval.protocols import PROTOCOLS
    from ssb.store.format import STORE_FORMATS

    assert CHOICES["eval.protocol"] == tuple(PROTOCOLS)
    assert CHOICES["train.loss_impl"] is CHOICES["capture.kernel_impl"] is IMPLS
    assert (CHOICES["train.variant"], CHOICES["train.divergence"]) == (VARIANTS, DIVERGENCES)
    assert CHOICES["grading.mode"] == GRADING_MODES
    assert set(CHOICES["capture.store_format"]) == set(STORE_FORMATS)  # core cannot import the store: kept equal here
    assert CHOICES["model.dtype"] == DTYPE_NAMES
    for name in DTYPE_NAMES:
        resolve_dtype(name, "cpu")


def test_config_and_the_kernels_namespace_load_without_torch():
    """Loading a config checks the kernels' choices (ssb_kernels.choices) without importing torch, and the
    public kernel names load on first use."""
    code = (
        "import sys, ssb.config, ssb_kernels; ssb.config.load_config(None, ['train.loss_impl=chunked']); "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "from ssb_kernels import sparse_kd_loss, hidden_kd_loss, topk_logprobs, KDOptions; "
        "assert sorted(ssb_kernels.__all__) == ssb_kernels.__all__ and 'torch' in sys.modules"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_every_package_is_installed():
    """pyproject.toml lists packages explicitly (kernels/ is mapped to ssb_kernels): a new subpackage must be
    listed, or a wheel install would lack it."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {n for n, f in MODULES.items() if f.name == "__init__.py"}
    assert packages <= listed, f"add to [tool.setuptools] packages: {sorted(packages - listed)}"
