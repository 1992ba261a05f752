"""The miniature world: domains of coloured shapes on plain backgrounds, sampled and drawn from a seed.

A scene is one to three objects (shape, colour, size, position) on a background. Domains share the
backgrounds, sizes, positions and the caption language, and differ in their shapes and colours, so a
target domain's content words never occur in a source domain's captions. Scene `i` of a domain depends
only on (seed, domain, i), so a larger world contains the smaller one.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, replace

from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SUPERSAMPLE = 4  # draw at 4x and downsample: anti-aliased edges, like a photo rather than a bitmap


@dataclass(frozen=True)
class Shape:
    """A shape kind and the words captions use for it."""

    name: str
    singular: tuple[str, ...]
    plural: tuple[str, ...]


@dataclass(frozen=True)
class Colour:
    """An object colour, its RGB value and the words captions use for it."""

    name: str
    rgb: tuple[int, int, int]
    words: tuple[str, ...]


@dataclass(frozen=True)
class Domain:
    """A domain is the shapes and colours its objects are drawn from."""

    name: str
    shapes: tuple[str, ...]
    colours: tuple[str, ...]


SHAPES = {s.name: s for s in [
    Shape("circle", ("circle", "disc", "round shape"), ("circles", "discs", "round shapes")),
    Shape("square", ("square", "box", "block"), ("squares", "boxes", "blocks")),
    Shape("triangle", ("triangle", "triangular shape"), ("triangles", "triangular shapes")),
    Shape("star", ("star", "star shape"), ("stars", "star shapes")),
    Shape("heart", ("heart", "heart shape"), ("hearts", "heart shapes")),
    Shape("moon", ("crescent", "moon", "crescent moon"), ("crescents", "moons", "crescent moons")),
]}

COLOURS = {c.name: c for c in [
    Colour("red", (215, 30, 35), ("red", "crimson")),
    Colour("green", (35, 160, 50), ("green",)),
    Colour("blue", (35, 65, 215), ("blue",)),
    Colour("purple", (135, 45, 180), ("purple", "violet")),
    Colour("orange", (250, 135, 10), ("orange",)),
    Colour("yellow", (235, 205, 20), ("yellow",)),
]}

# Shared by all domains: the background colours and the words for them.
BACKGROUNDS = {"white": ((240, 240, 240), ("white",)),
               "black": ((25, 25, 25), ("black", "dark")),
               "gray": ((125, 125, 125), ("gray", "grey"))}

# Object radius in pixels of the 64x64 image, per size word.
SIZES = {"small": (7.5, 9.5), "large": (12.0, 15.0)}

DOMAINS = {d.name: d for d in [
    Domain("source", ("circle", "square", "triangle"), ("red", "green", "blue")),
    Domain("target", ("star", "heart", "moon"), ("purple", "orange", "yellow")),
]}

OBJECT_COUNTS = (1, 2, 3)
OBJECT_COUNT_WEIGHTS = (0.45, 0.35, 0.2)
REPEAT_PROBABILITY = 0.35  # a further object copies the previous one's shape and colour: "two red circles"


@dataclass
class SceneObject:
    """One object: what it is, how big, where (centre in pixels of the 64x64 image) and how it is turned."""

    shape: str
    colour: str
    size: str
    x: float
    y: float
    radius: float
    angle: float


@dataclass
class Scene:
    """Everything an image shows; captions are written from this and only this."""

    domain: str
    index: int
    background: str
    objects: list[SceneObject]
    stream: str = "data"  # "data" for the dataset's images, "web" for the models' pretraining images

    def to_json(self) -> dict:
        """A JSON-ready description (stored beside the captions for analysis)."""
        return {"background": self.background,
                "objects": [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in asdict(o).items()}
                            for o in self.objects]}


def scene_rng(seed: int, domain: str, index: int, purpose: str, stream: str = "data") -> random.Random:
    """A generator that depends only on its arguments; string seeds hash stably across runs and machines."""
    return random.Random(f"{seed}/{stream}/{domain}/{index}/{purpose}")


def sample_scene(domain: Domain, seed: int, index: int, stream: str = "data") -> Scene:
    """Sample scene `index` of `domain` in `stream`: background, then non-overlapping objects."""
    rng = scene_rng(seed, domain.name, index, "scene", stream)
    background = rng.choice(sorted(BACKGROUNDS))
    count = rng.choices(OBJECT_COUNTS, OBJECT_COUNT_WEIGHTS)[0]
    objects: list[SceneObject] = []
    while len(objects) < count:
        if objects and rng.random() < REPEAT_PROBABILITY:
            shape, colour = objects[-1].shape, objects[-1].colour
        else:
            shape, colour = rng.choice(domain.shapes), rng.choice(domain.colours)
        size = rng.choice(sorted(SIZES))
        placed = _place(rng, objects, rng.uniform(*SIZES[size]))
        if placed is None:  # no room left: keep the objects placed so far
            break
        x, y, radius = placed
        objects.append(SceneObject(shape, colour, size, x, y, radius, rng.uniform(-10.0, 10.0)))
    return Scene(domain.name, index, background, objects, stream)


def with_shapes_shifted(scene: Scene, domain: Domain, shift: int, index: int) -> Scene:
    """The same scene (colours, sizes, places) with every shape moved `shift` steps along the domain's shapes:
    images that differ in shape alone, so a model trained on them must learn what shapes look like."""
    shifted = [replace(o, shape=domain.shapes[(domain.shapes.index(o.shape) + shift) % len(domain.shapes)])
               for o in scene.objects]
    return replace(scene, index=index, objects=shifted)


def _place(rng: random.Random, objects: list[SceneObject], radius: float) -> tuple[float, float, float] | None:
    margin = radius + 2.0
    for _ in range(200):
        x, y = rng.uniform(margin, IMAGE_SIZE - margin), rng.uniform(margin, IMAGE_SIZE - margin)
        if all(math.hypot(x - o.x, y - o.y) > radius + o.radius + 3.0 for o in objects):
            return x, y, radius
    return None


def render(scene: Scene, seed: int) -> Image.Image:
    """Draw the scene as a 64x64 RGB image, with slight colour jitter so equal scenes differ in pixels."""
    rng = scene_rng(seed, scene.domain, scene.index, "render", scene.stream)
    canvas = Image.new("RGB", (IMAGE_SIZE * SUPERSAMPLE,) * 2, _jitter(rng, BACKGROUNDS[scene.background][0], 12))
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        colour = _jitter(rng, COLOURS[obj.colour].rgb, 25)
        if obj.shape == "circle":
            cx, cy, r = obj.x * SUPERSAMPLE, obj.y * SUPERSAMPLE, obj.radius * SUPERSAMPLE
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        else:
            draw.polygon(outline(obj, SUPERSAMPLE), fill=colour)
    return canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)


def _jitter(rng: random.Random, rgb: tuple[int, int, int], amount: int) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)


def _unit_outline(shape: str) -> list[tuple[float, float]]:
    """The shape's outline inside the unit circle, pointing up (image y grows downwards)."""
    def polar(radius: float, degrees: float) -> tuple[float, float]:
        return radius * math.cos(math.radians(degrees)), radius * math.sin(math.radians(degrees))

    if shape == "circle":
        return [polar(1.0, 360 * i / 48) for i in range(48)]
    if shape == "square":
        return [polar(1.0, 45 + 90 * i) for i in range(4)]
    if shape == "triangle":
        return [polar(1.0, -90 + 120 * i) for i in range(3)]
    if shape == "star":
        return [polar(1.0 if i % 2 == 0 else 0.45, -90 + 36 * i) for i in range(10)]
    if shape == "heart":
        # The classic parametric heart, 17 units from its centre to its lobes.
        ts = [2 * math.pi * i / 64 for i in range(64)]
        return [(16 * math.sin(t) ** 3 / 17,
                 -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t) + 2) / 17) for t in ts]
    if shape == "moon":
        # Outer half circle, back along a half ellipse that bulges the same way: a crescent.
        outer = [polar(1.0, -90 + 180 * i / 24) for i in range(25)]
        inner = [(0.25 * math.cos(math.radians(a)), math.sin(math.radians(a))) for a in
                 (90 - 180 * i / 24 for i in range(1, 24))]
        return outer + inner
    raise ValueError(f"unknown shape {shape!r}")


_UNIT_OUTLINES = {shape: _unit_outline(shape) for shape in SHAPES}


def outline(obj: SceneObject, scale: float = 1.0) -> list[tuple[float, float]]:
    """The object's outline as polygon corners in pixels (times `scale`): turned by its angle, sized by its radius."""
    cos, sin = math.cos(math.radians(obj.angle)), math.sin(math.radians(obj.angle))
    r, cx, cy = obj.radius * scale, obj.x * scale, obj.y * scale
    return [(cx + r * (px * cos - py * sin), cy + r * (px * sin + py * cos)) for px, py in _UNIT_OUTLINES[obj.shape]]
