"""The wording protocol: which wordings a method may train on, and which it is scored on unseen.

A method that trains on the 60 evaluation templates and is scored on the same 60 can look
robust by memorising them. The protocol splits the template pool, with a fixed seed that is a
setting of the protocol (not the training seed, so every method and seed gets the same split),
into

- **seen**: the wordings every method may train on (ERM's multi-template control, Promise's
  template tasks, PromptSRC's frozen-text target all draw only from these);
- **held-out**: wordings of the same pool no method trains on;
- **out-of-family**: a third set that shares no wording family with the pool
  (``templates/out_of_family.txt``: CoOp's and CLIP's published per-dataset templates).

The pool is split by *family*, not by template: templates that differ only in a determiner
("a sketch of a {}." / "a sketch of the {}.") are near-copies, and one on each side would make
the held-out score a seen score. The family of "a photo of a {}." is always seen: every
learner's context is initialised from "a photo of a", so no learner has not seen it.
Definitions and the measured effect: docs/wordings.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .errors import UserError
from .templates import TemplateSet, load_templates

SEEN, HELD_OUT, OUT_OF_FAMILY = "seen", "held-out", "out-of-family"
POOLS = (SEEN, HELD_OUT, OUT_OF_FAMILY)
DETERMINERS = frozenset({"a", "an", "the", "my", "one", "many"})
INIT_WORDING = "a photo of a {}."
"""The wording the learners' contexts start from; its family is always in the seen pool."""


def family_key(template: str) -> str:
    """The template's words without determiners, lower-cased: near-copies share a key."""
    words = " ".join(template.lower().split()).replace("{}", " {} ").split()
    return " ".join(w for w in words if w not in DETERMINERS)


@dataclass(frozen=True)
class WordingProtocol:
    """How the wordings are split (recorded in every result it produces).

    Attributes:
        pool: Template set split into seen and held-out wordings.
        held_out: Share of the pool's templates held out (whole families, so about this share).
        out_of_family: Template set of the third pool (its templates of a family in `pool` are dropped).
        seed: Seed of the split (fixed across methods and training seeds).
    """

    pool: str = "promptsrc60"
    held_out: float = 1 / 3
    out_of_family: str = "out_of_family"
    seed: int = 0


