"""The `toy-shapes` dataset: coloured shapes drawn with Pillow, plus the caption grammar.

Every image is a pure function of ``(split, index, seed)``: nothing is read from or written to
disk. Image ``index`` has class ``index % 48`` (so every prefix of a split is class-balanced)
and nuisance factors drawn independently of the class:

- background: dark, mid or bright (with a random tint);
- size: small, medium or large;
- blur (Gaussian) and pixelation (block down-sampling), each on or off;
- many: two to four copies of the object instead of one;
- cropped: the object partly out of frame;
- style: filled, outline, or sketch-like jittered strokes.

Shapes stand upright with a small tilt: with free rotation, toy CLIPs trained for minutes on
2 CPU cores learned colour but hardly shape (about 20 % accuracy).

A class is ``"<colour> <shape>"`` (8 colours x 6 shapes = 48 classes); the colours include the
confusable pairs orange/yellow, purple/blue and red/pink, and each image jitters its colour, so
accuracy is not saturated. Class ids follow the sorted class names, so the CoOp/Dassl base/new
rule (base = first ``ceil(C/2)`` labels) of `promptbench_vlm.data.base` applies unchanged.

Splits have fixed sizes per class: train 64, val 8, test 20. The toy-clip trainer
(`promptbench_vlm.toy.train`) draws more training images than the split holds by rendering
train indices past the split's end (`render`), still deterministic and never overlapping val or
test, whose random streams are separate.

Light: the splits are lit by a warm lamp (channel gains R 1.25, G 1, B 0.75), the toy CLIP's
pretraining pool by neutral light. The warm cast moves colours towards their neighbours (pink
turns salmon, purple magenta, brown rust, yellow orange-ish), so the pretrained text
classifier no longer sits on the classes' image features, while the features still separate
them: zero-shot drops below a linear probe on the frozen features, the room that few-shot
prompt learning has on real CLIP benchmarks (measured with `promptbench_vlm.toy.probe`;
docs/toy-world.md). The light is a property of the domain, not a per-image nuisance, and no
caption names it.

`caption` is the grammar the toy CLIP is trained on: the class name plus, sometimes, words of the
60 PromptSRC templates for the nuisance factors actually present (``dark``, ``blurry``,
``pixelated``, ``low resolution``, ``cropped``, ``many``, ``sketch``, ``doodle``, ...). Because
those words sometimes appear and sometimes not, the trained text tower reacts to template
wording the way web-trained CLIP does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..data import DatasetOptions, DatasetSource
from ..data.base import ImageDataset
from ..names import unknown_name_error

IMAGE_SIZE = 32
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down, so edges are anti-aliased
SPLIT_SIZES = {"train": 64, "val": 8, "test": 20}  # images per class
_SPLIT_STREAMS = {"train": 0, "val": 1, "test": 2}

COLOURS: dict[str, tuple[int, int, int]] = {
    "blue": (45, 80, 215),
    "brown": (125, 80, 40),
    "green": (45, 165, 60),
    "orange": (240, 145, 35),
    "pink": (235, 125, 175),
    "purple": (130, 65, 195),
    "red": (210, 40, 40),
    "yellow": (230, 205, 45),
}
SHAPES = ("circle", "cross", "heart", "square", "star", "triangle")
CLASSNAMES = sorted(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)

COLOUR_JITTER = 20  # per-channel uniform jitter of the object colour
MAX_TILT = 0.3  # shapes stand upright, tilted a little (radians, ~2 sd); any rotation made shape unlearnable at this scale
BACKGROUND_LEVELS = {"dark": (10, 60), "mid": (90, 150), "bright": (190, 245)}
SIZE_RADII = {"small": (4.0, 6.0), "medium": (7.0, 9.5), "large": (10.5, 14.0)}
P_BLUR, P_PIXELATED, P_MANY, P_CROPPED = 0.2, 0.15, 0.15, 0.15
STYLES, STYLE_PROBS = ("filled", "outline", "sketch"), (0.6, 0.2, 0.2)

# Channel gains of the light a scene is lit by. The toy CLIP is pretrained on `PRETRAIN_LIGHT`
# images; the toy-shapes splits are lit by `DATASET_LIGHT`, a shift the pretraining never saw.
LIGHTS: dict[str, tuple[float, float, float]] = {"neutral": (1.0, 1.0, 1.0), "warm": (1.25, 1.0, 0.75)}
PRETRAIN_LIGHT, DATASET_LIGHT = "neutral", "warm"

P_BARE_CAPTION = 0.15  # a caption that is the class name alone
P_WORD = 0.5  # each present nuisance is named with this probability


@dataclass(frozen=True)
class Factors:
    """The nuisance factors of one image; independent of its class."""

    background: str  # dark | mid | bright
    size: str  # small | medium | large
    blur: bool
    pixelated: bool
    many: bool
    cropped: bool
    style: str  # filled | outline | sketch


def _rng(split: str, index: int, seed: int) -> np.random.Generator:
    """One independent random stream per image, so images can be drawn in any order."""
    return np.random.default_rng([seed, _SPLIT_STREAMS[split], index])


def _draw_factors(rng: np.random.Generator) -> Factors:
    many = bool(rng.random() < P_MANY)
    return Factors(
        background=str(rng.choice(list(BACKGROUND_LEVELS))),
        size=str(rng.choice(list(SIZE_RADII))),
        blur=bool(rng.random() < P_BLUR),
        pixelated=bool(rng.random() < P_PIXELATED),
        many=many,
        cropped=bool(rng.random() < P_CROPPED) and not many,
        style=str(rng.choice(STYLES, p=STYLE_PROBS)),
    )


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of `shape` centred at (cx, cy) with outer radius `r`, upright at `angle` 0 (radians)."""
    if shape == "circle":
        points = [(r, 2 * math.pi * k / 32) for k in range(32)]
    elif shape == "square":
        points = [(r * 1.15, angle + math.pi / 4 + math.pi / 2 * k) for k in range(4)]
    elif shape == "triangle":
        points = [(r * 1.25, angle - math.pi / 2 + 2 * math.pi * k / 3) for k in range(3)]
    elif shape == "heart":  # the classic parametric heart curve, scaled to radius ~r
        c, s = math.cos(angle), math.sin(angle)
        ts = [2 * math.pi * k / 32 for k in range(32)]
        xy = [(math.sin(t) ** 3, (math.cos(4 * t) + 2 * math.cos(3 * t) + 5 * math.cos(2 * t) - 13 * math.cos(t)) / 16) for t in ts]
        return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in xy]
    elif shape == "star":
        points = [(r * (1.2 if k % 2 == 0 else 0.5), angle - math.pi / 2 + math.pi / 5 * k) for k in range(10)]
    else:  # cross: a plus sign, arms of half-width w
        w = 0.35 * r
        corners = [(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r), (-w, -r), (-w, -w), (-r, -w), (-r, w), (-w, w), (-w, r)]
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in corners]
    return [(cx + d * math.cos(a), cy + d * math.sin(a)) for d, a in points]


