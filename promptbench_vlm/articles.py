"""English indefinite-article agreement: "a" or "an" by the sound of the next word.

A perturbation that replaces, drops or moves a word can leave "a image" or "an picture"; readers
of the field take that for noise of the instrument, not of the wording, so `perturb` repairs
the articles whose next word an edit changed. The rule follows the sound, not the letter:
"an hour", "a unicorn", "a one-off", "an MRI", "an 8-bit"; see docs/perturbations.md.
"""

from __future__ import annotations

import functools
import re
import unicodedata

ARTICLES = frozenset({"a", "an"})

# Vowel letters that sound like a consonant ("a unicorn", "a European", "a one-off") ...
_CONSONANT_SOUND = re.compile(
    r"^(uni(?!mp|n|d|ll)|us[aeiu]|ur[aeiou]|ut[eio]|uk|ub[iu]q|eu|ewe|one(?![a-z])|once|ouija)"
)
# ... and consonant letters that are silent ("an hour", "an honest").
_VOWEL_SOUND = re.compile(r"^(hour|honest|honou?r|heir)")
# Upper-case letters whose spoken name starts with a vowel sound, for initialisms ("an MRI").
_VOWEL_NAMED_LETTERS = frozenset("AEFHILMNORSX")


@functools.lru_cache(maxsize=65536)  # asked once per prompt of a table about its class unit
def wants_an(word: str) -> bool | None:
    """Whether `word` takes "an"; None when it cannot tell (no Latin letter or digit in front).

    Leading punctuation is skipped ("an 'old' photo"); a mask token such as ``[MASK]`` has no
    letter in front and gets None, so the article before it is left as it is.
    """
    if word[:1] in "[<{":
        return None
    core = word.lstrip("\"'(«“‘")
    if not core:
        return None
    head = unicodedata.normalize("NFKD", core[0])[0]
    if head.isdigit():
        digits = re.match(r"\d+", core)  # None for a digit only by compatibility ("²", "①")
        if digits is None:
            return None
        return digits[0][0] == "8" or digits[0] in ("11", "18")
    if not ("a" <= head.lower() <= "z"):
        return None
    letters = re.match(r"[^\W\d_]+", core)  # None for a letter only by compatibility ("ⓐ")
    if letters is None:
        return None
    letters = letters[0]
    if len(letters) <= 4 and letters.isupper():  # an initialism or a letter: "an MRI", "an X-ray"
        return head in _VOWEL_NAMED_LETTERS
    lower = (head + core[1:]).lower()
    if _VOWEL_SOUND.match(lower):
        return True
    if _CONSONANT_SOUND.match(lower):
        return False
    return head.lower() in "aeiou"


@functools.lru_cache(maxsize=65536)  # a prompt table asks about the same few pairs again and again
def agree(article: str, next_word: str) -> str:
    """`article` ("a"/"an" in any case) made to agree with `next_word`, keeping its capital."""
    an = wants_an(next_word)
    if an is None:
        return article
    fixed = "an" if an else "a"
    if len(article) > 1 and article.isupper():
        return fixed.upper()
    return fixed.capitalize() if article[:1].isupper() else fixed
