"""The cross-dataset and domain-generalisation targets in their real CoOp layouts (miniatures)."""

from __future__ import annotations

from pathlib import Path

import pytest

from coop_miniature import CROSS_DATASET_TARGETS, IMAGENET, SUBSET_200, build_coop_root
from promptbench_vlm.data import DatasetOptions, load_dataset
from promptbench_vlm.errors import UserError


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return build_coop_root(tmp_path_factory.mktemp("coop"))


@pytest.mark.parametrize("name", CROSS_DATASET_TARGETS)
def test_each_cross_dataset_target_loads_its_test_split(root, name):
    ds = load_dataset(f"coop:{name}@{root}")
    assert ds.classnames == ["class a", "class b", "class c"]
    assert ds.labels == [0, 1, 1, 2] and ds.load(3).mode == "RGB"
    assert ds.source_labels is None


def test_imagenet_is_the_source_with_all_its_classes(root):
    ds = load_dataset(f"coop:imagenet@{root}")
    assert ds.classnames == list(IMAGENET.values()) and ds.labels == list(range(6))


@pytest.mark.parametrize("name,folder", [("imagenet_a", "imagenet-adversarial/imagenet-a"),
                                         ("imagenet_r", "imagenet-rendition/imagenet-r")])
def test_the_200_class_subsets_map_to_imagenet_classes(root, name, folder):
    imagenet = load_dataset(f"coop:imagenet@{root}")
    ds = load_dataset(f"coop:{name}@{root}")
    assert ds.classnames == [IMAGENET[w] for w in SUBSET_200] == ["goldfish", "tiger shark", "hammerhead shark"]
    assert ds.labels == [0, 1, 1, 2, 2, 2]  # the sorted wnid folders, 0..K-1 as in CoOp; README.txt is no class
    assert ds.source_labels == [1, 3, 4]
    assert [imagenet.classnames[i] for i in ds.source_labels] == ds.classnames
    assert f"{folder}/n01491361/" in ds.describe(1).replace("\\", "/")


def test_sketch_and_v2_hold_all_imagenet_classes_with_imagenet_labels(root):
    imagenet = load_dataset(f"coop:imagenet@{root}")
    for name in ("imagenet_sketch", "imagenetv2"):
        ds = load_dataset(f"coop:{name}@{root}")
        assert ds.classnames == imagenet.classnames and ds.source_labels == list(range(6))
        assert ds.labels == list(range(6))
    v2 = load_dataset(f"coop:imagenetv2@{root}")
    assert v2.describe(4).replace("\\", "/").endswith("imagenetv2-matched-frequency-format-val/4/a.jpeg")


def test_the_imagenet_variants_are_test_sets_only(root, tmp_path):
    with pytest.raises(UserError, match="test set only"):
        load_dataset(f"coop:imagenet_a@{root}", DatasetOptions(split="train"))
    bad = tmp_path / "imagenetv2"
    (bad / "imagenetv2-matched-frequency-format-val" / "6").mkdir(parents=True)
    (bad / "classnames.txt").write_text("n01440764 tench\n")
    with pytest.raises(UserError, match="not a class number 0..0"):
        load_dataset(f"coop:imagenetv2@{tmp_path}")
    with pytest.raises(UserError, match=r"missing class list: expected '.*imagenet-rendition.classnames.txt'"):
        load_dataset(f"coop:imagenet_r@{tmp_path}")


def test_domain_generalization_accepts_the_imagenet_variants_and_refuses_other_classes(root):
    from promptbench_vlm.compare.grid import check_transfer_targets
    from promptbench_vlm.compare.sweep import build_sweep

    variants = [f"coop:{name}@{root}" for name in ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")]
    sweep = {"methods": ["zeroshot"], "datasets": [f"coop:imagenet@{root}"], "protocol": "domain-generalization"}
    check_transfer_targets(build_sweep({**sweep, "targets": variants}))  # -A and -R: a subset of ImageNet's classes
    others = [f"coop:{name}@{root}" for name in CROSS_DATASET_TARGETS]
    with pytest.raises(UserError, match="coop:caltech101.*lacks.*cross-dataset"):
        check_transfer_targets(build_sweep({**sweep, "targets": others}))
    check_transfer_targets(build_sweep({**sweep, "protocol": "cross-dataset", "targets": others}))


def test_compare_runs_imagenet_to_its_four_variants_on_the_real_layouts(root, tmp_path):
    from conftest import TINY_CONFIG, run_console

    from promptbench_vlm.results import read_result

    (tmp_path / "t.txt").write_text("a photo of a {}.\na sketch of a {}.\n")
    targets = ", ".join(f'"coop:{n}@{root}"' for n in ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"))
    sweep = tmp_path / "dg.toml"
    sweep.write_text(f"""protocol = "domain-generalization"
datasets = ["coop:imagenet@{root}"]
targets = [{targets}]
methods = ["zeroshot", "erm"]
learners = ["coop"]
seeds = [1]
shots = 1
epochs = 1
templates = "{tmp_path / 't.txt'}"
wordings = "all"
perturb = "drop:strong"
bootstrap = 20
model = "{TINY_CONFIG}"
device = "cpu"
output = "{tmp_path / 'out'}"
""")
    proc = run_console("compare", str(sweep), env={"PROMPTBENCH_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    cell = next((tmp_path / "out").glob("*/erm__coop__seed1"))
    doc = read_result(cell / "result.json")
    assert list(doc["subsets"]) == ["all", "target:coop-imagenetv2", "target:coop-imagenet_sketch",
                                    "target:coop-imagenet_a", "target:coop-imagenet_r"]
    assert [b["n_classes"] for b in doc["subsets"].values()] == [6, 6, 6, 3, 3]  # -A, -R: their subset's classes
    assert [b["n_images"] for b in doc["subsets"].values()] == [6, 6, 6, 6, 6]