def _centres(f: Factors, r: float, rng: np.random.Generator) -> list[tuple[float, float]]:
    """Object centres in image pixels: inside the frame, or straddling an edge when cropped."""
    size = IMAGE_SIZE
    if f.many:
        return [tuple(rng.uniform(r, size - r, 2)) for _ in range(int(rng.integers(2, 5)))]
    if not f.cropped:
        return [tuple(rng.uniform(min(r, size / 2), max(size - r, size / 2), 2))]
    along = rng.uniform(r, size - r) if r < size / 2 else size / 2
    depth = rng.uniform(-0.2 * r, 0.35 * r)  # centre this far inside the edge: a third or more is cut off
    side = int(rng.integers(4))
    x, y = [(depth, along), (size - depth, along), (along, depth), (along, size - depth)][side]
    return [(x, y)]


def _draw_object(draw: ImageDraw.ImageDraw, points: list, colour: tuple, style: str, r: float, rng) -> None:
    """Draw one shape (points in supersampled pixels) filled, outlined or sketched."""
    if style == "filled":
        draw.polygon(points, fill=colour)
    elif style == "outline":
        draw.line(points + points[:1], fill=colour, width=max(SUPERSAMPLE, int(0.22 * r)), joint="curve")
    else:  # sketch: two loose, thin, jittered strokes
        for _ in range(2):
            jitter = rng.normal(0, 0.1 * r, (len(points), 2))
            stroke = [(x + dx, y + dy) for (x, y), (dx, dy) in zip(points, jitter)]
            draw.line(stroke + stroke[:1], fill=colour, width=max(SUPERSAMPLE, int(0.15 * r)))


def render(split: str, index: int, seed: int = 0, light: str = DATASET_LIGHT) -> tuple[Image.Image, int, Factors]:
    """Draw image `index` of `split` (any index >= 0, also past the split's fixed size).

    `light` (a key of `LIGHTS`) scales the colour channels; the splits are `DATASET_LIGHT`, the toy
    CLIP's pretraining pool `PRETRAIN_LIGHT`. Factors and label do not depend on it.

    Returns:
        The RGB image, its label (``index % 48``) and its nuisance factors.
    """
    rng = _rng(split, index, seed)
    f = _draw_factors(rng)
    label = index % len(CLASSNAMES)
    colour_name, shape = CLASSNAMES[label].split(" ")
    return draw_scene(rng, f, colour_name, shape, LIGHTS[light]), label, f


