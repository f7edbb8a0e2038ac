"""LLM-envisioned negative labels: list answers parsed, cleaned, de-duplicated, ID names dropped, fed to NegLabel."""
import numpy as np
import pytest
import torch

import vlmood
import vlmood.scores
from vlmood.errors import InvalidInputError, VlmoodError
from vlmood.lvlm.base import LVLMClient, Reply
from vlmood.lvlm.envision import _names, envision_negatives


class Scripted(LVLMClient):
    """Answers each request with the next scripted text (or an error), recording the prompts."""

    model_id = "scripted"

    def __init__(self, answers):
        self.answers, self.prompts = list(answers), []

    def generate_many(self, requests, progress=None, **params):
        out = []
        for r in requests:
            self.prompts.append(r.prompt)
            a = self.answers.pop(0)
            out.append(Reply(None, error=a[6:]) if a.startswith("ERROR:") else Reply(a))
        return out


@pytest.mark.parametrize("text,want", [
    ("1. Fox\n2. Wolf - a wild canid\n3. \"Coyote\".\n", ["Fox", "Wolf", "Coyote"]),
    ("fox, wolf, coyote, jackal", ["fox", "wolf", "coyote", "jackal"]),
    ("- **hyena**\n- dingo<|im_end|>", ["hyena", "dingo"]),
    ("Here are some outliers:\n* lynx\n* cougar", ["lynx", "cougar"]),
    ("Sure! Here you go:\nfox\nwolf", ["fox", "wolf"]),
    ("", []),
])
def test_list_answers_are_read(text, want):
    assert _names(text) == want


def test_negatives_are_deduplicated_without_id_names_and_feed_neglabel():
    client = Scripted(["1. Ring\n2. moon\n3. Circles\n4. ring\n5. arrow", "- gradient\n- square\n- noise"])
    with pytest.warns(UserWarning, match=r"gave 3 usable near outlier class names of the 4 asked for"):
        words = envision_negatives(client, ["circle", "square"], n_near=4, n_far=2)
    assert words == ["Ring", "moon", "arrow", "gradient", "noise"]  # "Circles" (plural of an ID name), "square" gone
    assert len(client.prompts) == 2 and all("circle" in str(p) and "square" in str(p) for p in client.prompts)
    enc = vlmood.load_encoder("toyworld")
    det = vlmood.NegLabel(enc, ["circle", "square"], negatives=words, ngroups=1)
    x = torch.nn.functional.normalize(torch.randn(3, enc.embed_dim, generator=torch.Generator().manual_seed(1)), dim=-1)
    want = vlmood.scores.neglabel(x @ det.text_features.T, x @ det.negative_features.T, det.temperature, 1, det.seed)
    assert det.negative_features.shape[0] == 5 and np.allclose(det.score_features(x), want)


def test_failures_and_bad_arguments_are_one_line():
    with pytest.raises(VlmoodError, match=r"envisioning far outlier class names failed: server said no"):
        envision_negatives(Scripted(["fox", "ERROR:server said no"]), ["cat"], n_near=1, n_far=1)
    with pytest.raises(InvalidInputError, match=r"n_near must be a positive integer, got 0"):
        envision_negatives(Scripted([]), ["cat"], n_near=0)
    with pytest.raises(InvalidInputError, match=r"kinds must be some of"):
        envision_negatives(Scripted([]), ["cat"], kinds=["middle"])
