"""The package layout's import rules (README.md, Layout), read from the sources with `ast`:
- library modules (all of stem_megatron outside stem_megatron/cli/, and data_tools/) import nothing
  from stem_megatron.cli;
- only stem_megatron/cli/ imports data_tools (nor does stem_megatron import launch or configs);
- every console script in setup.py points into stem_megatron.cli."""

import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sources(top: str):
    for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                yield os.path.relpath(path, ROOT), path


def _module_name(rel: str) -> str:
    parts = rel[:-3].split(os.sep)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(rel: str, path: str) -> set[str]:
    """Every module a file imports, anywhere in it (function-level imports too), made absolute."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=rel)
    package = _module_name(rel)
    if not rel.endswith("__init__.py"):
        package = package.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)  # `from stem_megatron import cli`
    return out


def _hits(modules: set[str], prefix: str) -> list[str]:
    return sorted(m for m in modules if m == prefix or m.startswith(prefix + "."))


def _library_files():
    for top in ("stem_megatron", "data_tools"):
        for rel, path in _sources(top):
            if not rel.startswith(os.path.join("stem_megatron", "cli") + os.sep):
                yield rel, path


def test_the_library_imports_nothing_from_the_commands():
    bad = {rel: _hits(imported_modules(rel, path), "stem_megatron.cli") for rel, path in _library_files()}
    assert {k: v for k, v in bad.items() if v} == {}


def test_only_the_commands_import_data_tools_launch_or_configs():
    bad = {}
    for rel, path in _sources("stem_megatron"):
        if rel.startswith(os.path.join("stem_megatron", "cli") + os.sep):
            continue
        mods = imported_modules(rel, path)
        hits = _hits(mods, "data_tools") + _hits(mods, "launch") + _hits(mods, "configs")
        if hits:
            bad[rel] = hits
    assert bad == {}


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    src = tmp_path / "stem_megatron" / "inference" / "m.py"
    src.parent.mkdir(parents=True)
    src.write_text("def f():\n    from ..cli import run\n    from stem_megatron import cli\n    import data_tools.merge\n")
    mods = imported_modules(os.path.join("stem_megatron", "inference", "m.py"), str(src))
    assert _hits(mods, "stem_megatron.cli") == ["stem_megatron.cli", "stem_megatron.cli.run"]
    assert _hits(mods, "data_tools") == ["data_tools.merge"]


def test_every_console_script_lives_in_the_cli_package():
    with open(os.path.join(ROOT, "setup.py"), encoding="utf-8") as f:
        scripts = re.findall(r'"(stem-[\w-]+)=([\w.]+):main"', f.read())
    assert len(scripts) == 12
    for name, module in scripts:
        assert module.startswith("stem_megatron.cli."), (name, module)
        assert os.path.isfile(os.path.join(ROOT, *module.split(".")) + ".py"), module
