"""Imports go one way: keyaos/lib <- providers <- billing <- routing <- keyaos/dashboard.

Every import counts, a function-level one too: an import that dodges a cycle is code living in the
wrong app. Domain modules (models, services, selectors, adapters, refresh, recorder and every other
module that is not UI) import only their own layer and the ones below it, and never a UI module.
UI modules (each app's admin and management commands, the /v1 api, the admin toolkit in
keyaos/admin_*.py, the dashboard) sit on top of their app: besides the layers below they may read
any app's read-only modules (selectors, currency: what a page shows, never a write) and use the
admin toolkit; an admin or a command writes only its own app's models, so it does not import
another app's models.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Bottom to top. The admin toolkit (keyaos/admin_format.py, keyaos/admin_mixins.py) may use every
# app and serves every app's admin, so it sits above the apps; the rest of the keyaos package
# (settings, urls, asgi, the admin site, its commands) is the project's wiring, above everything.
LAYERS = (
    "keyaos.lib",
    "providers",
    "billing",
    "routing",
    "keyaos.admin_toolkit",
    "keyaos.dashboard",
    "keyaos.project",
)
ADMIN_TOOLKIT = ("keyaos.admin_format", "keyaos.admin_mixins")
# What a UI module may import from above its own layer.
UI_READS_ABOVE = ("billing.selectors", "billing.currency", *ADMIN_TOOLKIT)

# Violations another change is removing; each names who removes it. Empty is the goal.
KNOWN: set[tuple[str, str]] = set()


def layer_of(module: str) -> str | None:
    """The layer a dotted module name belongs to, or None outside the apps (django, httpx...)."""
    top = module.split(".")[0]
    if top in ("providers", "billing", "routing"):
        return top
    if top != "keyaos":
        return None
    if module in ADMIN_TOOLKIT:
        return "keyaos.admin_toolkit"
    for layer in ("keyaos.lib", "keyaos.dashboard"):
        if module == layer or module.startswith(layer + "."):
            return layer
    return "keyaos.project"


def is_ui(module: str) -> bool:
    parts = module.split(".")
    return (
        parts[-1] in ("admin", "api")
        or "commands" in parts[:-1]
        or layer_of(module) in ("keyaos.admin_toolkit", "keyaos.dashboard", "keyaos.project")
    )


def app_of(module: str) -> str:
    return layer_of(module) or module


def source_modules() -> dict[str, Path]:
    modules = {}
    for folder in ("keyaos", "providers", "billing", "routing"):
        for path in (ROOT / folder).rglob("*.py"):
            relative = path.relative_to(ROOT).with_suffix("")
            if "migrations" in relative.parts:
                continue
            parts = list(relative.parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


@dataclass(frozen=True)
class Import:
    module: str
    target: str
    line: int


def imports_of(module: str, path: Path) -> list[Import]:
    found = []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [Import(module, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from providers import services`` imports the module providers.services.
            found += [Import(module, f"{base}.{alias.name}", node.lineno) for alias in node.names]
    return found


def names(target: str, modules: dict[str, Path]) -> str:
    """The module an import target names (``pkg.mod.Name`` -> ``pkg.mod``)."""
    while target not in modules and "." in target:
        target = target.rpartition(".")[0]
    return target


def violation(imp: Import, modules: dict[str, Path]) -> str | None:
    target = names(imp.target, modules)
    source_layer, target_layer = layer_of(imp.module), layer_of(target)
    if target_layer is None or source_layer is None:
        return None
    if source_layer == "keyaos.lib" and target_layer != "keyaos.lib":
        return f"keyaos/lib imports no app, but imports {target}"
    upward = LAYERS.index(target_layer) > LAYERS.index(source_layer)
    if not is_ui(imp.module):
        if upward:
            return f"imports {target} from a higher layer"
        if is_ui(target):
            return f"imports the UI module {target}"
        return None
    if upward and not target.startswith(UI_READS_ABOVE):
        return f"imports {target} from a higher layer (a UI module may read its selectors only)"
    writes = imp.module.split(".")[-1] == "admin" or ".commands." in imp.module
    if writes and app_of(target) != app_of(imp.module) and target.split(".")[-1] == "models":
        return f"writes another app's models ({target}): it belongs to that app"
    return None


def violations() -> list[str]:
    modules = source_modules()
    found = []
    for module, path in sorted(modules.items()):
        for imp in imports_of(module, path):
            reason = violation(imp, modules)
            if reason and (module, names(imp.target, modules)) not in KNOWN:
                found.append(f"{path.relative_to(ROOT)}:{imp.line}: {module} {reason}")
    return list(dict.fromkeys(found))


def test_imports_go_one_way():
    found = violations()
    assert not found, "imports against the layer order:\n" + "\n".join(found)


def test_known_exceptions_still_exist():
    modules = source_modules()
    present = {
        (imp.module, names(imp.target, modules))
        for module, path in modules.items()
        for imp in imports_of(module, path)
        if violation(imp, modules)
    }
    assert present >= KNOWN, f"remove the fixed entries from KNOWN: {KNOWN - present}"


def test_the_scan_sees_function_level_imports(tmp_path):
    modules = {"providers.refresh": Path(), "routing.failures": Path(), "billing.admin": Path()}
    path = tmp_path / "refresh.py"
    path.write_text("def f():\n    from routing.failures import redact\n")
    found = imports_of("providers.refresh", path)
    assert [violation(imp, modules) for imp in found] == [
        "imports routing.failures from a higher layer"
    ]
    ui_reads = Import("providers.admin", "billing.selectors.recent_spend", 1)
    ui_writes = Import("routing.management.commands.create_api_key", "billing.models.ApiKey", 1)
    modules |= {"billing.selectors": Path(), "billing.models": Path()}
    assert violation(ui_reads, modules) is None
    assert "another app's models" in violation(ui_writes, modules)
