"""Natural captions from attribute labels (training), plus plain prompts and held-out paraphrases (evaluation).

Like Multi-Modal CelebA-HQ's attribute-built captions: each face gets 1-5 captions, each caption mentions a
random subset of its confident attributes, through many templates and synonyms (varied colour words, since
the MiniLM text tower confuses close colour words). ``PARAPHRASES`` are never used in training: they measure
how free wording generalises.
"""
from __future__ import annotations

import random
import re

# attribute -> value -> training phrases (noun-phrase fragments that fit "a person with ..." or stand alone)
PHRASES: dict[str, dict[str, list[str]]] = {
    "hair": {
        "black": ["black hair", "jet-black hair", "dark black hair", "raven hair", "very dark hair", "coal black hair", "inky black hair", "black-haired", "dark hair"],
        "brown": ["brown hair", "chestnut hair", "brunette hair", "dark brown hair", "light brown hair", "chocolate brown hair", "walnut-brown hair", "coffee-coloured hair", "brown-haired", "tawny hair"],
        "blond": ["blond hair", "blonde hair", "golden hair", "fair hair", "yellow hair", "straw-coloured hair", "platinum blond hair", "honey-blond hair", "blond-haired", "light golden hair"],
        "red": ["red hair", "ginger hair", "auburn hair", "copper hair", "reddish hair", "orange-red hair", "red-haired", "a redhead", "fiery red hair", "rust-coloured hair"],
        "gray": ["gray hair", "grey hair", "silver hair", "white hair", "greying hair", "ash-grey hair", "grey-haired", "silvery hair", "white-haired", "old grey hair"],
    },
    "skin": {
        "light": ["light skin", "fair skin", "pale skin", "a light complexion", "pale complexion"],
        "medium": ["medium skin tone", "olive skin", "tan skin", "a medium complexion", "light brown skin"],
        "dark": ["dark skin", "deep brown skin", "a dark complexion", "dark brown skin", "black skin"],
    },
    "background": {
        "green": ["a green background", "green foliage behind", "a background of green trees", "a grassy green backdrop", "green plants behind", "an emerald background"],
        "blue": ["a blue background", "a blue sky behind", "a blue backdrop", "a sky-blue background", "a navy blue backdrop", "blue water behind"],
        "white": ["a white background", "a bright white backdrop", "a plain white background", "a pale white wall behind", "an ivory background", "a blank white backdrop"],
        "dark": ["a dark background", "a black background", "a dark backdrop", "a shadowy background", "a night-black backdrop", "deep shadow behind"],
        "gray": ["a gray background", "a grey backdrop", "a dull grey background", "a concrete-grey wall behind"],
        "warm": ["a warm-toned background", "a brown background", "an orange-brown backdrop", "a beige and brown background"],
    },
    "mouth": {
        "open": ["an open mouth", "mouth wide open", "lips parted", "an open-mouthed expression", "jaw dropped open", "a surprised open mouth", "teeth showing through open lips"],
        "closed": ["a closed mouth", "lips closed", "mouth shut", "lips pressed together"],
    },
    "smile": {
        "smiling": ["a smile", "a big smile", "a grin", "a cheerful smile", "a happy smile", "smiling lips", "a delighted look", "a laughing face"],
        "neutral": ["a neutral expression", "a serious expression", "a straight face", "no smile", "a blank expression", "a stern look", "an expressionless face"],
    },
    "yaw": {
        "left": ["head turned to the left", "face turned left", "looking to the left", "facing left", "profile toward the left"],
        "right": ["head turned to the right", "face turned right", "looking to the right", "facing right", "profile toward the right"],
        "frontal": ["facing the camera", "a frontal view", "looking straight ahead", "face toward the viewer"],
    },
    "pitch": {
        "up": ["looking up", "head tilted up", "chin raised", "gazing upward"],
        "down": ["looking down", "head tilted down", "chin lowered", "gazing downward"],
    },
    "light": {
        "bright": ["bright lighting", "a brightly lit face", "strong light on the face", "well-lit features"],
        "dark": ["dim lighting", "a dark, shadowed face", "low light", "a dimly lit face"],
    },
    "sidelight": {
        "left": ["light from the left", "lit from the left side", "the left side of the face lit"],
        "right": ["light from the right", "lit from the right side", "the right side of the face lit"],
    },
}

