"""open_clip's BPE tokenizer with the same token ids at a fraction of the cost on prompt strings.

Two costs of `open_clip.tokenizer.SimpleTokenizer` are avoidable for the strings an evaluation
makes (tens of thousands of short prompts):

- Every string goes through ``ftfy.fix_text``, about 40 % of tokenisation time. On printable
  ASCII without ``&`` it is the identity: its steps repair mojibake, curly quotes, ligatures,
  full-width forms, control characters, line breaks and HTML entities, none of which such a
  string can hold (tested on the shipped templates x CoOp class names and on random ASCII).
  Those strings skip it; every other string takes open_clip's own path.
- The evaluator tokenises a batch's strings to sort them by token length and the learner
  tokenises them again to encode; recent results are remembered, so the second pass is a look-up.
- Per string, open_clip's ``encode`` passes its compiled pattern to ``regex.findall`` (a cache
  and locale look-up per call), reads its tables through attribute look-ups per byte and maps
  bytes to BPE characters one by one. Here the pattern's own ``findall`` runs, the tables are
  bound once, and the byte map is one ``str.translate`` (latin-1 decoding turns each byte into
  the character of its value, which the table maps as ``byte_encoder`` does). Same tokens, same
  order: about half the cost of a string.

Anything other than a SimpleTokenizer with one of open_clip's cleaning functions is used as is.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

from open_clip import tokenizer as oc_tokenizer

ENCODE_MEMO = 65536
"""Strings whose token ids are remembered: twice the window `in_token_order` sorts at once."""

# open_clip's cleaning functions, each without its ftfy step (basic_clean minus fix_text is strip()
# when the string holds no '&' for html.unescape to act on)
_WITHOUT_FTFY: dict[Callable[[str], str], Callable[[str], str]] = {
    oc_tokenizer._clean_lower: lambda text: oc_tokenizer.whitespace_clean(text.strip()).lower(),
    oc_tokenizer._clean_whitespace: lambda text: oc_tokenizer.whitespace_clean(text.strip()),
    oc_tokenizer._clean_canonicalize: lambda text: oc_tokenizer.canonicalize_text(text.strip()),
}


def ftfy_is_identity(text: str) -> bool:
    """True for strings ``ftfy.fix_text`` and ``html.unescape`` leave unchanged by construction:
    printable ASCII (space to ``~``) without ``&``."""
    return text.isascii() and text.isprintable() and "&" not in text


class FastTokenizer:
    """A SimpleTokenizer that skips ftfy where it cannot change the text and remembers recent
    encodings; its token ids equal the wrapped tokenizer's for every string.

    Open_clip's own ``__call__`` and ``encode`` run on this object (attributes it does not
    define come from the wrapped tokenizer), so truncation, special tokens and context length
    follow open_clip exactly.
    """

    def __init__(self, inner: oc_tokenizer.SimpleTokenizer):
        self._inner = inner
        self._full_clean = inner.clean_fn
        self._short_clean = _WITHOUT_FTFY[inner.clean_fn]
        self._byte_table = dict(inner.byte_encoder)  # byte value -> BPE character, for str.translate
        self._memo = functools.lru_cache(maxsize=ENCODE_MEMO)(self._encode_uncached)

    def __getattr__(self, name: str) -> Any:
        if name == "_inner":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self._inner, name)

    def clean_fn(self, text: str) -> str:
        return self._short_clean(text) if ftfy_is_identity(text) else self._full_clean(text)

    def _encode_uncached(self, text: str) -> list[int]:
        """open_clip's `SimpleTokenizer.encode` (clean, split by its pattern, BPE per piece)."""
        encoder, bpe, table = self._inner.encoder, self._inner.bpe, self._byte_table
        tokens: list[int] = []
        for piece in self._inner.pat.findall(self.clean_fn(text)):
            chars = piece.encode("utf-8").decode("latin-1").translate(table)
            tokens.extend(encoder[part] for part in bpe(chars).split(" "))
        return tokens

    def encode(self, text: str) -> list[int]:
        return list(self._memo(text))

    def forget(self) -> None:
        """Drop the remembered encodings, so that a benchmark's repeated runs each tokenise from
        scratch, as a new process does."""
        self._memo.cache_clear()

    def token_count(self, text: str) -> int:
        """Tokens of `text` including start and end of text, before truncation."""
        return len(self._memo(text)) + 2

    def __call__(self, texts: str | list[str], context_length: int | None = None):
        return oc_tokenizer.SimpleTokenizer.__call__(self, texts, context_length)


def fast_tokenizer(tokenizer: Any) -> Any:
    """`FastTokenizer` around open_clip's SimpleTokenizer; any other tokenizer unchanged."""
    if isinstance(tokenizer, oc_tokenizer.SimpleTokenizer) and tokenizer.clean_fn in _WITHOUT_FTFY:
        return FastTokenizer(tokenizer)
    return tokenizer


def in_token_order(tokenizer: Any, texts: Sequence[str]) -> list[str]:
    """`texts`, given in order of character count, in order of token count within windows of
    half `ENCODE_MEMO` strings: batches cut from the result hold strings of nearly equal length,
    as a global sort would give them (character order alone left 7 % more padding on the toy
    world), and a window's encodings are still remembered when its strings are encoded."""
    window = ENCODE_MEMO // 2
    return [t for w0 in range(0, len(texts), window)
            for t in sorted(texts[w0 : w0 + window], key=lambda t: token_count(tokenizer, t))]


def token_count(tokenizer: Any, text: str) -> int:
    """Sequence length of `text` where the tokenizer tells it cheaply, else its character count:
    the key prompts are sorted by so that a batch's strings are padded to similar lengths."""
    count = getattr(tokenizer, "token_count", None)
    return count(text) if count is not None else len(text)
