"""The evaluation report's generator base rates: measured with the real annotator on the bundled generator."""
from __future__ import annotations

import numpy as np
import pytest

from training import evaluate

TINY = "resources/weights/tiny"


def test_base_rates_on_the_bundled_generator():
    pytest.importorskip("dlib")
    import torch

    from core.engine import Engine
    from training.stage_utils import load_pair

    G, clip = load_pair(f"{TINY}/generator.safetensors", f"{TINY}/clip.safetensors", torch.device("cpu"))
    engine = Engine(G, clip, pack_id="t")
    rates, labels = evaluate.base_rates(engine, 20, seed=5)
    assert rates and all(0 < r <= 1 for r in rates.values()) and len(labels) == 20
    for attr in ("skin", "hair"):  # every face gets at most one value per attribute
        assert sum(r for k, r in rates.items() if k.startswith(attr + "=")) <= 1 + 1e-9
    assert rates == evaluate.base_rates(engine, 20, seed=5)[0]  # deterministic
    sets = evaluate.producible_prompts(labels, 3, seed=1, min_count=1)
    for k in range(2, 6):
        for caps, asked in sets[f"plain-{k}p"]:
            assert len(caps) == len(asked) == k
            assert any(all(lb.get(a) == v for a, v in asked.items()) for lb in labels)  # occurs together


def test_producible_prompts_need_joint_occurrence():
    labels = [{"hair": "black", "skin": "light", "smile": "neutral"}] * 3 + [{"hair": "gray", "skin": "dark"}]
    sets = evaluate.producible_prompts(labels, 8, seed=0, min_count=2)
    asked = [a for _, a in sets["plain-2p"]]
    assert {"hair": "black", "skin": "light"} in asked and {"hair": "gray", "skin": "dark"} not in asked
    assert len(asked) == 3 and [a for _, a in sets["plain-3p"]] == [{"hair": "black", "skin": "light",
                                                                     "smile": "neutral"}]
    assert sets["plain-4p"] == [] and len(sets["para-2p"]) == 3
    assert sets["para-2p"][0][0] != sets["plain-2p"][0][0]  # paraphrased wording


def test_reachable_presence_and_report():
    res = {"base_rates": {"hair=black": 0.3, "hair=red": 0.001, "smile=smiling": 0.05},
           "min_base_rate": 0.02, "base_rate_faces": 1000,
           "summary": {"consistency": {"cmd": {"plain-1": {"presence": 0.5, "faces": 24, "diversity": 0.3},
                                               "plain-2": {"presence": 0.0, "faces": 8, "diversity": 0.3},
                                               "plain-2p": {"presence": 0.25, "faces": 8, "diversity": 0.3}}},
                       "plain_per_value": {"cmd": {"hair=black": 1.0, "hair=red": 0.0, "smile=smiling": 0.5}}}}
    reach = evaluate.reachable_presence(res, 0.02)
    assert reach == {"cmd": pytest.approx(0.75)}  # hair=red (0.1% base rate) is left out
    res.update(when="now", device="cpu", seconds=1.0, faces=8, coarse_layers=2, num_ws=10, plain1_reachable=reach)
    md = evaluate.markdown(res)
    assert "| hair=red | 0% | 0.1% |" in md
    assert "over the 2 values with a base rate >= 2%" in md and "cmd 75%" in md
    assert "cmd 75%" in evaluate.card_section(res)
    assert "| plain-1 | plain-2 |" in md and "| plain-2p |" in md and "can satisfy" in md
    assert "plain-2 cmd 25%" in evaluate.card_section(res)
    assert np.isfinite(reach["cmd"])
