"""The ftfy-free tokenizer gives open_clip's token ids for every string."""

from __future__ import annotations

import ftfy
import open_clip
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

from conftest import COOP_NAMES

from promptbench_vlm.perturb import fill_template, load_lexicon, parse_perturbations
from promptbench_vlm.prompts import build_prompt_table
from promptbench_vlm.templates import load_templates
from promptbench_vlm.tokenizer import FastTokenizer, fast_tokenizer, ftfy_is_identity, token_count

# strings ftfy or html.unescape do change, or that are not plain ASCII: the full path must serve them
HARD_NAMES = ["Bichon Frisé", "crème brûlée", "naïve café", "Pokémon", "cafÃ©", "fish &amp; chips", "R&amp;amp;D",
              "“quoted” dog", "ﬁsh", "ＦＵＬＬ width", "tab\there", "line\r\nbreak", "bell\x07char", "\x1b[31mred",
              "nbsp\xa0space", "日本の犬", "emoji 🐕 dog", "  padded  ", "Zürich tram", "Ærø ferry", "ß strasse"]


@pytest.fixture(scope="module")
def pair():
    reference = open_clip.get_tokenizer("ViT-B-32")
    return reference, fast_tokenizer(open_clip.get_tokenizer("ViT-B-32"))


def test_same_ids_on_the_60_templates_with_coop_and_imagenet_class_names(pair):
    reference, fast = pair
    assert isinstance(fast, FastTokenizer)
    templates = load_templates().templates
    names = COOP_NAMES + list(IMAGENET_CLASSNAMES[::4])
    texts = [fill_template(t, c)[0] for t in templates for c in names]
    assert torch.equal(fast(texts), reference(texts))


def test_same_ids_on_perturbed_prompts(pair):
    reference, fast = pair
    table = build_prompt_table(load_templates().templates[::6], COOP_NAMES + HARD_NAMES, parse_perturbations("default"),
                               1, 0, load_lexicon())
    assert torch.equal(fast(table.texts), reference(table.texts))


def test_same_ids_on_non_ascii_and_html_names(pair):
    reference, fast = pair
    texts = [fill_template(t, c)[0] for t in ("a photo of a {}.", "{}") for c in HARD_NAMES]
    assert not any(ftfy_is_identity(c) for c in HARD_NAMES if c != "  padded  ")
    assert torch.equal(fast(texts), reference(texts))
    assert torch.equal(fast(texts, context_length=8), reference(texts, context_length=8))  # truncation too


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40))
def test_ftfy_changes_no_plain_ascii_string(text):
    if ftfy_is_identity(text):
        assert ftfy.fix_text(text) == text


def test_memo_hands_out_copies_and_counts_tokens(pair):
    reference, fast = pair
    ids = fast.encode("a photo of a dog.")
    ids.append(-1)
    assert fast.encode("a photo of a dog.") == reference.encode("a photo of a dog.")
    assert token_count(fast, "a photo of a dog.") == len(reference.encode("a photo of a dog.")) + 2
    assert token_count(object(), "abc") == 3  # a tokenizer that cannot tell: characters
    assert fast.sot_token_id == reference.sot_token_id and fast.vocab_size == reference.vocab_size


def test_in_token_order_sorts_each_window_by_token_count_and_keeps_every_string(pair, monkeypatch):
    from promptbench_vlm import tokenizer as tok

    _, fast = pair
    texts = sorted((fill_template(t, c)[0] for t in load_templates().templates[:20] for c in COOP_NAMES[:10]), key=len)
    monkeypatch.setattr(tok, "ENCODE_MEMO", 64)  # windows of 32 strings
    ordered = tok.in_token_order(fast, texts)
    assert sorted(ordered) == sorted(texts)
    for w0 in range(0, len(texts), 32):
        window = ordered[w0 : w0 + 32]
        assert sorted(window) == sorted(texts[w0 : w0 + 32])  # a window's strings stay in it
        counts = [token_count(fast, t) for t in window]
        assert counts == sorted(counts)
    assert [token_count(fast, t) for t in ordered] != [token_count(fast, t) for t in texts]  # it did reorder
