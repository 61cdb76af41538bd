"""Imports point one way (DEVELOPERS.md's layout), read from the sources with `ast`:
no two modules of the package import each other (directly or around a cycle), no module reaches
for another's private name, the format core imports nothing above it, and a model on the CUDA
backend never loads the CPU backend (numba)."""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def modules() -> dict[str, Path]:
    """Dotted module name -> source file, for every package pyproject.toml maps."""
    dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    out = {}
    for pkg, folder in dirs.items():
        for f in (ROOT / folder).glob("*.py"):
            out[pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"] = f
    return out


MODULES = modules()


def _package(name: str) -> str:
    return name if MODULES[name].stem == "__init__" else name.rpartition(".")[0]


def _owner(dotted: str) -> str | None:
    """The project module a dotted name lives in (the name itself, or a module above it)."""
    while dotted and dotted not in MODULES:
        dotted = dotted.rpartition(".")[0]
    return dotted or None


def imports(name: str) -> list[tuple[str, str | None, str]]:
    """(imported module, imported name or None, bound local name) of every project import in
    `name`'s file, anywhere in it (top level or inside functions)."""
    out = []
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                if _owner(a.name):
                    out.append((_owner(a.name), None, a.asname or a.name.split(".")[0]))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = _package(name).split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in MODULES:  # `from pkg import module`
                    out.append((sub, None, a.asname or a.name))
                elif _owner(base):
                    out.append((_owner(base), a.name, a.asname or a.name))
    return out


def graph() -> dict[str, set[str]]:
    return {m: {t for t, _, _ in imports(m) if t != m} for m in MODULES}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert cycles(graph()) == []


def _private(name: str | None) -> bool:
    return name is not None and name.startswith("_") and not name.startswith("__")


def test_no_private_name_crosses_a_module():
    found = []
    for m in MODULES:
        bound_modules = set()
        for target, name, local in imports(m):
            if target != m and _private(name):
                found.append(f"{m}: from {target} import {name}")
            if name is None and target != m:
                bound_modules.add(local)
        for node in ast.walk(ast.parse(MODULES[m].read_text())):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in bound_modules and _private(node.attr)):
                found.append(f"{m}: {node.value.id}.{node.attr}")
    assert found == []


def test_the_format_core_imports_nothing_above_it():
    """qformat's own modules use only each other; the package root may reach the runtime for
    the public `qformat.load`, lazily."""
    above = ("qformat.convert", "qformat.runtime", "qformat.kernels", "qformat.tune")
    bad = [(m, t) for m, ts in graph().items() if m.count(".") == 1 and m.startswith("qformat.")
           and not any(m.startswith(p) for p in above) for t in ts if t.startswith(above)]
    assert bad == []


def test_a_cuda_model_never_loads_the_cpu_backend(tmp_path, cuda_host):
    """The whole CUDA model path (emulated device: NumPy for CuPy, the .cu kernels built for the
    host) over a file of every kind and sidecar, in a fresh process: numba is never imported."""
    from qbin_testutil import write_sample

    path, _ = write_sample(tmp_path / "sample.qbin")
    script = textwrap.dedent(f"""
        import ctypes, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import numpy as np
        from cuda_emulation import NumpyAsCupy, host_launch
        from qformat.kernels.cuda import decoder, module, upload
        host = ctypes.CDLL({cuda_host._name!r})
        module.cupy = lambda: NumpyAsCupy()
        module.kernel = lambda source, fn: (lambda grid, block, args: host_launch(host, fn, grid, block, args))
        upload.STAGING = False
        decoder.CUDA_GRAPHS = False
        from qformat.reader import QbinReader
        from qformat.runtime.model import Transformer
        model = Transformer(QbinReader({str(path)!r}), device="cuda", context=16)
        logits = model.forward([1, 2, 3], 0)
        logits = model.forward([4], 3)
        assert np.isfinite(logits).all()
        loaded = sorted(m for m in sys.modules if m == "numba" or m.startswith("qformat.kernels.cpu"))
        print(loaded)
        sys.exit(1 if loaded else 0)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
