"""The house's import graph, read from the source: no circle, and no import hidden in a function of the
library core (a hidden import still closes a circle at run time; it only hides it from the reader)."""

import ast
from pathlib import Path

import pdllm

ROOT = Path(pdllm.__file__).parent
# The shipped packages that live outside src/pdllm (pyproject's package-dir).
EXTRA = {"pdllm.triton_kernels": ROOT.parents[1] / "triton_kernels", "pdllm.autotune": ROOT.parents[1] / "autotune"}
# Entry points may import late, for a quick start of the command line.
ENTRY_POINTS = {"pdllm.cli", "pdllm.demo", "pdllm.train_toy", "pdllm.lm_eval_adapter", "pdllm.autotune.tune",
                "pdllm.autotune.__main__"}
# Late imports with a reason that is not start-up time: the Triton interpreter is chosen when triton
# is first imported (tests/conftest.py sets it before), and triton is optional off Linux.
ALLOWED_LATE = {("pdllm.attention", "pdllm.triton_kernels.chunk_attention"),
                ("pdllm.attention", "pdllm.triton_kernels.attention_mass")}


def modules() -> dict[str, Path]:
    found = {}
    for package, root in {"pdllm": ROOT, **EXTRA}.items():
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> list[tuple[str, bool]]:
    """(module imported, whether the import sits inside a function) for every pdllm import of a module."""
    tree = ast.parse(path.read_text())
    late_nodes = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for n in ast.walk(f)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # pdllm.prefill.Prefill -> pdllm.prefill
                t = t.rpartition(".")[0]
            if t and t != name and not name.startswith(t + "."):  # a module's own package is no arrow
                out.append((t, id(node) in late_nodes))
    return out


def graph():
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def test_the_import_graph_has_no_circle():
    edges = {m: {t for t, _ in targets} for m, targets in graph().items()}
    index, low, stack, on_stack, circles, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert circles == [], f"import circles: {circles}"


def test_the_library_core_imports_nothing_inside_a_function():
    late = [(m, t) for m, targets in graph().items() if m not in ENTRY_POINTS
            for t, inside in targets if inside and (m, t) not in ALLOWED_LATE]
    assert late == [], f"imports hidden in functions: {late}"


def test_the_layers_below_the_pipeline_never_import_it():
    below = ("pdllm.model", "pdllm.attention", "pdllm.cache", "pdllm.sampler", "pdllm.methods", "pdllm.distributed")
    g = graph()
    for m in below:
        assert not [t for t, _ in g[m] if t.startswith("pdllm.prefill")], m
