"""model/ keeps its runtime (what a worker or launcher runs to find, read,
load and run a model) apart from its tooling (commands that build, convert,
quantize or measure models), with dependencies pointing one way: tooling
may import runtime, runtime never imports tooling, nor the pipeline above
it.  Every import counts, lazy ones inside functions included."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODEL = ROOT / "model"

# What workers and launchers run, and the low helpers every command
# shares (``console``).  ``bert`` is the encoder's definition, which the
# GPU bfloat16 re-trace (``bf16_graph``) rebuilds at run time.
RUNTIME = frozenset({
    "__init__", "bert", "bf16_graph", "console", "engines", "errors",
    "facts",
    "files", "handles", "load", "native_log", "openvino_engine",
    "ov_layer_norm", "runtime",
    "self_check", "signature", "variables", "vocab"})
# Commands and the model builders they use.
TOOLING = frozenset({"accuracy", "convert", "demo", "export", "quantize"})

# Upward imports a runtime module may still make (lazily), each for a
# stated reason: the load-time self-check tokenizes and batches its probe
# sentences exactly as the pipeline does.
ALLOWED_UPWARD = {
    "self_check": {"transforms.batch", "transforms.infer",
                   "transforms.records", "transforms.tokenization"},
}


def _imports(path: pathlib.Path) -> set[str]:
    """Every module ``path`` imports, anywhere in it (``from model import
    x`` counts as ``model.x``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module \
                and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}"
                         for alias in node.names)
    return found


def _model_modules() -> set[str]:
    return {path.stem for path in MODEL.glob("*.py")}


def test_every_model_module_is_runtime_or_tooling():
    assert not RUNTIME & TOOLING
    unsorted = _model_modules() - RUNTIME - TOOLING
    assert not unsorted, (f"model/{sorted(unsorted)[0]}.py is in neither "
                          "RUNTIME nor TOOLING of this test: say which it is")
    gone = (RUNTIME | TOOLING) - _model_modules()
    assert not gone, f"no model/{sorted(gone)[0]}.py any more"


@pytest.mark.parametrize("name", sorted(RUNTIME))
def test_runtime_modules_import_no_tooling_and_no_pipeline(name):
    imported = _imports(MODEL / f"{name}.py")
    tooling = sorted(m for m in imported
                     if m in {f"model.{t}" for t in TOOLING})
    assert not tooling, f"runtime model/{name}.py imports tooling {tooling}"
    allowed = ALLOWED_UPWARD.get(name, set())
    upward = sorted(m for m in imported
                    if m.split(".")[0] in ("pipeline", "transforms", "bench",
                                           "dataflow")
                    and not any(m == a or m.startswith(a + ".")
                                for a in allowed))
    assert not upward, f"runtime model/{name}.py imports {upward}"


def test_the_checks_see_lazy_and_package_imports(tmp_path):
    """The parser catches what a runtime module could slip in: a lazy
    import inside a function and ``from model import <tooling>``."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from model import demo\n"
                      "    import pipeline.cli\n", encoding="utf-8")
    assert {"model.demo", "pipeline.cli"} <= _imports(source)
