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


# kafka-python's private fetcher module is reached through one adapter, stream/fetcher.py (which
# also exports its ConsumerRecord); only that adapter's own tests compare against kafka-python's
# Fetcher directly.
FETCHER_MODULE = "kafka.consumer.fetcher"
FETCHER_ADAPTER = {"stream/fetcher.py", "tests/stream/test_fetcher.py",
                   "tests/stream/test_record_parse.py"}
WALKED = (*LOWER, "fmstream", "bench", "tests")


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, dotted in full (``from a.b import c`` gives ``a.b`` and
    ``a.b.c``: ``c`` may be a module), lazy imports too."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def project_modules() -> list[Path]:
    return sorted(p for top in WALKED for p in (ROOT / top).rglob("*.py"))


def test_only_the_adapter_imports_kafka_pythons_private_fetcher() -> None:
    assert (ROOT / "stream" / "fetcher.py") in project_modules()
    bad = [p.relative_to(ROOT).as_posix() for p in project_modules()
           if p.relative_to(ROOT).as_posix() not in FETCHER_ADAPTER
           and any(m == FETCHER_MODULE or m.startswith(FETCHER_MODULE + ".")
                   for m in imported_modules(p))]
    assert not bad, f"{bad} import {FETCHER_MODULE}: import ConsumerRecord from stream.fetcher"
    adapter = imported_modules(ROOT / "stream" / "fetcher.py")
    assert f"{FETCHER_MODULE}.ConsumerRecord" in adapter  # it is where the record type comes from


def test_the_walker_sees_every_form_of_the_fetcher_import(tmp_path: Path) -> None:
    forms = ("import kafka.consumer.fetcher\n", "from kafka.consumer.fetcher import X\n",
             "from kafka.consumer import fetcher as f\n",
             "def g():\n    from kafka.consumer.fetcher import ConsumerRecord\n")
    for n, text in enumerate(forms):
        src = tmp_path / f"m{n}.py"
        src.write_text(text)
        assert FETCHER_MODULE in imported_modules(src), text
    src = tmp_path / "ok.py"
    src.write_text("from stream.fetcher import ConsumerRecord\nfrom kafka.consumer import "
                   "KafkaConsumer\n")
    assert FETCHER_MODULE not in imported_modules(src)
