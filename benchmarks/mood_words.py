"""Mood words through the word map: how often the tiny pack's faces show the expression a mood caption asks for.

    python benchmarks/mood_words.py                         # the bundled word map
    python benchmarks/mood_words.py --wordmap OTHER.json.gz # another map (e.g. one built without EXPRESSIONS)

For 18 captions made of the mood words of ``training/build_wordmap.py`` (EXPRESSIONS), 8 faces each (seed 900) per
method; the annotator (training/annotate.py) decides: sadness and anger -> not smiling ("neutral"), shock and
fright -> mouth open, pleasure -> smiling. Prints per caption the hits of 8 per method and what the caption was read
as, then the share per method. Needs the app's dependencies (dlib for the annotator).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

WANT = {"neutral": ["a sad face", "bad news", "an unhappy man", "a worried woman", "someone crying",
                    "a miserable person", "an angry woman", "a frowning man", "a grumpy old man", "a furious person"],
        "open": ["a shocked man", "a terrified woman", "someone screaming", "an amazed person"],
        "smiling": ["a pleased woman", "an excited man", "a gleeful child", "a jolly old man"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--wordmap", default="", help="a word map file (default: the pack's own)")
    p.add_argument("--faces", type=int, default=8)
    p.add_argument("--seed", type=int, default=900)
    args = p.parse_args(argv)

    import numpy as np

    from core.engine import Engine
    from core.wordmap import WordMap
    from training.stage_utils import annotate_faces

    e = Engine.from_pack("tiny", device="cpu")
    if e.bank_origin != "pack":  # another bank gives the KNN (and the CMD/CVAE, which read it) other faces
        print(f"a KNN bank built on this machine replaces the pack's own ({e.bank_label('knn')}): the numbers would "
              "not be the model card's; run with ANYFACE_DATA_DIR set to an empty folder", file=sys.stderr)
        return 2
    if args.wordmap:
        e.word_map = WordMap.load(args.wordmap)
    methods = [m for m in ("knn", "cmd", "cvae") if m in e.methods]
    hits, total = collections.Counter(), collections.Counter()
    print(f"{'caption':22s} {'asked':8s} " + " ".join(f"{m:>5s}" for m in methods) + "  read as")
    for goal, captions in WANT.items():
        for c in captions:
            cells = []
            for m in methods:
                faces = e.synthesize([c], n=args.faces, seed=args.seed, method=m)
                labels = annotate_faces(np.stack([f.image for f in faces]))
                hit = sum((lb.get("mouth") == "open") if goal == "open" else (lb.get("smile") == goal) for lb in labels)
                hits[m] += hit
                total[m] += len(labels)
                cells.append(f"{hit}/{len(labels)}")
            print(f"{c:22s} {goal:8s} " + " ".join(f"{x:>5s}" for x in cells) + f"  {e.read_as(c)}", flush=True)
    print("\nasked expression present: " + ", ".join(f"{m} {100 * hits[m] / total[m]:.0f}%" for m in methods))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
