"""Property tests of the perturbations over generated class names, templates, rates and seeds.

Each property of docs/perturbations.md is checked on inputs hypothesis makes up: class names
that are lexicon keys or made of lexicon keys, names with punctuation, digits and non-ASCII
letters, templates that are not among the 60 PromptSRC ones, any level or rate, any seed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from promptbench_vlm.perturb import OPS, Lexicon, fill_template, load_lexicon, perturb, split_prompt
from promptbench_vlm.templates import load_templates

SHIPPED = load_lexicon()
TEMPLATES = load_templates("promptsrc60").templates
KEYS = sorted(SHIPPED.synonyms)
# No example database: the suite leaves no .hypothesis folder behind.
FAST = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

# Words a template may be made of: lexicon keys, stop words, vowel- and consonant-initial words
# (for the article rule), punctuation-glued words, and words the lexicon does not know.
VOCABULARY = sorted({*" ".join(KEYS).split(), "a", "an", "the", "of", "in", "my", "image", "owl", "apple", "idea",
                     "hour", "unicorn", "MRI", "garden", "big,", "(small)", "naïve", "café", "42"})
LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZéüßçñøΩж北京"
GLYPHS = LETTERS + "0123456789-'.&()/,!?"

word = st.text(GLYPHS, min_size=1, max_size=8)
classname = st.one_of(
    st.sampled_from(KEYS),  # a lexicon key, single or multi-word ("black and white")
    st.lists(st.sampled_from(VOCABULARY), min_size=1, max_size=3).map(" ".join),  # words that are keys
    st.lists(word, min_size=1, max_size=3).map(" ".join),  # punctuation, digits, non-ASCII
)
generated_template = st.builds(
    lambda before, slot, after, end: " ".join([*before, slot, *after]) + end,
    st.lists(st.sampled_from(VOCABULARY), max_size=6),
    st.sampled_from(["{}", '"{}"', "({})", "{}'s", "{}-like"]),  # characters glued to the class name
    st.lists(st.sampled_from(VOCABULARY), max_size=4),
    st.sampled_from(["", ".", "!", " ."]),
)
template = st.one_of(st.sampled_from(TEMPLATES), generated_template)
op = st.sampled_from(OPS)
amount = st.one_of(st.sampled_from(["weak", "strong"]), st.floats(0.0, 1.0))
seed = st.integers(0, 2**31 - 1)


def with_class_keys(name: str) -> Lexicon:
    """The shipped lexicon plus an entry for the class name and for each of its words."""
    keys = {name.lower(), *(re.sub(r"^\W+|\W+$", "", w).lower() for w in name.split())} - {""}
    extra = {k: ("QQQ", "QQQ RRR") for k in keys if k not in SHIPPED.stopwords}
    return Lexicon({**SHIPPED.synonyms, **extra}, SHIPPED.stopwords, SHIPPED.noise_phrases)


def class_unit(text: str, span: tuple[int, int]) -> str:
    """The class name with whatever is glued to it (the protected unit)."""
    units = split_prompt(text, span)
    return units.units[units.cls]


def assert_class_intact(text: str, span: tuple[int, int], name: str, out) -> None:
    start, end = out.class_span
    assert out.text[start:end] == name, (text, out)
    assert class_unit(out.text, out.class_span) == class_unit(text, span), (text, out)


@FAST
@given(template, classname, op, amount, seed)
def test_class_unit_intact_with_the_shipped_lexicon(template, name, op, amount, seed):
    text, span = fill_template(template, name)
    assert_class_intact(text, span, name, perturb(text, span, op, amount, seed))


@FAST
@given(template, classname, st.sampled_from(["synonym", "shuffle", "context"]), amount, seed)
def test_class_unit_intact_when_the_class_and_its_words_are_lexicon_keys(template, name, op, amount, seed):
    text, span = fill_template(template, name)
    out = perturb(text, span, op, amount, seed, with_class_keys(name))
    assert_class_intact(text, span, name, out)
    if op == "synonym":  # the class's own QQQ entry must never fire inside the class name
        assert "QQQ" not in out.text[out.class_span[0] : out.class_span[1]]


@FAST
@given(template, classname, op, seed)
def test_strong_makes_at_least_as_many_edits_as_weak(template, name, op, seed):
    text, span = fill_template(template, name)
    weak = perturb(text, span, op, "weak", seed)
    strong = perturb(text, span, op, "strong", seed)
    if weak.n_edits and strong.n_edits:
        assert strong.n_edits >= weak.n_edits, (text, weak, strong)


@settings(max_examples=10, deadline=None, database=None)
@given(st.lists(classname, min_size=1, max_size=3), seed)
def test_strong_makes_more_edits_than_weak_on_average_for_every_op(names, seed):
    for op in OPS:
        weak = strong = 0
        for template in TEMPLATES:
            for name in names:
                text, span = fill_template(template, name)
                weak += perturb(text, span, op, "weak", seed).n_edits
                strong += perturb(text, span, op, "strong", seed).n_edits
        assert strong > weak, (op, names)


def some_swap_shows(text: str, span: tuple[int, int]) -> bool:
    """Whether exchanging some two units changes the prompt (false only without two movable units)."""
    units, _, tail, _ = split_prompt(text, span)
    joined = " ".join(units)
    for i in range(len(units)):
        for j in range(i + 1, len(units)):
            swapped = list(units)
            swapped[i], swapped[j] = swapped[j], swapped[i]
            if " ".join(swapped) != joined:
                return True
    return False


@FAST
@given(template, classname, st.one_of(st.sampled_from(["weak", "strong"]), st.floats(0.01, 1.0)), seed)
def test_shuffle_changes_the_prompt_whenever_two_units_can_move(template, name, amount, seed):
    text, span = fill_template(template, name)
    out = perturb(text, span, "shuffle", amount, seed)
    if some_swap_shows(text, span):
        assert out.text != text and out.n_edits >= 2, (text, out)
    else:
        assert out == (text, 0, span)


@FAST
@given(template, classname, op, seed)
def test_rate_zero_is_the_identity(template, name, op, seed):
    text, span = fill_template(template, name)
    assert perturb(text, span, op, 0.0, seed) == (text, 0, span)


def words_around_class(text: str, span: tuple[int, int]) -> list[str]:
    """The prompt's words with the class name as one word (its inner words are not the op's),
    without the final punctuation (which perturb moves up to the last word: "of ." -> "of.")."""
    body = text.rstrip()
    body = body[: len(body) - len(split_prompt(text, span).tail)]
    return [*body[: span[0]].split(), text[span[0] : span[1]], *body[span[1] :].split()]


def plainly_vowel(word: str) -> bool:
    """Starts with a vowel sound by the plainest rule (letters a, i, o; e but not eu/ewe)."""
    w = word.lower()
    return bool(re.match(r"[aio]|e(?!u|we)", w)) and not re.match(r"one\b|once|ouija", w) and not word.isupper()


def plainly_consonant(word: str) -> bool:
    """Starts with a consonant sound by the plainest rule (no h, no initialism, no digit)."""
    return bool(re.match(r"[bcdfgjkpqtvwz]", word.lower())) and not word.isupper()


@FAST
@given(template, classname, op, amount, seed)
def test_no_article_disagreement_created_by_an_edit(template, name, op, amount, seed):
    text, span = fill_template(template, name)
    out = perturb(text, span, op, amount, seed)
    before = words_around_class(text, span)
    old_pairs = set(zip(before, before[1:]))
    after = words_around_class(out.text, out.class_span)
    class_at = len(out.text[: out.class_span[0]].split())
    for at, (article, following) in enumerate(zip(after, after[1:])):
        if at == class_at or (article, following) in old_pairs or article.lower() not in ("a", "an"):
            continue  # the class name is never edited, even when it is "an"
        following = following.lstrip("\"'(")
        if article.lower() == "a":
            assert not plainly_vowel(following), (text, out)
        else:
            assert not plainly_consonant(following), (text, out)


def cases_in_a_process(cases: list, hash_seed: str) -> list:
    code = (
        "import json, sys\n"
        "from promptbench_vlm.perturb import fill_template, perturb\n"
        "out = [list(perturb(*fill_template(t, n), op, a, s)) for t, n, op, a, s in json.load(sys.stdin)]\n"
        "print(json.dumps(out))"
    )
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    done = subprocess.run([sys.executable, "-c", code], input=json.dumps(cases), env=env, capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout)


@settings(max_examples=3, deadline=None, database=None)
@given(st.lists(st.tuples(template, classname, op, amount, seed), min_size=30, max_size=60))
def test_same_output_in_processes_with_different_hash_seeds(cases):
    here = [json.loads(json.dumps(list(perturb(*fill_template(t, n), o, a, s)))) for t, n, o, a, s in cases]
    assert cases_in_a_process(cases, "1") == here
    assert cases_in_a_process(cases, "4242") == here
