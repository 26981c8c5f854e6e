"""A stage's code version: the digest of the project modules it really imports.

The store keys every stage output by its inputs, its config and its code (``store.stage_key``).
The code part is computed here, not listed by hand: starting from the stage's task module, follow
every ``import`` / ``from ... import`` of a project module (at any depth, function-level lazy
imports included) and hash what the closure holds, with the ``__init__`` of every package on the
way (:func:`import_closure`). So an edit of any module a stage can execute changes that stage's
key, and an edit of a module it never imports changes nothing::

    from fire_mpo_core.code_version import code_version, import_closure
    import_closure("tasks.judge")     # ['fire_mpo_core', 'fire_mpo_core.clinical', ...]
    code_version("tasks.judge")       # '3f2a...' (16 hex digits)

What is hashed per module: its name and its syntax tree without docstrings (``ast.dump``), so
comments, docstrings and formatting never invalidate results. Data files that ship inside a
package directory (the LLM judge's prompts) are hashed byte for byte with the package. Imports
by string (``importlib.import_module("...")``) are not followed: the project has none on a
stage's path (checked by ``tests/core/test_code_version.py``).
"""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

#: Top-level packages whose modules count as project code (everything else is a dependency).
PROJECT_PACKAGES = ("fire_mpo_core", "tasks")
KEY_LEN = 16
_DATA_SUFFIXES = (".txt", ".json", ".yaml", ".yml", ".jinja")

REPO_ROOT = Path(__file__).resolve().parent.parent


def project_modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> source file of every project module under ``root``."""
    out: dict[str, Path] = {}
    for pkg in PROJECT_PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


@lru_cache(maxsize=4096)
def _parse(path: Path, _stamp: tuple[int, int]) -> ast.Module:
    return ast.parse(path.read_bytes())


def parse(path: Path) -> ast.Module:
    """The module's syntax tree, parsed once per file version (size, mtime). Callers must not
    modify it."""
    st = path.stat()
    return _parse(path, (st.st_size, st.st_mtime_ns))


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def direct_imports(name: str, modules: dict[str, Path]) -> set[str]:
    """Project modules that ``name`` imports anywhere in its source (``from pkg import sub``
    counts ``sub`` when it is a module)."""
    path = modules[name]
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        found.update(t for t in targets if t.split(".")[0] in PROJECT_PACKAGES and t in modules)
    found.discard(name)
    return found


def import_closure(module: str, root: Path = REPO_ROOT) -> list[str]:
    """The project modules a stage's code is made of, ``module`` included, sorted.

    Modules imported by name are followed through their own imports. A package whose
    ``__init__`` runs only because one of its submodules is imported is hashed but not followed:
    our ``__init__`` files re-export names (the stage reaches any code it uses through an
    explicit import, which is followed), so editing a sibling submodule the stage never imports
    does not invalidate it.
    """
    modules = project_modules(root)
    if module not in modules:
        raise ValueError(f"{module!r} is not a project module under {root}")
    followed: set[str] = set()
    todo = [module]
    while todo:
        m = todo.pop()
        if m not in followed:
            followed.add(m)
            todo.extend(direct_imports(m, modules) - followed)
    parents = {p for m in followed for p in _parents(m) if p in modules}
    return sorted(followed | parents)


class _StripDocstrings(ast.NodeTransformer):
    def _strip(self, node: ast.AST) -> ast.AST:
        body = getattr(node, "body", None)
        if (
            body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
        self.generic_visit(node)
        return node

    visit_Module = visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _strip


def source_digest(path: Path) -> str:
    """See :func:`_source_digest`; cached per file version, except a package's ``__init__``,
    whose digest also covers the package's data files."""
    if path.name == "__init__.py":
        return _source_digest.__wrapped__(path, (0, 0))
    st = path.stat()
    return _source_digest(path, (st.st_size, st.st_mtime_ns))


@lru_cache(maxsize=4096)
def _source_digest(path: Path, _stamp: tuple[int, int]) -> str:
    """Digest of a module's code: its syntax tree without docstrings (comments and formatting
    are not in the tree), plus the data files beside a package's ``__init__``."""
    tree = _StripDocstrings().visit(ast.parse(path.read_bytes()))  # transformed: own copy
    h = hashlib.sha256(ast.dump(tree, include_attributes=False).encode())
    if path.name == "__init__.py":
        for f in sorted(_package_data(path.parent)):
            h.update(f"\0{f.relative_to(path.parent).as_posix()}\0".encode() + f.read_bytes())
    return h.hexdigest()


def _package_data(pkg_dir: Path) -> Iterable[Path]:
    """Data files of a package: in its folder or in sub-folders that are not packages."""
    for f in pkg_dir.rglob("*"):
        if f.suffix not in _DATA_SUFFIXES or not f.is_file() or "__pycache__" in f.parts:
            continue
        rel_dirs = f.relative_to(pkg_dir).parents
        if not any((pkg_dir / d / "__init__.py").is_file() for d in rel_dirs if str(d) != "."):
            yield f


def code_version(module: str, root: Path = REPO_ROOT) -> str:
    """Code version of a stage whose entry is ``module``: digest of its import closure."""
    modules = project_modules(root)
    h = hashlib.sha256()
    for name in import_closure(module, root):
        h.update(f"{name}\0{source_digest(modules[name])}\n".encode())
    return h.hexdigest()[:KEY_LEN]
