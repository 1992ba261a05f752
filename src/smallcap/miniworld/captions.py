"""Five differently worded reference captions per scene, from templates and synonyms (like COCO's variety).

Every caption names every object's shape (with a synonym); colour, size, count, position and background
are mentioned some of the time, so references agree on content and differ in wording and detail.
"""

from __future__ import annotations

import random

from smallcap.miniworld.world import BACKGROUNDS, COLOURS, IMAGE_SIZE, SHAPES, Domain, Scene, SceneObject, scene_rng

CAPTIONS_PER_IMAGE = 5
NUMBERS = {2: ("two", "a pair of"), 3: ("three",)}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
COLOUR_PROBABILITY = 0.9
SIZE_PROBABILITY = 0.4

# {S}: the objects, {P}: where they are (may be empty), {B}: the background phrase, {bg}: its colour word,
# {be}: "is" or "are" to agree with the first object phrase.
TEMPLATES = (
    "{S}",
    "{S} {B}",
    "{S} {P}",
    "there {be} {S} {P}",
    "a picture of {S} {B}",
    "an image showing {S}",
    "an image of {S} {P}",
    "{S} drawn {B}",
    "a {bg} background with {S}",
    "a simple drawing of {S} {P}",
    "{S} {P} {B}",
)
BACKGROUND_PHRASES = ("on a {bg} background", "against a {bg} backdrop", "over a {bg} background")


def captions_for(scene: Scene, seed: int, n: int = CAPTIONS_PER_IMAGE) -> list[str]:
    """`n` distinct lowercase captions of `scene`, without final punctuation; deterministic in (seed, scene)."""
    rng = scene_rng(seed, scene.domain, scene.index, "captions", scene.stream)
    captions: list[str] = []
    templates = list(TEMPLATES)
    rng.shuffle(templates)
    for attempt in range(20 * n):
        caption = _fill(templates[attempt % len(templates)], scene, rng)
        if caption not in captions:
            captions.append(caption)
        if len(captions) == n:
            return captions
    raise RuntimeError(f"could not write {n} distinct captions for scene {scene.domain}/{scene.index}")


def domain_words(domain: Domain) -> set[str]:
    """The content words (shape and colour names, with synonyms) only this domain's captions can use."""
    words = set()
    for shape in domain.shapes:
        for phrase in SHAPES[shape].singular + SHAPES[shape].plural:
            words.update(phrase.split())
    for colour in domain.colours:
        words.update(COLOURS[colour].words)
    return words - {"shape", "shapes"}  # "round shape", "star shape": the word "shape" itself is shared by all


def caption_tokens(caption: str) -> list[str]:
    """Karpathy-style tokens: lowercase words without punctuation."""
    return caption.lower().replace(",", " ").replace(".", " ").split()


def _fill(template: str, scene: Scene, rng: random.Random) -> str:
    groups = _groups(scene.objects)
    bg = rng.choice(BACKGROUNDS[scene.background][1])
    subject, position = _subject_and_position(groups, rng)
    be = "is" if len(groups[0]) == 1 else "are"
    text = template.format(S=subject, P=position, B=rng.choice(BACKGROUND_PHRASES).format(bg=bg), bg=bg, be=be)
    return " ".join(text.split())


def _groups(objects: list[SceneObject]) -> list[list[SceneObject]]:
    """Objects of equal shape and colour form one group ("two red circles"), ordered left to right."""
    groups: dict[tuple[str, str], list[SceneObject]] = {}
    for obj in sorted(objects, key=lambda o: o.x):
        groups.setdefault((obj.shape, obj.colour), []).append(obj)
    return list(groups.values())


def _group_phrase(group: list[SceneObject], rng: random.Random) -> str:
    first = group[0]
    words = []
    if len({o.size for o in group}) == 1 and rng.random() < SIZE_PROBABILITY:
        words.append(rng.choice(SIZE_WORDS[first.size]))
    if rng.random() < COLOUR_PROBABILITY:
        words.append(rng.choice(COLOURS[first.colour].words))
    shape = SHAPES[first.shape]
    if len(group) == 1:
        words.append(rng.choice(shape.singular))
        return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)
    return rng.choice(NUMBERS[len(group)]) + " " + " ".join(words + [rng.choice(shape.plural)])


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _subject_and_position(groups: list[list[SceneObject]], rng: random.Random) -> tuple[str, str]:
    phrases = [_group_phrase(g, rng) for g in groups]
    if len(groups) == 1:
        return phrases[0], _where(groups[0], rng)
    if len(groups) == 2 and len(groups[0]) == len(groups[1]) == 1 and rng.random() < 0.5:
        return f"{phrases[0]} {_relation(groups[0][0], groups[1][0], rng)} {phrases[1]}", ""
    return _join(phrases), ""


def _where(group: list[SceneObject], rng: random.Random) -> str:
    """Where a group's centre lies, in thirds of the image."""
    x = sum(o.x for o in group) / len(group)
    y = sum(o.y for o in group) / len(group)
    column = ("left", "center", "right")[min(2, int(3 * x / IMAGE_SIZE))]
    row = ("top", "middle", "bottom")[min(2, int(3 * y / IMAGE_SIZE))]
    if column == "center" and row == "middle":
        return rng.choice(("in the middle", "in the center"))
    if row == "middle":
        return rng.choice((f"on the {column}", f"on the {column} side"))
    if column == "center":
        return rng.choice((f"at the {row}", f"near the {row}"))
    return rng.choice((f"in the {row} {column} corner", f"at the {row} {column}"))


def _relation(a: SceneObject, b: SceneObject, rng: random.Random) -> str:
    """How `a` lies relative to `b` (image y grows downwards)."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dy) > abs(dx):
        return "above" if dy < 0 else "below"
    return rng.choice(("to the left of" if dx < 0 else "to the right of", "next to"))


def _word_index() -> tuple[dict[str, str], dict[str, str]]:
    """Each shape and colour word -> its canonical name ("disc" -> "circle", "violet" -> "purple")."""
    shapes = {word: shape.name for shape in SHAPES.values() for phrase in shape.singular + shape.plural
              for word in phrase.split() if word not in ("shape", "shapes")}
    colours = {word: colour.name for colour in COLOURS.values() for word in colour.words}
    return shapes, colours


_SHAPE_OF_WORD, _COLOUR_OF_WORD = _word_index()


def mentions(caption: str) -> tuple[frozenset[str], frozenset[str]]:
    """The shapes and colours (canonical names) a caption of any domain mentions, read back from its words."""
    words = caption_tokens(caption)
    return (frozenset(_SHAPE_OF_WORD[w] for w in words if w in _SHAPE_OF_WORD),
            frozenset(_COLOUR_OF_WORD[w] for w in words if w in _COLOUR_OF_WORD))


def describes_content(caption: str, scene: Scene) -> bool:
    """True when a caption names exactly the scene's shapes and no colour the scene lacks (any wording)."""
    shapes, colours = mentions(caption)
    return shapes == {o.shape for o in scene.objects} and colours <= {o.colour for o in scene.objects}
