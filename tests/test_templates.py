"""Template sets: shipped sets, user files, and the errors a user can hit."""

from pathlib import Path

import pytest

from promptbench_vlm.errors import UserError
from promptbench_vlm.templates import list_template_sets, load_templates

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "promptsrc_templates.txt"


def test_promptsrc60_is_the_reference_list_in_order():
    templates = load_templates("promptsrc60").templates
    assert len(templates) == 60
    assert templates[0] == "a photo of a {}." and templates[-1] == "itap of the {}."
    if REFERENCE.is_file():  # the shared reference sits beside the checkout in this project's workspace
        assert list(templates) == REFERENCE.read_text().split("\n")[:60]


def test_shipped_sets_include_single_and_the_coop_templates():
    names = list_template_sets()
    assert {"promptsrc60", "single", "coop_dtd", "coop_imagenet"} <= set(names)
    assert len([n for n in names if n.startswith("coop_")]) == 11
    assert load_templates("single").templates == ("a photo of a {}.",)
    assert load_templates("coop_dtd").templates == ("{} texture.",)


def test_user_file(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("# my set\nan image of {}.\n\n{} in the wild.\n")
    assert load_templates(str(f)).templates == ("an image of {}.", "{} in the wild.")


def test_line_without_placeholder_names_file_and_line(tmp_path):
    f = tmp_path / "bad.txt"
    f.write_text("a photo of a {}.\na photo of nothing.\n")
    with pytest.raises(UserError, match=r"bad.txt:2: .*exactly one"):
        load_templates(str(f))
    f.write_text("{} and {}\n")
    with pytest.raises(UserError, match=r"bad.txt:1"):
        load_templates(str(f))


def test_unknown_set_suggests_the_closest():
    with pytest.raises(UserError, match=r"Did you mean 'promptsrc60'") as err:
        load_templates("promptsrc6")
    assert "single" in str(err.value)


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_templates(str(tmp_path / "nope.txt"))
    (tmp_path / "empty.txt").write_text("\n# only a comment\n")
    with pytest.raises(UserError, match="no templates"):
        load_templates(str(tmp_path / "empty.txt"))


def test_bom_is_dropped_also_before_a_comment_and_latin1_is_read_with_a_warning(tmp_path):
    import warnings

    from promptbench_vlm.errors import InputWarning

    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeff# comment\n\ufeffa photo of a {}.\n".encode())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # UTF-8 with a BOM is not worth a warning
        assert load_templates(str(bom)).templates == ("a photo of a {}.",)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("une photo d'un {}, café.\n".encode("latin-1"))
    with pytest.warns(InputWarning, match="not UTF-8.*line 1"):
        assert load_templates(str(latin)).templates == ("une photo d'un {}, café.",)
