"""The layering of issue 10, kept by walking every module's imports (``ast``, nothing imported).

- ``model/`` is pure: no Kafka, no Redis, none of ``stream/``, ``serving/``, ``train/``;
- ``stream/`` is the Kafka wire: it imports neither ``serving/`` nor ``train/``;
- ``serving/`` is the read side: it never imports ``train/``;
- no module of ``model/``, ``stream/``, ``serving/`` or ``train/`` imports ``fmstream``: lower
  packages take small typed configs that ``fmstream/`` builds from its Settings.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOWER = ("model", "stream", "serving", "train")

FORBIDDEN: dict[str, set[str]] = {
    "model": {"fmstream", "stream", "serving", "train", "kafka", "redis"},
    "stream": {"fmstream", "serving", "train"},
    "serving": {"fmstream", "train"},
    "train": {"fmstream"},
}

# Modules still waiting for their narrow config, with who is giving it to them. Keep this short;
# an entry whose module no longer breaks the rule fails the test (remove it then).
PENDING: dict[str, set[str]] = {}


def imported_roots(path: Path) -> set[str]:
    """Top-level package of every import in ``path`` (anywhere in the file, lazy ones too)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def modules() -> list[Path]:
    return sorted(p for pkg in LOWER for p in (ROOT / pkg).rglob("*.py"))


def test_every_lower_package_is_walked() -> None:
    found = {p.relative_to(ROOT).parts[0] for p in modules()}
    assert found == set(LOWER)
    assert (ROOT / "train" / "loop.py").exists()


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_import_runs_up_or_sideways(path: Path) -> None:
    rel = path.relative_to(ROOT).as_posix()
    bad = imported_roots(path) & FORBIDDEN[rel.split("/")[0]]
    pending = PENDING.get(rel, set())
    assert bad <= pending, f"{rel} imports {sorted(bad - pending)}"
    assert pending <= bad, f"{rel} no longer imports {sorted(pending - bad)}: drop it from PENDING"


def test_the_walker_sees_lazy_and_nested_imports(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text("import a.b\nfrom c.d import e\ndef f():\n    from fmstream import x\n"
                   "    import redis\nfrom . import local\n")
    assert imported_roots(src) == {"a", "c", "fmstream", "redis"}
