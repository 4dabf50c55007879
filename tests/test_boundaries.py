"""The design's import direction, checked on the source.

server → store, train_worker.protocol, host.client; host → learning; train_worker → learning;
learning imports nothing of ours. Neither server nor store imports torch, anywhere.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"server", "host", "learning", "store", "train_worker"}
HEAVY = {"torch", "transformers", "peft", "trl", "accelerate"}

# What each package may import from our own packages (module prefixes).
ALLOWED: dict[str, tuple[str, ...]] = {
    "learning": ("learning",),
    "store": ("store",),
    "train_worker": ("train_worker", "learning"),
    # The server reaches the worker only through its torch-free contract modules, the host through its client.
    "server": (
        "server",
        "store",
        "host.client",
        "train_worker.protocol",
        "train_worker.settings",
        "train_worker.deploy",
        "train_worker.locks",
        "train_worker.auth_token",
        "train_worker.host_control",
        "train_worker.lifecycle",
    ),
    # The host runs inference with learning/, and reads the home through the same torch-free contracts.
    "host": (
        "host",
        "learning",
        "train_worker.protocol",
        "train_worker.settings",
        "train_worker.deploy",
        "train_worker.locks",
        "train_worker.auth_token",
    ),
}
# The host's client is what the server imports: it stays torch-free and needs only the API models.
LIGHT_HOST_MODULES = ("host.client", "host.api", "host.endpoint")
# The CLI is every process's entry point: it starts the worker and the watcher.
ENTRY_IMPORTS = {"server.cli": ("train_worker.worker", "train_worker.watch", "host.serve")}


def _imports(path: Path, top_level_only: bool = False) -> set[str]:
    found: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    for node in tree.body if top_level_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _module(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_import_direction(package: str) -> None:
    problems = []
    for path in sorted((ROOT / package).rglob("*.py")):
        module = _module(path)
        for name in _imports(path):
            top = name.split(".")[0]
            if top in OURS:
                allowed = ALLOWED[package] + ENTRY_IMPORTS.get(module, ())
                if not any(name == a or name.startswith(a + ".") for a in allowed):
                    problems.append(f"{module} imports {name}")
            if top in HEAVY and package in {"server", "store"}:
                problems.append(f"{module} imports {name} (torch stays in the worker and the model host)")
    assert not problems, "\n".join(problems)


def test_light_learning_modules_do_not_import_torch() -> None:
    """The server embeds learning's config and report models through the protocol: they stay torch-free."""
    for name in ("__init__", "config", "examples", "fsutil", "gates", "reports", "output_schema", "interrupt", "scope"):
        assert not {i.split(".")[0] for i in _imports(ROOT / "learning" / f"{name}.py")} & HEAVY
    for name in (
        "protocol", "settings", "deploy", "locks", "auth_token", "host_control", "lifecycle", "lease", "faults",
    ):  # fmt: skip
        imports = _imports(ROOT / "train_worker" / f"{name}.py")
        assert not {i.split(".")[0] for i in imports} & HEAVY
        light = {
            "learning.config",
            "learning.examples",
            "learning.fsutil",
            "learning.gates",
            "learning.reports",
            "learning.output_schema",
            "learning.interrupt",
            "learning.scope",
        }
        assert not {i for i in imports if i.startswith("learning.")} - light
    # The worker and watcher load torch only once a run starts, so a waiting watcher stays small.
    for name in ("worker", "watch"):
        imports = _imports(ROOT / "train_worker" / f"{name}.py", top_level_only=True)
        assert not {i.split(".")[0] for i in imports} & HEAVY
        # Only the stop flag, which imports nothing.
        assert not {i for i in imports if i.startswith("learning")} - {"learning", "learning.interrupt"}


def test_the_host_client_is_torch_free() -> None:
    """What the server imports of the host pulls in neither torch nor learning/."""
    for module in LIGHT_HOST_MODULES:
        imports = _imports(ROOT / Path(*module.split(".")).with_suffix(".py"))
        assert not {i.split(".")[0] for i in imports} & HEAVY, module
        ours = {i for i in imports if i.split(".")[0] in OURS}
        assert not ours - {"host.api", "host.endpoint", "train_worker.protocol", "train_worker.settings"}
