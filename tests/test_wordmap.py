"""The word map (core/wordmap.py): built from WordNet files (a fixture in WordNet 3.1's format), read by the engine,
and the bundled map of the tiny pack."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.wordmap import WordMap

REPO = Path(__file__).resolve().parent.parent
BUNDLED = REPO / "resources" / "weights" / "tiny" / "wordmap.json.gz"


def _wordnet(tmp_path: Path) -> Path:
    """A few synsets: crimson (adj, similar to red), mane (noun, its gloss says hair), swivel (verb, hypernym turn),
    tight-lipped (adj, similar to closed)."""
    d = tmp_path / "dict"
    d.mkdir()
    (d / "data.adj").write_text(
        "  1 This software and database is being provided to you\n"
        "00381097 00 a 01 red 0 001 & 00382159 a 0000 | having any of numerous bright or strong colors\n"
        "00382159 00 s 02 crimson 0 ruby 0 001 & 00381097 a 0000 | of a color at the end of the spectrum\n"
        "00500001 00 a 01 closed 0 000 | not open\n"
        "00500002 00 s 01 tight-lipped 0 001 & 00500001 a 0000 | closemouthed\n", encoding="latin-1")
    (d / "index.adj").write_text("crimson a 1 1 & 1 0 00382159  \nred a 1 1 & 1 0 00381097  \n"
                                 "tight-lipped a 1 1 & 1 0 00500002  \nclosed a 1 0 1 0 00500001  \n")
    (d / "data.noun").write_text(
        "02000001 05 n 01 mane 0 000 | long coarse hair growing from the crest of the animal's neck\n")
    (d / "index.noun").write_text("mane n 1 0 1 0 02000001  \n")
    (d / "data.verb").write_text(
        "01000001 38 v 01 turn 0 000 | change orientation or direction\n"
        "01000002 38 v 01 swivel 0 001 @ 01000001 v 0000 | turn on a pin\n")
    (d / "index.verb").write_text("swivel v 1 1 @ 1 0 01000002  \nturn v 1 0 1 0 01000001  \n")
    (d / "data.adv").write_text("")
    (d / "index.adv").write_text("")
    return d


VOCAB = {"red", "hair", "closed", "turn", "left", "smiling"}


def test_built_map_appends_known_words_for_unknown_ones_and_leaves_known_captions(tmp_path):
    from training import build_wordmap

    wm = build_wordmap.build(_wordnet(tmp_path), vocab=VOCAB)
    assert wm.expand("someone with a crimson mane") == "someone with a crimson mane, red hair"
    assert wm.expand("a person with red hair") == "a person with red hair"  # every word known: as typed
    assert wm.expand("") == ""
    # WordNet's morphology: plural nouns, -ing with a doubled consonant
    assert wm.expand("crimson manes") == "crimson manes, red hair"
    assert wm.expand("someone swivelling to their left") == "someone swivelling to their left, turn"
    # a hyphenated word is looked up whole (WordNet writes it with the hyphen) before its parts
    assert wm.expand("a tight-lipped person") == "a tight-lipped person, closed"
    # a word WordNet does not know is listed with nothing to read it as
    assert [(r.word, r.read_as) for r in wm.readings("a zorbly crimson mane")] == [
        ("zorbly", ()), ("crimson", ("red",)), ("mane", ("hair",))]
    # the weakest links are dropped: hair is only in mane's gloss (0.5), so min_weight 0.6 leaves mane unread
    wm.min_weight = 0.6
    assert wm.expand("a crimson mane") == "a crimson mane, red"


def test_function_words_accents_clitics_and_inflections_are_not_looked_up_as_dictionary_words(tmp_path):
    """A review found "He has a beard" read as "+ light" (he = helium), "a naïve blonde" split into "na" (sodium) +
    "ve", "someone's" into "s", and a known word's inflection ("looks") looked up as a new word."""
    from core.wordmap import words
    from training import build_wordmap

    assert words("Señor López's café, naïve – doesn't") == ["senor", "lopez", "cafe", "naive", "does"]
    wm = build_wordmap.build(_wordnet(tmp_path), vocab=VOCAB | {"look"})
    for caption in ("He has a beard", "someone who looks like us", "they were under it", "she doesn't", "I'm 30",
                    "someone's", "a woman wearing red"):
        got = [r.word for r in wm.readings(caption)]
        assert not set(got) & {"he", "has", "looks", "like", "us", "they", "were", "under", "she", "does", "doesn",
                                "i", "m", "s", "someone", "wearing"}, (caption, got)
    assert wm.expand("a CRIMSON mane") == "a CRIMSON mane, red hair"  # case does not matter
    # a known word is appended once, and not when the caption has it already
    assert wm.expand("a crimson, crimson mane") == "a crimson, crimson mane, red hair"
    assert wm.expand("red hair, a crimson mane") == "red hair, a crimson mane"