@dataclass(frozen=True)
class WordingSplit:
    """The three pools of a protocol, in the pool file's order."""

    protocol: WordingProtocol
    seen: tuple[str, ...]
    held_out: tuple[str, ...]
    out_of_family: tuple[str, ...]

    def pools(self) -> dict[str, tuple[str, ...]]:
        """Pool name -> templates: ``seen``, ``held-out``, ``out-of-family``."""
        return {SEEN: self.seen, HELD_OUT: self.held_out, OUT_OF_FAMILY: self.out_of_family}

    def to_dict(self) -> dict[str, Any]:
        """JSON form for result files: the protocol's settings and the three template lists."""
        return {"protocol": asdict(self.protocol), "pools": {k: list(v) for k, v in self.pools().items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WordingSplit:
        pools = data["pools"]
        return cls(WordingProtocol(**data["protocol"]), tuple(pools[SEEN]), tuple(pools[HELD_OUT]),
                   tuple(pools[OUT_OF_FAMILY]))


def split_wordings(protocol: WordingProtocol = WordingProtocol()) -> WordingSplit:
    """Split `protocol.pool` by family into seen and held-out, and load the out-of-family set.

    Families are shuffled with ``default_rng(seed)`` and taken into the held-out pool while
    they fit its target size (the share of the pool's templates, rounded).

    Templates of the out-of-family set whose family is in the pool are left out of it (the
    shipped set shares none with promptsrc60; a user's pool may).

    Raises:
        UserError: a share outside (0, 1), a pool with a single family, or an out-of-family set
            left empty by that rule.
    """
    if not 0 < protocol.held_out < 1:
        raise UserError(f"wording protocol: held_out must be a share between 0 and 1, got {protocol.held_out}")
    pool = load_templates(protocol.pool).templates
    outside = load_templates(protocol.out_of_family).templates
    families: dict[str, list[str]] = {}
    for template in pool:
        families.setdefault(family_key(template), []).append(template)
    outside = tuple(t for t in outside if family_key(t) not in families)  # a user's pool may hold some
    if not outside:
        raise UserError(f"wording protocol: every template of the out-of-family set '{protocol.out_of_family}' "
                        f"shares a family with the pool '{protocol.pool}'")
    anchor = family_key(INIT_WORDING)
    candidates = [k for k in families if k != anchor]
    if not candidates:
        raise UserError(f"wording protocol: the pool '{protocol.pool}' has no family to hold out")
    target = max(1, round(protocol.held_out * len(pool)))
    held: set[str] = set()
    size = 0
    for index in np.random.default_rng(protocol.seed).permutation(len(candidates)):
        key = candidates[index]
        if size + len(families[key]) <= target:
            held.add(key)
            size += len(families[key])
    if not held:  # every family is larger than the target: hold out the smallest one
        held.add(min(candidates, key=lambda k: len(families[k])))
    seen = tuple(t for t in pool if family_key(t) not in held)
    held_out = tuple(t for t in pool if family_key(t) in held)
    return WordingSplit(protocol, seen, held_out, outside)


def subset_name(subset: str, pool: str | None) -> str:
    """A result subset's key: ``base`` without the protocol, ``base@held-out`` with it."""
    return subset if pool is None else f"{subset}@{pool}"


def split_subset_name(name: str) -> tuple[str, str | None]:
    """``base@held-out`` -> (``base``, ``held-out``); ``base`` -> (``base``, None)."""
    subset, _, pool = name.partition("@")
    return subset, pool or None


def evaluation_pools(split: WordingSplit | None, templates: tuple[str, ...]) -> list[tuple[str | None, tuple[str, ...]]]:
    """What to evaluate on: the three pools under the protocol, else one unnamed pool of `templates`."""
    return [(None, templates)] if split is None else list(split.pools().items())


def seen_pool_options(method: type, options: dict[str, Any], split: WordingSplit, seen_file: str) -> dict[str, Any]:
    """The method's options with every template-set option set to the seen pool's file.

    Raises:
        UserError: the user set such an option themselves, or a single-template option names a
            held-out or out-of-family wording (the method would train on it).
    """
    if given := [k for k in method.template_options if k in options]:
        raise UserError(f"method option '{given[0]}' names the wordings {method.name} trains on, which the wording "
                        "protocol sets to its seen pool; drop the option, or pass --wordings all")
    unseen = set(split.held_out) | set(split.out_of_family)
    for key, value in options.items():
        if isinstance(value, str) and value in unseen:
            raise UserError(f"method option {key}={value!r} is a held-out or out-of-family wording; under the "
                            "wording protocol a method may train only on the seen pool")
    return {**options, **{k: seen_file for k in method.template_options}}


def write_seen_pool(path: Any, split: WordingSplit) -> str:
    """Write the seen pool as a template file (what the methods' template options load); return its path."""
    from .files import atomic_path

    header = (f"# seen wordings of the protocol {asdict(split.protocol)}: {len(split.seen)} of the pool's "
              f"{len(split.seen) + len(split.held_out)} templates\n")
    with atomic_path(path) as tmp:
        tmp.write_text(header + "".join(f"{t}\n" for t in split.seen), encoding="utf-8")
    return str(path)


def wording_fields(split: WordingSplit | None, templates: TemplateSet) -> dict[str, Any]:
    """The result's ``run`` fields on wordings: the evaluated templates and, under the protocol,
    the recorded split (settings and the three lists)."""
    if split is None:
        return {"templates_name": templates.name, "templates": list(templates.templates), "wordings": None}
    every = [t for pool in split.pools().values() for t in pool]
    name = f"{split.protocol.pool} (seen + held-out) + {split.protocol.out_of_family}"
    return {"templates_name": name, "templates": every, "wordings": split.to_dict()}


def subset_templates(doc: dict[str, Any], subset: str) -> list[str]:
    """The templates a result subset was evaluated on (its pool under the protocol), in order."""
    pool = split_subset_name(subset)[1]
    wordings = doc["run"].get("wordings")
    if pool is None or not wordings:
        return list(doc["run"]["templates"])
    return list(wordings["pools"][pool])


MODES = ("split", "all")


def protocol_for(mode: str, pool: str, held_out: float = 1 / 3, seed: int = 0,
                 out_of_family: str = "out_of_family") -> WordingProtocol | None:
    """The protocol asked for by ``--wordings MODE``: ``split`` (the protocol on `pool`) or
    ``all`` (None: train as the method says, evaluate on `pool` whole).

    Raises:
        UserError: an unknown mode (listing both).
    """
    from .names import unknown_name_error

    if mode not in MODES:
        raise unknown_name_error("wordings mode", mode, MODES)
    return WordingProtocol(pool, held_out, out_of_family, seed) if mode == "split" else None


def wording_split(mode: str, learner: str, protocol: WordingProtocol) -> tuple[WordingSplit | None, str | None]:
    """The split ``evaluate --wordings MODE`` scores on, and a warning for the user (or None).

    None for ``all``. For ``split``: the split recorded in a learner checkpoint trained under
    the protocol (so its held-out wordings are the ones it never saw), else the split of
    `protocol`, with a warning when the checkpoint was trained without the protocol (its
    "held-out" wordings may be ones it trained on).

    Raises:
        UserError: an unknown mode.
    """
    from .learners import is_checkpoint
    from .learners.base import read_checkpoint

    if protocol_for(mode, protocol.pool) is None:
        return None, None
    if is_checkpoint(learner):
        extra = read_checkpoint(learner)[1].get("extra", {})
        if extra.get("wordings"):
            return WordingSplit.from_dict(extra["wordings"]), None
        if extra.get("method"):
            return split_wordings(protocol), (f"{learner} was trained by '{extra['method']}' without the wording "
                                              "protocol: its held-out wordings may be ones it trained on")
    return split_wordings(protocol), None
