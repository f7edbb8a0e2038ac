"""Package layout: the encoders sit below the detectors, evaluation and the toy world's benchmark.

The import graph is read from the source with ``ast``, *including imports inside functions* (the loop this guards
against was hidden by them): ``encoders/base.py`` imported ``vlmood.toyworld`` to resolve the ``toyworld`` spec,
``toyworld`` imported ``vlmood.evaluation``, which imports the detectors and the encoders again.
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

import vlmood
from vlmood.encoders import registry

PKG = Path(vlmood.__file__).resolve().parent


def _modules() -> dict[str, tuple[Path, bool]]:
    mods = {}
    for f in PKG.rglob("*.py"):
        parts = ["vlmood", *f.relative_to(PKG).with_suffix("").parts]
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return mods


MODULES = _modules()


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of import nodes under ``if TYPE_CHECKING:`` (never executed)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def imports(name: str, module_level_only: bool = False) -> set[str]:
    """vlmood modules that ``name`` imports: anywhere in the file (default) or only in statements run on import.

    ``from a.b import c`` imports ``a.b.c`` when that is a module, else ``a.b``; importing ``a.b.c`` also runs the
    ``__init__`` of ``a.b``. The top-level facade ``vlmood/__init__.py`` (which re-exports every layer by design)
    is not followed.
    """
    path, is_pkg = MODULES[name]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_nodes(tree)
    package = name if is_pkg else name.rpartition(".")[0]
    if module_level_only:  # statements executed at import: the body, including try/if blocks, but no def bodies
        nodes, stack = [], list(tree.body)
        while stack:
            n = stack.pop()
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            nodes.append(n)
            stack.extend(ast.iter_child_nodes(n))
    else:
        nodes = list(ast.walk(tree))
    targets = set()
    for n in nodes:
        if id(n) in skip:
            continue
        if isinstance(n, ast.Import):
            targets.update(a.name for a in n.names)
        elif isinstance(n, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - (n.level - 1)] if n.level else []
            mod = ".".join(base + ([n.module] if n.module else []))
            for a in n.names:
                targets.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod)
    out = set()
    for t in targets:
        parts = t.split(".")
        out.update(".".join(parts[:k]) for k in range(2, len(parts) + 1) if ".".join(parts[:k]) in MODULES)
    out.discard(name)
    return out


def reachable(starts, module_level_only: bool = False) -> set[str]:
    seen, stack = set(), list(starts)
    while stack:
        m = stack.pop()
        if m not in seen:
            seen.add(m)
            stack.extend(imports(m, module_level_only))
    return seen


ABOVE_ENCODERS = ("vlmood.evaluation", "vlmood.detectors", "vlmood.toyworld", "vlmood.features", "vlmood.cli",
                  "vlmood.negatives")


def _above(mods) -> list[str]:
    return sorted(m for m in mods if m.startswith(ABOVE_ENCODERS))


def test_import_graph_sees_function_level_imports():
    """The graph itself: a function-level import is an edge (toyworld.bench imports evaluation inside benchmark())."""
    assert "vlmood.evaluation" in imports("vlmood.toyworld.bench")
    assert "vlmood.evaluation" not in imports("vlmood.toyworld.bench", module_level_only=True)
    assert {"vlmood.text", "vlmood.text.embed"} <= imports("vlmood.detectors.base")  # parent package's __init__ runs


def test_encoders_cannot_reach_detectors_evaluation_or_the_toy_world():
    encoders = [m for m in MODULES if m == "vlmood.encoders" or m.startswith("vlmood.encoders.")]
    assert "vlmood.encoders.registry" in encoders
    assert _above(reachable(encoders)) == []


def test_model_providers_load_no_benchmark_code():
    """Registered providers are imported lazily by the encoders; what importing one runs (its module-level imports
    and its packages' ``__init__``) must stay below detectors/evaluation, and its own code may not reach them."""
    providers = set(registry.BUILTIN_MODELS.values()) | set(registry.BUILTIN_TOKENIZERS.values())
    assert providers == {"vlmood.toyworld.model"}
    for p in providers:
        runs = reachable([p], module_level_only=True)
        assert "vlmood.toyworld" in runs  # the package __init__ runs too, and is checked with it
        assert not [m for m in runs if m.startswith(("vlmood.evaluation", "vlmood.detectors", "vlmood.features"))]
        own = reachable(imports(p) - {"vlmood.toyworld"})  # the provider's own imports, at any depth
        assert not [m for m in own if m.startswith(("vlmood.evaluation", "vlmood.detectors"))]


def test_toyworld_loads_in_a_fresh_process_that_imported_only_the_encoders():
    """Nothing imported the toy world beforehand: the registry's lazy provider makes the name (and tokenizer) known."""
    code = ("import sys, vlmood.encoders as e; before = 'vlmood.toyworld' in sys.modules; "
            "enc = e.load_encoder('toyworld', device='cpu'); print(before, type(enc.tokenizer).__name__, enc.spec.name)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "WorldTokenizer", "vlmood-toyworld"]


def test_registry_names_and_architecture_tokenizers(tmp_path):
    from vlmood.encoders import EncoderSpec, load_encoder, parse_spec, register_model
    from vlmood.errors import InvalidInputError
    from vlmood.testing import TINY_ARCH
    from vlmood.toyworld import CHECKPOINT
    from vlmood.toyworld.tokenizer import WorldTokenizer

    # the architecture decides the tokenizer, whichever spec names it
    assert isinstance(load_encoder(f"open_clip:vlmood-toyworld@{CHECKPOINT}").tokenizer, WorldTokenizer)
    assert registry.tokenizer_factory(TINY_ARCH) is None  # other architectures keep open_clip's tokenizer
    register_model("tiny-seed-5", lambda: EncoderSpec("open_clip", TINY_ARCH, seed=5))
    try:
        assert parse_spec("tiny-seed-5") == parse_spec(f"open_clip:{TINY_ARCH}/none:seed=5")
        assert "tiny-seed-5" in registry.model_names() and "toyworld" in registry.model_names()
    finally:
        registry._models.pop("tiny-seed-5")
    with pytest.raises(InvalidInputError, match="invalid model name"):
        register_model("open_clip:x", lambda: None)
    with pytest.raises(InvalidInputError, match=r"must start with 'open_clip:' or 'hf:'.*or be a model name: .*toyworld"):
        parse_spec("ViT-B-16")


def test_ci_runs_exactly_the_readme_commands():
    """README's two commands (install + main job, tests) are the commands .ci/run executes, in that order."""
    import re

    root = Path(__file__).parent.parent
    readme = (root / "README.md").read_text(encoding="utf-8")
    blocks = {}
    for head in ("## Install and run the main job", "## Tests"):
        section = readme.split(head, 1)[1]
        blocks[head] = re.search(r"```bash\n(.*?)\n```", section, re.S).group(1).strip()
    assert blocks["## Install and run the main job"] == 'pip install -e ".[dev]" && vlmood demo --report vlmood-demo'
    assert blocks["## Tests"] == "pytest -q"
    ci = [ln.strip() for ln in (root / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    commands = [ln for ln in ci if ln and not ln.startswith(("#", "set ", "cd ", "export ", "if ", "(", "fi", "echo"))
                and not ln.startswith(("apt-get", "||"))]
    assert commands == list(blocks.values())