def test_word_map_file_is_deterministic_and_damaged_files_name_themselves(tmp_path):
    from training import build_wordmap

    wm = build_wordmap.build(_wordnet(tmp_path), vocab=VOCAB)
    a, b = tmp_path / "a.json.gz", tmp_path / "b.json.gz"
    wm.save(a)
    (tmp_path / "again").mkdir()
    build_wordmap.build(_wordnet(tmp_path / "again"), vocab=VOCAB).save(b)
    assert a.read_bytes() == b.read_bytes()  # no gzip time stamp, sorted keys: same map, same sha256
    back = WordMap.load(a)
    assert back.expand("a crimson mane") == wm.expand("a crimson mane") and back.vocabulary == wm.vocabulary
    assert not list(tmp_path.glob("*.part"))
    junk = tmp_path / "junk.json.gz"
    junk.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="junk.json.gz is not a word map"):
        WordMap.load(junk)
    other = tmp_path / "other.json.gz"
    other.write_bytes(gzip.compress(json.dumps({"format": "something-else"}).encode()))
    with pytest.raises(ValueError, match="other.json.gz is not a word map of format"):
        WordMap.load(other)
    broken = tmp_path / "broken.json.gz"
    broken.write_bytes(gzip.compress(json.dumps({"format": "anyface-wordmap-1", "maps": {}}).encode()))
    with pytest.raises(ValueError, match="broken.json.gz is a damaged word map"):
        WordMap.load(broken)