# a wider vocabulary: more ways of saying each value, so the text projection learns the attribute
# from the wording's meaning rather than from a few fixed phrases. Never a content word of PARAPHRASES_VAL, nor a
# value-specific word of the same value's PARAPHRASES wording (tests/test_training.py checks both); the training
# words that do occur in PARAPHRASES are listed above PARAPHRASES_VAL.
_MORE_PHRASES: dict[str, dict[str, list[str]]] = {
    "hair": {
        "black": ["sable hair", "jet hair", "black curls", "hair as dark as night", "midnight-black hair",
                  "dark, almost black hair", "black wavy hair", "short black hair", "long black hair"],
        "brown": ["hazel hair", "bronze-brown hair", "brown curls", "cinnamon hair", "mousy brown hair",
                  "hair the colour of chocolate", "long brown hair", "short brown hair", "nut-brown hair"],
        "blond": ["wheat-coloured hair", "buttery blond hair", "light blond curls", "bleached hair",
                  "bleached blond hair", "peroxide blonde hair", "a blonde", "long blond hair", "pale yellow hair"],
        "red": ["scarlet hair", "maroon hair", "cherry-red hair", "brick-red hair", "russet hair",
                "red curls", "strawberry-red hair", "long red hair", "orange hair"],
        "gray": ["graying hair", "silver-grey hair", "steel-grey hair", "pewter hair", "aged grey hair",
                 "grey curls", "white and grey hair", "hair gone grey", "the grey hair of an old person"],
    },
    "skin": {
        "light": ["pale white skin", "a light skin colour", "a pale face", "creamy skin", "rosy pale skin", "ivory skin"],
        "medium": ["a tanned complexion", "honey-toned skin", "golden-brown skin", "an olive complexion",
                   "tawny skin", "a tanned face"],
        "dark": ["a dark skin colour", "deep dark skin", "chocolate skin", "espresso skin", "a deep complexion",
                 "very dark skin"],
    },
    "background": {
        "green": ["a forest behind", "a garden backdrop", "a lime-green background", "a jade background",
                  "trees and bushes behind", "a park with green grass behind"],
        "blue": ["an ocean backdrop", "a turquoise background", "a cerulean backdrop", "a sea-blue wall behind",
                 "a clear sky behind", "a blue curtain behind"],
        "white": ["a white studio backdrop", "a pale background", "a light plain backdrop", "a clean white wall",
                  "a whitewashed wall behind", "a white sheet behind"],
        "dark": ["a black void behind", "a jet-black backdrop", "a black curtain behind", "a dim, dark room behind",
                 "a night sky behind", "an unlit room behind"],
        "gray": ["a stone-grey backdrop", "a silver-grey background", "an ash-grey wall", "a neutral grey backdrop",
                 "a cement wall behind", "a foggy grey background"],
        "warm": ["a tan backdrop", "a wooden wall behind", "an amber background", "a terracotta backdrop",
                 "a golden-brown background", "a brick wall behind"],
    },
    "mouth": {
        "open": ["mouth agape", "an open jaw", "mouth hanging open", "an o-shaped mouth", "a yawning mouth",
                 "an astonished face with mouth open", "open lips"],
        "closed": ["closed lips", "a shut mouth", "mouth firmly closed", "lips together", "a closed-mouth look"],
    },
    "smile": {
        "smiling": ["a joyful smile", "a broad smile", "laughing", "a toothy grin", "smiling happily", "a glad face",
                    "a warm smile", "a happy expression"],
        "neutral": ["a calm expression", "an impassive face", "a solemn look", "a deadpan expression",
                    "no expression", "an unsmiling face", "a serious face", "a stoic look"],
    },
    "yaw": {
        "left": ["turned to the left", "left-facing", "head facing left", "a left profile",
                 "a three-quarter view to the left", "head rotated left"],
        "right": ["turned to the right", "right-facing", "head facing right", "a right profile",
                  "a three-quarter view to the right", "head rotated right"],
        "frontal": ["looking at the camera", "a front view", "a straight-on view", "facing forward",
                    "eyes on the camera"],
    },
    "pitch": {
        "up": ["looking upward", "face tilted upward", "head thrown back", "face pointing up", "chin up"],
        "down": ["looking downward", "face tilted downward", "head bowed", "eyes cast down", "looking at the ground"],
    },
    "light": {
        "bright": ["brightly lit", "a well-lit photo", "strong lighting", "sunny lighting", "high-key lighting",
                   "vivid light"],
        "dark": ["dark lighting", "a poorly lit face", "a dim picture", "low-key lighting", "shadows on the face",
                 "a dark photo"],
    },
    "sidelight": {
        "left": ["light falling from the left", "left side lighting", "side light from the left",
                 "the left half lit up"],
        "right": ["light falling from the right", "right side lighting", "side light from the right",
                  "the right half lit up"],
    },
}
PHRASES = {a: {v: ps + _MORE_PHRASES[a].get(v, []) for v, ps in vals.items()} for a, vals in PHRASES.items()}
HAND_PHRASES = PHRASES  # written by hand (training/wordnet_vocab.py adds WordNet's wordings to these)