def draw_scene(rng: np.random.Generator, f: Factors, colour_name: str, shape: str,
               gains: tuple[float, float, float]) -> Image.Image:
    """Draw one scene: a `colour_name` `shape` with nuisance factors `f`, lit with channel `gains`.

    The one drawing routine of the toy world: `render` (the toy-shapes splits and the toy CLIP's
    pretraining pool) and the transfer targets of `toy.transfer` (other classes, other domains) all
    draw through it, so a target differs from toy-shapes only in what it sets on purpose.
    """
    lo, hi = BACKGROUND_LEVELS[f.background]
    bg = np.clip(rng.uniform(lo, hi) + rng.uniform(-15, 15, 3), 0, 255).astype(int)
    colour = np.clip(np.array(COLOURS[colour_name]) + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, 3), 0, 255)
    size_name = "medium" if f.many and f.size == "large" else f.size
    r = rng.uniform(*SIZE_RADII[size_name])
    big = IMAGE_SIZE * SUPERSAMPLE
    image = Image.new("RGB", (big, big), tuple(int(v) for v in bg))
    draw = ImageDraw.Draw(image)
    for cx, cy in _centres(f, r, rng):
        points = _polygon(shape, cx * SUPERSAMPLE, cy * SUPERSAMPLE, r * SUPERSAMPLE, rng.normal(0, MAX_TILT / 2))
        _draw_object(draw, points, tuple(int(v) for v in colour), f.style, r * SUPERSAMPLE, rng)
    image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    if f.blur:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.6, 1.2)))
    if f.pixelated:
        small = int(rng.choice([8, 10, 12]))
        image = image.resize((small, small), Image.Resampling.BOX).resize((IMAGE_SIZE,) * 2, Image.Resampling.NEAREST)
    noise = rng.normal(0, 5, (IMAGE_SIZE, IMAGE_SIZE, 3))
    pixels = np.clip(np.asarray(image, dtype=np.float64) * gains + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def factors(split: str, index: int, seed: int = 0) -> Factors:
    """The nuisance factors of image `index`, without drawing it (for captions)."""
    return _draw_factors(_rng(split, index, seed))


class ToyShapes(ImageDataset):
    """One split of the procedural toy world (see the module docstring).

    Raises:
        UserError: for a split other than train, val or test.
    """

    def __init__(self, split: str = "test", seed: int = 0):
        if split not in SPLIT_SIZES:
            raise unknown_name_error("toy-shapes split", split, SPLIT_SIZES)
        self.split = split
        self.seed = seed
        self.name = "toy-shapes"
        self.classnames = list(CLASSNAMES)
        n_images = SPLIT_SIZES[split] * len(CLASSNAMES)
        self.labels = [i % len(CLASSNAMES) for i in range(n_images)]

    def load(self, index: int) -> Image.Image:
        self._check(index)
        return render(self.split, index, self.seed)[0]

    def factors(self, index: int) -> Factors:
        """The nuisance factors of image `index`."""
        self._check(index)
        return factors(self.split, index, self.seed)

    def describe(self, index: int) -> str:
        return f"toy-shapes/{self.split}/{index}"

    def _check(self, index: int) -> None:
        if not 0 <= index < len(self.labels):
            raise IndexError(f"toy-shapes/{self.split} has {len(self.labels)} images, no index {index}")


def _maybe(rng: np.random.Generator, options: list[str], p: float = P_WORD) -> list[str]:
    """One of `options` with probability `p`, else nothing."""
    return [str(rng.choice(options))] if rng.random() < p else []


def caption(classname: str, f: Factors, rng: np.random.Generator) -> str:
    """A training caption: the class name with, sometimes, template words for nuisances present.

    Shaped like the templates: ``"a dark blurry photo of the small red circle."``, ``"a sketch of
    many blue star."`` (the class name is never inflected, as in ``"a photo of many {}."``), or the
    bare class name. Each present nuisance is named with probability `P_WORD`; absent ones never.
    """
    if rng.random() < P_BARE_CAPTION:
        return classname
    before: list[str] = []
    if f.background != "mid":
        before += _maybe(rng, [f.background])
    if f.blur:
        before += _maybe(rng, ["blurry", "bad"])
    if f.pixelated:
        before += _maybe(rng, ["pixelated", "low resolution", "jpeg corrupted"])
    if f.cropped:
        before += _maybe(rng, ["cropped", "close-up"])
    medium = {"filled": ["photo"], "outline": ["drawing", "sketch"], "sketch": ["sketch", "doodle", "drawing"]}[f.style]
    noun = (_maybe(rng, medium, 0.6) or ["photo"])[0]
    det = str(rng.choice(["a", "the"]))
    if f.many:
        det = (_maybe(rng, ["many"], 0.6) or [det])[0]
    after: list[str] = []
    if f.size == "small":
        after += _maybe(rng, ["small", "hard to see"])
    elif f.size == "large" and not f.many:
        after += _maybe(rng, ["large"])
    return " ".join(["a", *before, noun, "of", det, *after, classname]) + "."


def _load_source(argument: str, options: DatasetOptions) -> ImageDataset:
    """``toy-shapes``, or ``toy-shapes:DOMAIN``: its classes in a shifted domain (`toy.transfer`)."""
    if not argument:
        return ToyShapes(split=options.split)
    from .transfer import load_shifted

    return load_shifted(argument, options)


SOURCE = DatasetSource("toy-shapes[:DOMAIN]", "the embedded procedural toy world (no path); DOMAIN: v2, sketch, "
                       "hard, rendition (shifted test domains, docs/toy-world.md)", _load_source, needs_argument=False)
