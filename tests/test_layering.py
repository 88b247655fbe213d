"""Import layering: lower folders of megatron_mole never import upper ones.

Every .py under megatron_mole/ and tools/ is parsed with ``ast``; every import is
collected, module-level or inside a function, absolute or relative, plus literal
``importlib.import_module("...")`` calls and ``mm.<name>`` uses of the package's lazy
names (``import megatron_mole as mm; mm.apply_mole``, resolved through
``megatron_mole._LAZY``). Each is mapped to the top-level folder (or module) of
megatron_mole it reaches and checked against ``LEVELS``: a file may import its own
level and lower ones. Also: routing/ and experts/ are plain PyTorch (no Megatron-core
import), megatron_mole never imports tools/ or tests/ (the CLI reaches tools/ by a
computed module name, megatron_mole/cli.py), and a new folder must be given a level.
Last, tests use no private (underscore) names of library modules.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "megatron_mole"

# Lowest first; one level may hold several folders (they may import each other).
LEVEL_ORDER = [
    ["errors"],
    ["routing", "experts"],  # plain PyTorch: hf/ reuses them inside transformers models
    ["config"],
    ["runtime"],
    ["dispatch"],
    ["layers"],
    ["model"],
    ["hf"],
    ["checkpoint"],
    ["analysis"],
    ["training"],
    ["cli", "__main__", "__init__"],
]
LEVELS = {name: level for level, names in enumerate(LEVEL_ORDER) for name in names}
PLAIN_PYTORCH = ("routing", "experts")

# Known violations, (file, imported module) -> why it is still there. Fix them, don't add
# to them: the test fails when an entry is no longer needed.
KNOWN_VIOLATIONS = {}  # (file, module) -> why it is tolerated; none today


def _lazy_names() -> dict:
    """megatron_mole/__init__.py's ``_LAZY`` table (name -> module), read from its source."""
    for node in ast.walk(ast.parse((PACKAGE / "__init__.py").read_text())):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_LAZY" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


LAZY = _lazy_names()


def _unit(path: Path) -> str:
    """The layering unit of a file under megatron_mole/: its top-level folder or module name."""
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _target_unit(module: str, name: str | None = None) -> str | None:
    """The unit that ``from module import name`` (or ``import module``) reaches; None outside megatron_mole."""
    parts = module.split(".")
    if parts[0] != "megatron_mole":
        return None
    if len(parts) > 1:
        return parts[1]
    if name is None:
        return "__init__"
    if name in LAZY:
        return LAZY[name].split(".")[1]
    if (PACKAGE / name).is_dir() or (PACKAGE / f"{name}.py").is_file():
        return name  # from megatron_mole import routing
    return "__init__"


def _package_of(path: Path, root: Path) -> list:
    """The dotted package ``path`` belongs to, as parts (for relative imports)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return parts[:-1]  # a package's __init__.py and its modules both resolve against the folder


def imports_of(path: Path, root: Path = ROOT):
    """(line, absolute module, imported name or None) for every import in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _package_of(path, root)
    aliases = set()  # names bound to the megatron_mole package itself
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "megatron_mole":  # what counts is which names it uses (below)
                    aliases.add(alias.asname or "megatron_mole")
                else:
                    found.append((node.lineno, alias.name, None))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            for alias in node.names:
                found.append((node.lineno, module, alias.name))
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.lineno, node.args[0].value, None))
    for node in ast.walk(tree):  # mm.apply_mole after `import megatron_mole as mm`
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            found.append((node.lineno, "megatron_mole", node.attr))
    return found


def _library_files():
    return sorted(PACKAGE.rglob("*.py"))


def test_every_folder_has_a_level():
    units = {_unit(p) for p in _library_files()}
    assert units - set(LEVELS) == set(), f"give these a level in LEVEL_ORDER: {sorted(units - set(LEVELS))}"


def test_lower_folders_never_import_upper_ones():
    violations, known = [], set()
    for path in _library_files():
        unit = _unit(path)
        for line, module, name in imports_of(path):
            target = _target_unit(module, name)
            if target is not None and target in LEVELS and LEVELS[target] > LEVELS[unit]:
                if (str(path.relative_to(ROOT)), module) in KNOWN_VIOLATIONS:
                    known.add((str(path.relative_to(ROOT)), module))
                    continue
                what = f"{module}.{name}" if name else module
                violations.append(f"{path.relative_to(ROOT)}:{line} ({unit}) imports {what} ({target})")
    assert violations == [], "\n".join(violations)
    assert set(KNOWN_VIOLATIONS) - known == set(), "fixed; remove from KNOWN_VIOLATIONS"


@pytest.mark.parametrize("folder", PLAIN_PYTORCH)
def test_plain_pytorch_folders_do_not_import_megatron(folder):
    found = [f"{path.relative_to(ROOT)}:{line} imports {module}"
             for path in sorted((PACKAGE / folder).rglob("*.py"))
             for line, module, _ in imports_of(path) if module.split(".")[0] == "megatron"]
    assert found == [], "\n".join(found)


def test_library_never_imports_tools_or_tests():
    found = [f"{path.relative_to(ROOT)}:{line} imports {module}"
             for path in _library_files()
             for line, module, _ in imports_of(path) if module.split(".")[0] in ("tools", "tests")]
    assert found == [], "\n".join(found)


def test_tools_import_the_library_not_tests():
    files = sorted((ROOT / "tools").rglob("*.py"))
    assert files, "tools/ is missing"
    found = [f"{path.relative_to(ROOT)}:{line} imports {module}"
             for path in files for line, module, _ in imports_of(path) if module.split(".")[0] == "tests"]
    assert found == [], "\n".join(found)


def test_the_checker_sees_function_level_relative_and_lazy_imports(tmp_path):
    # the checker must be able to fail: a file under routing/ with each kind of import
    probe = tmp_path / "megatron_mole" / "routing" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("import megatron.core\n\n\ndef f():\n    from ..layers import specs\n"
                     "    import megatron_mole as mm\n    return mm.apply_mole, specs\n")
    targets = {(module.split(".")[0], _target_unit(module, name)) for _, module, name in imports_of(probe, tmp_path)}
    assert ("megatron", None) in targets
    assert ("megatron_mole", "layers") in targets  # relative, inside a function
    assert ("megatron_mole", "model") in targets  # mm.apply_mole through the lazy table
    assert LEVELS["layers"] > LEVELS["routing"] and LEVELS["model"] > LEVELS["routing"]


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_tests_use_no_private_library_names():
    # tests go through public names: `from megatron_mole.x import _y`, `module._y` on a name
    # imported from megatron_mole, and "megatron_mole.x._y" patch targets are refused
    found = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        bound = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "megatron_mole":
                for alias in node.names:
                    bound.add(alias.asname or alias.name)
                    if _private(alias.name):
                        found.append(f"{path.name}:{node.lineno} imports {node.module}.{alias.name}")
            elif isinstance(node, ast.Import):
                bound.update(a.asname or a.name.split(".")[0] for a in node.names
                             if a.name.split(".")[0] == "megatron_mole")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr):
                root = node.value
                while isinstance(root, ast.Attribute):
                    root = root.value
                if isinstance(root, ast.Name) and root.id in bound:
                    found.append(f"{path.name}:{node.lineno} uses {root.id}...{node.attr}")
            elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
                  and node.value.startswith("megatron_mole.") and " " not in node.value
                  and any(_private(part) for part in node.value.split("."))):
                found.append(f"{path.name}:{node.lineno} names {node.value}")
    assert found == [], "\n".join(found)