# one plain prompt per value (zero-shot "plain" evaluation; these wordings also occur in training)
PLAIN: dict[str, dict[str, str]] = {
    "hair": {v: f"a person with {v} hair" for v in ("black", "brown", "blond", "red", "gray")},
    "skin": {"light": "a person with light skin", "medium": "a person with medium skin tone",
             "dark": "a person with dark skin"},
    "background": {v: f"a face in front of a {v} background" for v in ("green", "blue", "white", "dark", "gray")}
    | {"warm": "a face in front of a brown background"},
    "mouth": {"open": "a person with an open mouth", "closed": "a person with a closed mouth"},
    "smile": {"smiling": "a person with a smile", "neutral": "a person with a neutral expression"},
    "yaw": {"left": "a face turned to the left", "right": "a face turned to the right",
            "frontal": "a face facing the camera"},
    "pitch": {"up": "a person looking up", "down": "a person looking down"},
    "light": {"bright": "a face with bright lighting", "dark": "a face with dim lighting"},
    "sidelight": {"left": "a face lit from the left", "right": "a face lit from the right"},
}

# held-out paraphrases: words and templates that never occur in a training caption
PARAPHRASES: dict[str, dict[str, str]] = {
    "hair": {"black": "someone whose locks are ebony", "brown": "an individual with mahogany tresses",
             "blond": "a flaxen-haired individual", "red": "someone with carrot-top locks",
             "gray": "an individual with salt-and-pepper locks"},
    "skin": {"light": "a very fair-skinned individual", "medium": "an individual with a bronzed, sun-kissed complexion",
             "dark": "an individual with ebony skin"},
    "background": {"green": "photographed against leafy greenery", "blue": "photographed against an azure backdrop",
                   "white": "photographed against a snowy, milky backdrop",
                   "dark": "photographed against pitch-black darkness",
                   "gray": "photographed against a slate-coloured wall",
                   "warm": "photographed against a sandy, earthy backdrop"},
    "mouth": {"open": "someone gaping", "closed": "someone with sealed lips"},
    "smile": {"smiling": "someone beaming with joy", "neutral": "someone who looks unemotional"},
    "yaw": {"left": "someone glancing leftward", "right": "someone glancing rightward",
            "frontal": "someone staring directly into the lens"},
    "pitch": {"up": "someone peering skyward", "down": "someone peering at the floor"},
    "light": {"bright": "a luminous, well-illuminated portrait", "dark": "a murky, underexposed portrait"},
    "sidelight": {"left": "illumination coming from the leftward side", "right": "illumination coming from the rightward side"},
}

# a second held-out set, for choosing between training recipes (PARAPHRASES stays untouched for the final
# report): apart from function words, attribute nouns and the direction words left/right, its words occur neither
# in training captions nor in PARAPHRASES (tests/test_training.py). PARAPHRASES itself, written earlier, shares a
# few words and compound parts with training phrases: "fair" (fair-skinned), "very" (a very fair-skinned
# individual; "very dark skin" trains skin=dark), "haired" (flaxen-haired), "black" (pitch-black), "coloured"
# (slate-coloured), "well" (well-illuminated), and "left"/"right" as subwords of leftward/rightward.
PARAPHRASES_VAL: dict[str, dict[str, str]] = {
    "hair": {"black": "someone with an onyx mane", "brown": "someone with a cocoa mane",
             "blond": "a towheaded person", "red": "someone with a crimson mane",
             "gray": "a grizzled person with an ashen mane"},
    "skin": {"light": "someone with a porcelain, alabaster skin tone", "medium": "someone with a caramel skin tone",
             "dark": "someone with a rich umber skin tone"},
    "background": {"green": "posing in front of lush shrubbery", "blue": "posing before a cobalt wall",
                   "white": "posing in front of a chalky, colourless wall",
                   "dark": "posing in front of a sooty, lightless wall",
                   "gray": "posing in front of a drab, leaden wall",
                   "warm": "posing in front of a sepia, ochre wall"},
    "mouth": {"open": "a person whose lips hang apart, mid-shout", "closed": "a tight-lipped person"},
    "smile": {"smiling": "someone radiating happiness", "neutral": "someone keeping a poker face"},
    "yaw": {"left": "someone swivelling to their left", "right": "someone swivelling to their right",
            "frontal": "someone eyeing the photographer squarely"},
    "pitch": {"up": "someone contemplating the heavens", "down": "someone contemplating their shoes"},
    "light": {"bright": "a radiant, sunlit portrait", "dark": "a gloomy, badly exposed portrait"},
    "sidelight": {"left": "a lamp shining onto the left cheek", "right": "a lamp shining onto the right cheek"},
}

_SUBJECTS = ["a person", "a man or woman", "someone", "a face", "this person", "a portrait of a person",
             "a photo of a person", "a close-up of a face", "a headshot of someone", "an individual",
             "a man", "a woman", "a young person", "an older person", "somebody", "a human face", "a model",
             "a picture of someone", "a guy", "a lady"]
