"""A dictionary for a small text tower: words a caption uses that the text model never saw get a word it knows.

The tiny pack's CLIP reads text through a frozen sentence model (MiniLM) and a projection trained on a few
hundred attribute phrases. Free wording the projection never saw ("someone with a crimson mane") lands far from
its meaning. A word map, built from WordNet by ``training/build_wordmap.py`` for the words of the CLIP's training
captions, gives each such word the closest word the projection knows (its synonyms, "similar to" adjectives,
hypernyms and the first words of its gloss, by WordNet's sense order), and the caption is read with that word
appended: "someone with a crimson mane, cherry hair". A caption made only of known words is read as typed.

A word map belongs to one CLIP (its vocabulary is that CLIP's training vocabulary); a pack lists it with role
``wordmap``. It is data, never code: a gzip-compressed JSON file.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

FORMAT = "anyface-wordmap-1"
POS = ("n", "v", "a", "r")

# WordNet's morphological rules (morphy without the exception lists): suffix -> replacement, per part of speech
RULES: dict[str, tuple[tuple[str, str], ...]] = {
    "n": (("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"), ("men", "man"),
          ("ies", "y")),
    "v": (("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"), ("ing", "")),
    "a": (("er", ""), ("est", ""), ("er", "e"), ("est", "e")),
    "r": (),
}
_WORD = re.compile(r"[a-z]+(?:['-][a-z]+)*")


def words(caption: str) -> list[str]:
    """Lower-case words of a caption as they are looked up: accents dropped ("café" -> "cafe"), hyphenated words
    kept whole, clitics cut ("someone's" -> "someone", "doesn't" -> "does")."""
    text = unicodedata.normalize("NFKD", caption.replace("’", "'")).lower()
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    out = []
    for w in _WORD.findall(text):
        if "'" in w:
            w = w[:-3] if w.endswith("n't") else w.split("'")[0]
        if w:
            out.append(w)
    return out


# inflections a known word may carry and still be read by the text model as itself ("looks", "smiled", "women");
# not WordNet's "es" -> "" (it would take "manes" to "man")
_INFLECTIONS = (("s", ""), ("ies", "y"), ("ches", "ch"), ("shes", "sh"), ("xes", "x"), ("men", "man"), ("ed", ""),
                ("ed", "e"), ("ied", "y"), ("ing", ""), ("ing", "e"), ("er", ""), ("er", "e"), ("est", ""),
                ("est", "e"), ("ier", "y"), ("iest", "y"))


def _base_forms(word: str) -> list[str]:
    """The forms ``word`` may be an inflection of ("looks" -> "look", "smiling" -> "smile")."""
    out = []
    for suffix, rep in _INFLECTIONS:
        if word.endswith(suffix) and len(word) > len(suffix) + 1:
            base = word[: len(word) - len(suffix)] + rep
            out.append(base)
            if rep == "" and len(base) > 2 and base[-1] == base[-2]:  # "grinning" -> "grinn" -> "grin"
                out.append(base[:-1])
    return out


@dataclass(frozen=True)
class Reading:
    word: str  # as looked up: lower case, accents dropped, clitics cut
    read_as: tuple[str, ...]  # the known words added for it (empty: no dictionary word it knows)


class WordMap:
    """``vocabulary``: words the text model knows; ``stopwords``: words never looked up; ``maps[pos][lemma]``:
    [(known word, weight), ...] best first; ``k`` / ``min_weight``: how many known words are added per unknown
    word, and the least weight they need."""

    def __init__(self, vocabulary, stopwords, maps: dict[str, dict[str, list]], k: int = 1, min_weight: float = 0.5,
                 meta: dict | None = None):
        self.vocabulary = frozenset(vocabulary)
        self.stopwords = frozenset(stopwords)
        self.maps = {p: maps.get(p, {}) for p in POS}
        self.k, self.min_weight = int(k), float(min_weight)
        self.meta = dict(meta or {})

    # ------------------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike) -> "WordMap":
        path = Path(path)
        try:
            with gzip.open(path, "rt", encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, EOFError, ValueError) as e:
            raise ValueError(f"{path} is not a word map (a gzip-compressed JSON file): {e}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError(f"{path} is not a word map of format {FORMAT!r} "
                             f"(found {doc.get('format') if isinstance(doc, dict) else type(doc).__name__!r})")
        try:
            maps = {p: {str(lemma): [(str(w), float(wt)) for w, wt in entries]
                        for lemma, entries in doc["maps"].get(p, {}).items()} for p in POS}
            return cls(doc["vocabulary"], doc["stopwords"], maps, doc.get("k", 1), doc.get("min_weight", 0.5),
                       meta={k: v for k, v in doc.items() if k not in ("maps", "vocabulary", "stopwords")})
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{path} is a damaged word map ({type(e).__name__}: {e})") from None

    def save(self, path: str | os.PathLike) -> None:
        """Byte-for-byte the same file for the same map (sorted keys, no gzip time stamp), written atomically."""
        from core.atomic import mkstemp_beside

        doc = dict(self.meta, format=FORMAT, k=self.k, min_weight=self.min_weight,
                   vocabulary=sorted(self.vocabulary), stopwords=sorted(self.stopwords),
                   maps={p: {lemma: [[w, round(wt, 4)] for w, wt in entries]
                             for lemma, entries in sorted(self.maps[p].items())} for p in POS})
        raw = json.dumps(doc, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        path = Path(path)
        fd, tmp = mkstemp_beside(path, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0,
                                                         compresslevel=9) as gz:
                gz.write(raw)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # ------------------------------------------------------------------------------------------------------
    def is_known(self, word: str) -> bool:
        """A word (or every part of a hyphenated one) the text model saw, in that form or another ("looks" for
        "look"), a stopword, or a word of one or two letters (never looked up)."""
        return len(word) <= 2 or all(p in self.vocabulary or p in self.stopwords or len(p) <= 2
                                     or any(b in self.vocabulary for b in _base_forms(p))
                                     for p in re.findall(r"[a-z]+", word.lower()))

    def lemmas(self, word: str, pos: str) -> list[str]:
        """WordNet base forms of ``word`` as part of speech ``pos`` that the map holds ("swivelling" -> "swivel")."""
        table = self.maps[pos]
        out = [word] if word in table else []
        for suffix, rep in RULES[pos]:
            if word.endswith(suffix) and len(word) > len(suffix):
                base = word[: len(word) - len(suffix)] + rep
                if base in table:
                    out.append(base)
                # a doubled final consonant ("swivelling" -> "swivell" -> "swivel")
                if rep == "" and len(base) > 2 and base[-1] == base[-2] and base[:-1] in table:
                    out.append(base[:-1])
        return list(dict.fromkeys(out))

    def neighbours(self, word: str) -> list[tuple[str, float]]:
        """Known words for an unknown word, best first (ties alphabetical); a hyphenated word is looked up whole
        ("tight-lipped", "tight_lipped", "tightlipped") and by its parts."""
        word = word.lower()
        parts = [word] if "-" not in word else [word, word.replace("-", "_"), word.replace("-", "")] + word.split("-")
        found: dict[str, float] = {}
        for x in parts:
            for pos in POS:
                for lemma in self.lemmas(x, pos):
                    for w, wt in self.maps[pos][lemma]:
                        if w != x and wt > found.get(w, 0.0):
                            found[w] = wt
        return sorted(found.items(), key=lambda t: (-t[1], t[0]))

    def readings(self, caption: str) -> list[Reading]:
        """Each word of ``caption`` the text model does not know, with the known words it is read as."""
        out = []
        for w in words(caption):
            if self.is_known(w):
                continue
            out.append(Reading(w, tuple(n for n, wt in self.neighbours(w)[: self.k] if wt >= self.min_weight)))
        return out

    def readings_of(self, captions) -> list[tuple[str, tuple[str, ...]]]:
        """(word, known words it is read as) over several captions, in order, each word once."""
        seen: dict[str, tuple[str, ...]] = {}
        for c in captions:
            for r in self.readings(c):
                seen.setdefault(r.word, r.read_as)
        return list(seen.items())

    def additions(self, caption: str) -> list[str]:
        """The known words appended to ``caption``, in order, each once, none the caption already has."""
        have = set(words(caption))
        out: list[str] = []
        for r in self.readings(caption):
            for w in r.read_as:
                if w not in have and w not in out:
                    out.append(w)
        return out

    def expand(self, caption: str) -> str:
        """The caption as the text model reads it: unchanged when every word is known, else with the known words
        found for the unknown ones appended ("someone with a crimson mane" -> "someone with a crimson mane, cherry
        hair" with the tiny pack's map)."""
        extra = self.additions(caption)
        return f"{caption}, {' '.join(extra)}" if extra else caption

    def __repr__(self) -> str:
        n = sum(len(m) for m in self.maps.values())
        return f"WordMap({len(self.vocabulary)} known words, {n} lemmas, k={self.k}, min_weight={self.min_weight})"