def test_build_pack_wordmap_stage(tmp_path):
    out = tmp_path / "pack"
    r = subprocess.run([sys.executable, "-m", "training.build_pack", "--stage", "wordmap", "--out", str(out),
                        "--wordnet", str(_wordnet(tmp_path)), "--no-manifest"], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    wm = WordMap.load(out / "wordmap.json.gz")
    assert wm.expand("a crimson mane").startswith("a crimson mane, ")  # the real training vocabulary knows "red"
    r = subprocess.run([sys.executable, "-m", "training.build_pack", "--stage", "wordmap", "--out", str(out),
                        "--wordnet", str(tmp_path / "nowhere")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "not a WordNet 'dict' folder" in r.stderr


def test_bundled_map_matches_the_clip_vocabulary_and_leaves_training_captions_alone():
    """The tiny pack's map must be rebuilt when the training vocabulary changes; a caption made of training words
    (every training caption, every plain evaluation caption) is read exactly as typed, so the CMD sees at inference
    what it saw in training."""
    import random

    from training import build_wordmap
    from training import captions as C

    wm = WordMap.load(BUNDLED)
    assert wm.vocabulary == build_wordmap.vocabulary()
    for vals in C.PLAIN.values():
        for text in vals.values():
            assert wm.expand(text) == text
    rng = random.Random(0)
    for _ in range(200):
        labels = {a: rng.choice(list(v)) for a, v in C.PHRASES.items()}
        for text in C.captions_for(labels, rng):
            assert wm.expand(text) == text, text
    # held-out wordings do get read (the dictionary's purpose); what they are read as is the file's business
    assert any(wm.expand(t) != t for vals in C.PARAPHRASES_VAL.values() for t in vals.values())


def test_engine_reads_captions_through_the_pack_word_map():
    from core.engine import Engine

    engine = Engine.from_pack("tiny", device="cpu")
    assert engine.word_map is not None
    known = "a person with red hair"
    assert engine.read_as(known) == known and engine.readings([known]) == []
    unknown = "someone with a crimson mane"
    assert engine.read_as(unknown).startswith(unknown + ", ")
    words = dict(engine.readings([unknown, "a towheaded person"]))
    assert set(words) == {"crimson", "mane", "towheaded"} and all(words.values())
    with_map = engine.text_embedding([unknown])
    saved = engine.word_map
    engine.word_map = None  # the cached embedding of the expanded caption goes with the map
    as_typed = engine.text_embedding([unknown])
    assert not torch.allclose(with_map, as_typed)
    known_as_typed = engine.text_embedding([known])
    engine.word_map = saved
    assert torch.allclose(engine.text_embedding([known]), known_as_typed)
    assert torch.allclose(engine.text_embedding([unknown]), with_map)
    # appended words never push a caption past the text tower's tokens (the user's words come first)
    roomy = unknown + " and a smile" * 8
    assert engine.read_as(roomy) == engine.word_map.expand(roomy) != roomy  # room for both words
    full = unknown.split()
    while engine.clip.fits_text(" ".join(full + ["smile"])):
        full.append("smile")
    full = " ".join(full)  # fits, one word more would not
    assert engine.read_as(full) == full



def test_moods_are_read_as_the_clips_expression_words_and_held_out_wordings_are_untouched(tmp_path):
    """WordNet led "bad" to "big", "angry" to "black", "shocked" to "water": the mood list reads them as the
    expression words the tiny CLIP knows. No word of the report's held-out wordings or of the validation wordings is
    in the list, nor reaches it by an inflection rule, so their readings (and the report's numbers) do not move."""
    from training import build_wordmap
    from training import captions as C
    from core.wordmap import POS, words

    wm = WordMap.load(BUNDLED)
    vocab = build_wordmap.vocabulary()
    lists = {**build_wordmap.EXPRESSIONS, **build_wordmap.READINGS}
    listed = {w for ws in lists.values() for w in ws} | set(build_wordmap.NO_READING)
    assert set(lists) <= vocab and not listed & vocab
    for d in (C.PARAPHRASES, C.PARAPHRASES_VAL):
        for vals in d.values():
            for text in vals.values():
                for w in words(text):
                    looked_up = {x for pos in POS for x in wm.lemmas(w, pos)} | {w}
                    assert not looked_up & listed, (text, w)
    for caption, read in (("bad news", "serious"), ("a sad face", "serious"), ("an angry woman", "stern"),
                          ("a frowning man", "stern"), ("someone scowled", "stern"), ("a shocked man", "astonished"),
                          ("a terrified child", "astonished"), ("a pleased woman", "smiling")):
        assert wm.expand(caption).startswith(f"{caption}, {read}"), (caption, wm.expand(caption))
    for word, read in (("wrinkled", "old"), ("baby", "young"), ("bangs", "hair"), ("tired", "serious")):
        assert wm.readings(f"a {word} x")[0].read_as == (read,), word
    # judgements of looks and words for origin never become a skin or background colour ("beautiful" was "fair")
    for word in build_wordmap.NO_READING:
        assert all(r.read_as == () for r in wm.readings(word)), (word, wm.readings(word))
    assert wm.expand("a beautiful woman") == "a beautiful woman" and wm.expand("a bald man") == "a bald man"
    # words whose everyday sense in a face caption is not a mood are not read as one
    for caption in ("a man with a shock of white hair", "a woman with a severe bob", "fierce eyebrows",
                    "a good-looking young man", "madder red hair", "shocking pink hair"):
        assert not set(wm.additions(caption)) & set(build_wordmap.EXPRESSIONS), (caption, wm.expand(caption))
    # a built map: each listed word's first reading, whatever WordNet offered ("bad" -> "big" before)
    built = build_wordmap.build(_wordnet(tmp_path), vocab={"red", "hair", "serious", "stern", "smiling"})
    assert built.neighbours("sad")[0] == ("serious", build_wordmap.EXPRESSION_WEIGHT)
    assert built.neighbours("frowning")[0][0] == "stern"  # through the verb rule: frown
    assert built.neighbours("shocked") == []  # "astonished" is not in this vocabulary: no reading made up
