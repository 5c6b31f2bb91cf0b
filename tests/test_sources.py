"""Dataset sources and shipped models are registered like learners: the toy world is one of them,
a plug-in adds its own the same way, and no generic module imports the toy world."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import TINY_CONFIG, ColourDataset

from promptbench_vlm.backbone import SHIPPED_MODELS, ShippedModel, load_backbone
from promptbench_vlm.data import DATASET_SOURCES, DatasetSource, load_dataset
from promptbench_vlm.errors import UserError

PACKAGE = Path(__file__).parent.parent / "promptbench_vlm"


def _imported_modules(path: Path) -> set[str]:
    """Absolute names of the package modules `path` imports (relative imports resolved)."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = parts[:-1]  # the package a relative import starts from
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names |= {module} | {f"{module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    return names


def test_no_generic_module_imports_the_toy_world():
    offenders = {str(p.relative_to(PACKAGE)): sorted(m for m in _imported_modules(p) if m.startswith("promptbench_vlm.toy"))
                 for p in PACKAGE.rglob("*.py") if "toy" not in p.relative_to(PACKAGE).parts}
    assert not {k: v for k, v in offenders.items() if v}


def test_the_toy_world_is_an_ordinary_source_and_model():
    assert {"toy-shapes", "folder", "coop", "hf", "hf-disk"} <= set(DATASET_SOURCES.names())
    assert "toy-clip" in SHIPPED_MODELS.names()
    assert len(load_dataset("toy-shapes", subset="base").classnames) > 0
    backbone = load_backbone("toy-clip", device="cpu")
    assert not backbone.random_init and backbone.pretrained is None  # its shipped weights


def test_a_plugin_source_and_model_register_the_same_way(monkeypatch):
    source = DatasetSource("colours:N", "N generated images per colour", lambda n, _options: ColourDataset(int(n)))
    monkeypatch.setitem(DATASET_SOURCES._local, "colours", source)
    assert len(load_dataset("colours:2")) == 8 and "colours" in DATASET_SOURCES.names()
    with pytest.raises(UserError, match="needs an argument: colours:N"):
        load_dataset("colours")
    monkeypatch.setitem(SHIPPED_MODELS._local, "tiny", ShippedModel(config=TINY_CONFIG))
    assert load_backbone("tiny", device="cpu").random_init  # no weights shipped: random init, and said so
    with pytest.raises(UserError, match="unknown open_clip model 'tiny-clip-x'"):
        load_backbone("tiny-clip-x", device="cpu")
