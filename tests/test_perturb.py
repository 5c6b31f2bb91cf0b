"""Tests of the text perturbations: class protection, determinism, edit counts, lexicons, parsing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from promptbench_vlm.errors import UserError
from promptbench_vlm.perturb import (
    DEFAULT_OPS,
    LEVELS,
    OPS,
    Lexicon,
    PerturbSpec,
    edit_count,
    fill_template,
    load_lexicon,
    most_movable,
    parse_perturbations,
    perturb,
    perturb_many,
    split_prompt,
    synonym_candidates,
)
from promptbench_vlm.templates import load_templates

TEMPLATES = load_templates("promptsrc60").templates
CLASSNAMES = ["dog", "golden retriever", "black and white cat", "photo booth", "St. Bernard"]
SEEDS = range(12)


def words_up_to_articles(text: str) -> list[str]:
    """The words of a prompt without its final period, sorted, "an" counted as "a" (articles are repaired)."""
    return sorted("a" if w == "an" else w for w in text[:-1].split())


def non_class_count(text: str, span: tuple[int, int]) -> int:
    parts = split_prompt(text, span)
    return len(parts.units) - 1


@pytest.fixture(scope="module")
def lexicon():
    return load_lexicon()


# --- class protection -------------------------------------------------------------------


@pytest.mark.parametrize("op", ["synonym", "mask", "drop", "context"])
@pytest.mark.parametrize("rate", [0.1, 0.5, 1.0])
def test_class_name_never_altered(op, rate):
    for template in TEMPLATES:
        for name in CLASSNAMES:
            text, span = fill_template(template, name)
            for seed in range(3):
                out = perturb(text, span, op, rate, seed)
                assert name in out.text, (template, name, out)


def test_class_with_lexicon_words_is_protected():
    name = "black and white cat"
    text, span = fill_template("a black and white photo of the {}.", name)
    out = perturb(text, span, "synonym", 1.0, 0)
    assert out.n_edits == 2  # "black and white" and "photo", not the class's words
    assert out.text.endswith(" black and white cat.")
    assert not out.text.startswith("a black and white ")


def test_a_user_lexicon_keyed_by_the_class_names_never_replaces_them(tmp_path):
    path = tmp_path / "wordnet_like.json"
    path.write_text(json.dumps({"dog": ["hound", "puppy"], "retriever": ["gun dog"], "golden retriever": ["retriever"],
                                "photo": ["picture"]}))
    lex = load_lexicon(path)
    for name in ("dog", "golden retriever"):
        text, span = fill_template("a photo of a {}.", name)
        for seed in range(6):
            for level in ("weak", "strong"):
                out = perturb(text, span, "synonym", level, seed, lex)
                assert out[:2] == ("a picture of a " + name + ".", 1), (name, seed, out)


def test_class_name_alone_with_lexicon_words_has_no_candidate():
    text, span = fill_template("{}.", "black and white photo")
    for op in ("synonym", "mask", "drop", "shuffle"):
        assert perturb(text, span, op, 1.0, 0) == (text, 0, span)


@pytest.mark.parametrize("rate", [0.1, 0.5, 1.0])
def test_shuffle_keeps_class_unit_intact(rate):
    for template in TEMPLATES:
        text, span = fill_template(template, "golden retriever")
        for seed in SEEDS:
            out = perturb(text, span, "shuffle", rate, seed)
            assert "golden retriever" in out.text
            assert words_up_to_articles(out.text) == words_up_to_articles(text)


def test_shuffle_can_move_the_class_unit():
    text, span = fill_template("a photo of a {}.", "golden retriever")
    moved = {perturb(text, span, "shuffle", 0.5, seed).text.endswith("golden retriever.") for seed in range(30)}
    assert moved == {True, False}


def test_mask_and_drop_edit_whole_units_outside_the_class():
    text, span = fill_template("a photo of a {}.", "golden retriever")
    assert perturb(text, span, "mask", 1.0, 0).text == "[MASK] [MASK] [MASK] [MASK] golden retriever."
    assert perturb(text, span, "drop", 1.0, 0).text == "golden retriever."


# --- trailing punctuation ------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS)
def test_trailing_period_stays_at_the_end(op):
    for template in TEMPLATES:
        text, span = fill_template(template, "dog")
        for seed in range(4):
            out = perturb(text, span, op, 0.5, seed).text
            assert out.endswith(".") and out.count(".") == 1, (template, out)


def test_split_prompt_separates_final_punctuation():
    text, span = fill_template("a {} in a video game.", "dog")
    assert split_prompt(text, span) == (["a", "dog", "in", "a", "video", "game"], 1, ".", 0)
    text, span = fill_template("a photo of a {}.", "St. Bernard")
    assert split_prompt(text, span) == (["a", "photo", "of", "a", "St. Bernard"], 4, ".", 0)
    text, span = fill_template('a photo of a "{}".', "dog")
    assert split_prompt(text, span) == (["a", "photo", "of", "a", '"dog"'], 4, ".", 1)


# --- determinism -------------------------------------------------------------------------

CASES = [(t, "golden retriever", op, rate, seed) for t in TEMPLATES[:10] for op in OPS for rate in (0.1, 0.5)
         for seed in (0, 7)]


def run_cases() -> list[str]:
    out = []
    for template, name, op, rate, seed in CASES:
        text, span = fill_template(template, name)
        out.append(perturb(text, span, op, rate, seed).text)
    return out


def test_same_arguments_same_output_in_any_order():
    first = run_cases()
    text, span = fill_template("a photo of a {}.", "cat")
    perturb(text, span, "shuffle", 0.5, 3)  # an unrelated call in between changes nothing
    assert list(reversed(run_cases()[::-1])) == first


def test_same_output_in_another_process_with_another_hash_seed():
    code = (
        "import json, sys\n"
        "from promptbench_vlm.perturb import fill_template, perturb\n"
        "out = [perturb(*fill_template(t, n), op, r, s).text for t, n, op, r, s in json.load(sys.stdin)]\n"
        "print(json.dumps(out))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    done = subprocess.run([sys.executable, "-c", code], input=json.dumps(CASES), env=env, capture_output=True,
                          text=True, check=True)
    assert json.loads(done.stdout) == run_cases()


@pytest.mark.parametrize("op", OPS)
def test_different_seeds_give_different_outputs(op):
    text, span = fill_template("a bad photo of a large {} in a video game.", "dog")
    assert len({perturb(text, span, op, 0.5, seed).text for seed in range(20)}) > 1


# --- number of edits ----------------------------------------------------------------------


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.3, 0.5, 0.8, 1.0])
def test_mask_and_drop_counts_follow_the_formula(rate):
    for template in TEMPLATES:
        text, span = fill_template(template, "golden retriever")
        k = edit_count("mask", rate, non_class_count(text, span))
        masked = perturb(text, span, "mask", rate, 1)
        assert masked.n_edits == k == masked.text.count("[MASK]")
        dropped = perturb(text, span, "drop", rate, 1)
        assert dropped.n_edits == k == len(text.split()) - len(dropped.text.split())


@pytest.mark.parametrize("rate", [0.1, 0.5, 1.0])
def test_synonym_count_follows_the_formula(rate, lexicon):
    marked = Lexicon({word: ("SYN",) for word in lexicon.synonyms}, lexicon.stopwords, lexicon.noise_phrases)
    for template in TEMPLATES:
        text, span = fill_template(template, "dog")
        parts = split_prompt(text, span)
        n_candidates = len(synonym_candidates(parts.units, parts.cls, marked))
        out = perturb(text, span, "synonym", rate, 2, marked)
        assert out.n_edits == edit_count("synonym", rate, n_candidates) == out.text.count("SYN"), (template, out)


def test_shuffle_count_is_the_units_moved():
    text, span = fill_template("a bad photo of a large {} in a video game.", "dog")
    units = split_prompt(text, span).units
    assert most_movable(units) == 11  # "a" three times among 11 units: still all can move
    for rate in (0.1, 0.5, 1.0, "weak", "strong"):
        out = perturb(text, span, "shuffle", rate, 0)
        moved = sum(a != b for a, b in zip(out.text[:-1].split(), text[:-1].split()))
        assert out.n_edits == edit_count("shuffle", rate, 11) == moved, (rate, out)
    assert most_movable(["a", "a", "dog"]) == 2 and most_movable(["a", "a"]) == 0


def test_weak_and_strong_levels():
    assert LEVELS == {"weak": 0.1, "strong": 0.5}
    text, span = fill_template("a jpeg corrupted photo of a {}.", "dog")  # 6 non-class units
    assert perturb(text, span, "mask", "weak", 0).n_edits == 1
    assert perturb(text, span, "mask", "strong", 0).n_edits == 3
    weak = perturb(text, span, "synonym", "weak", 0)  # 3 candidates: jpeg, corrupted, photo
    strong = perturb(text, span, "synonym", "strong", 0)
    assert (weak.n_edits, strong.n_edits) == (1, 2)
    text, span = fill_template("a bad photo of a {}.", "dog")  # 2 candidates: rate 0.5 is 1, strong is 2
    assert perturb(text, span, "synonym", 0.5, 0).n_edits == 1
    assert perturb(text, span, "synonym", "strong", 0).n_edits == 2
    assert [perturb(text, span, "context", lvl, 0).n_edits for lvl in ("weak", "strong")] == [1, 2]


def test_edit_count_rules():
    assert [edit_count("mask", 0.0, n) for n in (0, 1, 5)] == [0, 0, 0]
    assert [edit_count("mask", "weak", n) for n in (0, 1, 2, 4, 20)] == [0, 1, 1, 1, 2]
    assert [edit_count("mask", "strong", n) for n in (0, 1, 2, 4, 20)] == [0, 1, 2, 2, 10]
    assert [edit_count("shuffle", "weak", n) for n in (0, 1, 2, 5)] == [0, 0, 2, 2]
    assert [edit_count("shuffle", "strong", n) for n in (2, 3, 5, 8)] == [2, 3, 3, 4]
    assert edit_count("drop", 1.0, 7) == 7 and edit_count("drop", 0.01, 7) == 1


def test_rate_zero_is_the_identity():
    text, span = fill_template("a bad photo of a large {} in a video game.", "dog")
    for op in OPS:
        assert perturb(text, span, op, 0.0, 3) == (text, 0, span)
    assert parse_perturbations("drop:0")[0].label == "drop:0"


def test_no_candidate_leaves_the_text_unchanged():
    text, span = fill_template("{}.", "dog")
    for op in ("synonym", "mask", "shuffle", "drop"):
        assert perturb(text, span, op, 0.5, 0) == (text, 0, span)
    text, span = fill_template("the {} of a", "dog")  # only stop words around the class
    assert perturb(text, span, "synonym", 1.0, 0) == (text, 0, span)


def test_context_adds_one_phrase_weak_and_two_of_other_groups_strong(lexicon):
    text, span = fill_template("a photo of a {} in a video game.", "dog")
    group_of = {p: g for g, phrases in lexicon.noise_phrases.items() for p in phrases}
    for seed in SEEDS:
        out = perturb(text, span, "context", "weak", seed)
        assert out.n_edits == 1
        assert any(out.text.replace(f" {p}", "", 1) == text for p in group_of)
        out = perturb(text, span, "context", "strong", seed)
        used = [p for p in group_of if f" {p}" in out.text]
        assert out.n_edits == 2 == len({group_of[p] for p in used}), out
        rest = out.text
        for p in used:
            rest = rest.replace(f" {p}", "", 1)
        assert rest == text


# --- lexicons ------------------------------------------------------------------------------


def test_shipped_lexicon_covers_every_content_word_of_the_60_templates(lexicon):
    uncovered = set()
    for template in TEMPLATES:
        text, span = fill_template(template, "dog")
        parts = split_prompt(text, span)
        covered = {i for a, b in synonym_candidates(parts.units, parts.cls, lexicon) for i in range(a, b)}
        uncovered |= {u for i, u in enumerate(parts.units)
                      if i != parts.cls and i not in covered and u.lower() not in lexicon.stopwords}
    assert not uncovered
    assert {"low resolution", "black and white", "hard to see", "video game", "itap"} <= set(lexicon.synonyms)


def test_shipped_lexicon_entries_have_two_synonyms(lexicon):
    short = {word: syns for word, syns in lexicon.synonyms.items() if len(syns) < 2}
    assert not short
    assert sum(len(p) for p in lexicon.noise_phrases.values()) >= 15 and len(lexicon.noise_phrases) >= 3
    assert {"a", "an", "the", "of", "in"} <= lexicon.stopwords
    assert not set(lexicon.synonyms) & lexicon.stopwords


def test_shipped_lexicon_has_no_loose_synonyms(lexicon):
    loose = {"good": "decent", "cool": "great", "jpeg": "compressed", "tattoo": "body art", "cartoon": "animated",
             "graffiti": "street art", "bad": "terrible", "large": "huge", "small": "tiny", "toy": "plaything"}
    assert not {key for key, word in loose.items() if word in lexicon.synonyms[key]}


def test_article_agreement_after_edits():
    text, span = fill_template("an image of a {}.", "dog")
    replaced = {perturb(text, span, "synonym", "weak", seed).text for seed in range(10)}
    assert replaced == {"a picture of a dog.", "a photo of a dog.", "a photograph of a dog."}
    text, span = fill_template("a origami {}.", "owl")
    assert perturb(text, span, "drop", 1 / 3, 2).text in ("an owl.", "origami owl.")
    assert {perturb(text, span, "drop", 1 / 3, s).text for s in range(10)} == {"an owl.", "origami owl."}
    assert perturb(text, span, "mask", 1 / 3, 0).text in ("[MASK] origami owl.", "a [MASK] owl.")  # no "an [MASK]"


def test_wants_an_follows_the_sound():
    from promptbench_vlm.articles import agree, wants_an

    an = ["apple", "hour", "honest", "MRI", "8-bit", "18th", "élan", '"old"', "X-ray", "unimportant", "onion"]
    a = ["unicorn", "university", "European", "one", "one-off", "UFO", "USB", "user", "yellow", "3D", "hotel"]
    assert [w for w in an if wants_an(w) is not True] == [] and [w for w in a if wants_an(w) is not False] == []
    assert wants_an("[MASK]") is None and wants_an("<unk>") is None and wants_an("北京") is None
    assert (agree("A", "image"), agree("An", "photo"), agree("AN", "photo"), agree("a", "[MASK]")) == ("An", "A", "A", "a")


def test_a_class_name_led_by_a_compatibility_digit_or_letter_perturbs_without_error():
    from promptbench_vlm.articles import wants_an

    assert wants_an("²nd") is None and wants_an("ⓐpple") is None  # digit/letter only after NFKD: cannot tell
    for name in ("²nd place", "ⓐpple"):  # shuffle puts the template's "a" in front of the class name
        text, span = fill_template("a photo of the {}.", name)
        outs = {perturb(text, span, "shuffle", "strong", seed).text for seed in range(20)}
        assert any(f"a {name}" in out for out in outs) and all(name in out for out in outs)


def test_multi_word_entries_match_as_one_candidate(lexicon):
    text, span = fill_template("a low resolution photo of the hard to see {}.", "dog")
    parts = split_prompt(text, span)
    found = [" ".join(parts.units[a:b]) for a, b in synonym_candidates(parts.units, parts.cls, lexicon)]
    assert found == ["low resolution", "photo", "hard to see"]


def test_user_lexicon_file(tmp_path):
    path = tmp_path / "lex.json"
    path.write_text(json.dumps({"Photo": ["snap", "photo"], "big dog": ["large hound"]}))
    lex = load_lexicon(path, mask_token="<unk>")
    assert lex.synonyms == {"photo": ("snap",), "big dog": ("large hound",)}
    text, span = fill_template("A photo of a {}.", "dog")
    assert perturb(text, span, "synonym", 0.1, 0, lex)[:2] == ("A snap of a dog.", 1)
    text, span = fill_template("Photo of a {}.", "dog")
    assert perturb(text, span, "synonym", 0.1, 0, lex).text == "Snap of a dog."
    assert perturb(text, span, "mask", 1.0, 0, lex).text == "<unk> <unk> <unk> dog."


@pytest.mark.parametrize(
    "content, problem",
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a non-empty JSON object"),
        ('{"photo": "picture"}', "must be a list of strings"),
        ('{"photo": ["photo"]}', "no synonym different"),
    ],
)
def test_broken_user_lexicon_is_a_clear_error(tmp_path, content, problem):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(UserError, match=problem) as info:
        load_lexicon(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_user_lexicon_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        load_lexicon(tmp_path / "nope.json")
    with pytest.raises(UserError, match="mask token"):
        load_lexicon(mask_token=" ")


def test_shipped_lexicon_is_cached():
    assert load_lexicon() is load_lexicon()


# --- parsing -------------------------------------------------------------------------------


def test_parse_perturbations_good_inputs():
    assert parse_perturbations("") == [] == parse_perturbations("none")
    specs = parse_perturbations("synonym:0.3, drop:weak,mask,context:strong")
    assert specs == [PerturbSpec("synonym", 0.3), PerturbSpec("drop", 0.1, "weak"), PerturbSpec("mask", 0.1, "weak"),
                     PerturbSpec("context", 0.5, "strong")]
    assert [s.label for s in specs] == ["synonym:0.3", "drop:weak", "mask:weak", "context:strong"]
    default = parse_perturbations("default")
    assert [s.label for s in default] == [f"{op}:{lvl}" for op in DEFAULT_OPS for lvl in ("weak", "strong")]
    assert parse_perturbations("default,synonym:weak") == default
    assert parse_perturbations("drop:1,drop:0")[0].label == "drop:1"


@pytest.mark.parametrize(
    "text, message",
    [
        ("synonm:weak", "Did you mean 'synonym'"),
        ("synonym:1.5", "synonym:1.5"),
        ("drop:-0.1", "outside"),
        ("mask:lots", "mask:lots"),
        ("mask:nan", "outside"),
        ("mask:", "neither a level"),
    ],
)
def test_parse_perturbations_bad_inputs(text, message):
    with pytest.raises(UserError, match=message):
        parse_perturbations(text)


def test_perturb_rejects_bad_op_and_rate():
    text, span = fill_template("a photo of a {}.", "dog")
    with pytest.raises(UserError, match="Valid"):
        perturb(text, span, "swap", 0.1, 0)
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        perturb(text, span, "mask", 1.5, 0)
    with pytest.raises(UserError):
        PerturbSpec("mask", 0.2, "weak")


def test_fill_template():
    assert fill_template("a photo of a {}.", "golden retriever") == ("a photo of a golden retriever.", (13, 29))
    for bad in ("no slot", "{} and {}"):
        with pytest.raises(UserError):
            fill_template(bad, "dog")
    with pytest.raises(UserError):
        fill_template("a {}", " ")


# class names that are template words, lexicon words and their synonyms, articles, the mask
# token, noise-phrase words, punctuation-glued, or take "an" where their neighbours take "a"
CELL_NAMES = ["dog", "apple", "owl", "hour", "unicorn", "a", "an", "A", "photo", "picture", "image of", "[MASK]",
              "low resolution", "itap", "the", "of", "dog.", "(dog)", "Ærø", "²nd", "8-bit", "MRI", "black and white",
              "bright", "in", "cat", "elephant"]


@pytest.mark.parametrize("op", OPS)
def test_a_cell_perturbed_at_once_equals_its_prompts_perturbed_one_by_one(lexicon, op):
    # perturb_many shares the text around the class unit between the class names of a template:
    # the names above must each still get what perturb gives them alone
    for template in load_templates().templates:
        filled = [fill_template(template, name) for name in CELL_NAMES]
        for amount, seed in (("weak", 0), ("strong", 1), (1.0, 2)):
            alone = [perturb(text, span, op, amount, seed, lexicon) for text, span in filled]
            assert perturb_many(filled, op, amount, seed, lexicon) == alone, template


@pytest.mark.parametrize(("template", "name", "op", "amount", "seed"), [
    ("a origami {}.", "origami", "drop", "weak", 1),  # a template word: "a origami." stays the template's pair
    ("art of a {}.", "art", "shuffle", "strong", 0),
    ("a doodle of a {}.", "idle", "synonym", "strong", 2),  # a word of a synonym ("idle drawing")
])
def test_a_class_name_that_an_edit_can_write_is_not_given_another_names_text(lexicon, template, name, op, amount,
                                                                              seed):
    filled = [fill_template(template, other) for other in ("dog", "apple", "owl", "elephant", name)]
    alone = [perturb(text, span, op, amount, seed, lexicon) for text, span in filled]
    assert perturb_many(filled, op, amount, seed, lexicon) == alone