_WITH = ["with", "having", "who has", "showing"]
_BACKGROUND_TEMPLATES = ["{s} in front of {p}", "{s} against {p}", "{s}, {p}", "{s} photographed with {p}"]
_POSE_TEMPLATES = ["{s} {p}", "{s}, {p}", "{s} and {p}"]


def _phrase(attr: str, value: str, rng: random.Random) -> str:
    return rng.choice(PHRASES[attr][value])


def caption(labels: dict[str, str], rng: random.Random, max_attrs: int = 3) -> str:
    """One caption mentioning 1..max_attrs of the face's labelled attributes."""
    attrs = [a for a in labels if a in PHRASES and labels[a] in PHRASES[a]]
    if not attrs:
        return rng.choice(["a face", "a photo of a person", "a portrait", "a headshot of someone"])
    k = rng.randint(1, min(max_attrs, len(attrs)))
    chosen = rng.sample(attrs, k)
    subject = rng.choice(_SUBJECTS)
    feats = [_phrase(a, labels[a], rng) for a in chosen if a in ("hair", "skin", "mouth", "smile", "light", "sidelight")]
    pose = [_phrase(a, labels[a], rng) for a in chosen if a in ("yaw", "pitch")]
    bg = [_phrase(a, labels[a], rng) for a in chosen if a == "background"]
    text = subject
    if feats:
        joined = feats[0] if len(feats) == 1 else ", ".join(feats[:-1]) + " and " + feats[-1]
        text += f" {rng.choice(_WITH)} {joined}"
    for p in pose:
        text = rng.choice(_POSE_TEMPLATES).format(s=text, p=p)
    for p in bg:
        text = rng.choice(_BACKGROUND_TEMPLATES).format(s=text, p=p)
    if rng.random() < 0.3:
        text = text[0].upper() + text[1:] + "."
    return text


def caption_for_assignment(assignment: dict[str, str], rng: random.Random) -> str:
    """A caption mentioning exactly the attributes of ``assignment`` ({attr: value})."""
    return caption(assignment, rng, max_attrs=len(assignment)) if len(assignment) <= 1 else \
        _caption_all(assignment, rng)


def _caption_all(assignment: dict[str, str], rng: random.Random) -> str:
    for _ in range(20):
        text = caption(assignment, rng, max_attrs=len(assignment))
        # caption() picks a random subset; retry until every attribute is mentioned
        if _mentions_all(text, assignment):
            return text
    return text


def _mentions_all(text: str, assignment: dict[str, str]) -> bool:
    return all(any(p in text for p in PHRASES[a][v]) for a, v in assignment.items())


def assignment_key(assignment: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(assignment.items()))


def build_caption_pool(label_sets: list[dict[str, str]], max_attrs: int = 3, variants=(5, 3, 2),
                       seed: int = 0) -> dict[tuple, list[str]]:
    """Captions for every attribute assignment (1..max_attrs attributes) that occurs in ``label_sets``.

    Sharing captions between faces with the same assignment keeps the number of distinct captions small
    enough to embed every one of them once with the frozen text tower."""
    import itertools

    keys: set[tuple] = set()
    for labels in label_sets:
        items = sorted((a, v) for a, v in labels.items() if a in PHRASES)
        for k in range(1, min(max_attrs, len(items)) + 1):
            keys.update(itertools.combinations(items, k))
    rng = random.Random(seed)
    pool = {}
    for key in sorted(keys):
        n = variants[min(len(key), len(variants)) - 1]
        texts = {_caption_all(dict(key), rng) for _ in range(n * 2)}
        pool[key] = sorted(texts)[:n] if len(texts) > n else sorted(texts)
    return pool


def captions_for(labels: dict[str, str], rng: random.Random, n: int | None = None) -> list[str]:
    """1-5 varied captions for one face."""
    n = n if n is not None else rng.randint(1, 5)
    return [caption(labels, rng) for _ in range(n)]


def caption_bank(labels: dict[str, str], n: int, seed: int) -> list[str]:
    """A fixed pool of ``n`` captions for one face (precomputed so text embeddings can be cached)."""
    rng = random.Random(seed)
    return [caption(labels, rng) for _ in range(n)]


def words_of(text: str) -> set[str]:
    """Lower-case words, hyphenated compounds split ("salt-and-pepper" -> salt, and, pepper) as the tokenizer does."""
    return set(re.findall(r"[a-z]+", text.lower()))


def training_words() -> set[str]:
    """Every word that can appear in a training caption (to check paraphrases are held out)."""
    words: set[str] = set()
    for vals in PHRASES.values():
        for phrases in vals.values():
            for p in phrases:
                words |= words_of(p)
    for t in _SUBJECTS + _WITH + _BACKGROUND_TEMPLATES + _POSE_TEMPLATES:
        words |= words_of(t.replace("{s}", "").replace("{p}", ""))
    return words
