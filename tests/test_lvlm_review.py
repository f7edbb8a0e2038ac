"""Regression tests for review findings on the LVLM adapter: answers cut by the token limit, "none of these classes"
never named as a class, ReGuide stage-1 failures counted, suggestions restating ID classes dropped, a run with no
answer at all failing, and the truncation flag surviving the response cache."""
import pytest

pytest.importorskip("httpx")

from lvlm_server import loopback, reply  # noqa: F401 (loopback: a fixture)

from vlmood.cli import main
from vlmood.lvlm.base import LVLMClient, Reply
from vlmood.lvlm.detector import LVLMDetector
from vlmood.lvlm.http import OpenAIClient
from vlmood.lvlm.prompts import parse_suggestions, stage2_classes
from vlmood.toyworld import ID_SHAPES, load_images

CUT = "Prediction: dog\nConfidence:\n- cat: 10\n- dog: 9"  # cut from "dog: 95" by the token limit


class Fixed(LVLMClient):
    model_id = "fixed"

    def __init__(self, *replies):
        self.replies = list(replies)

    def generate_many(self, requests, progress=None, **params):
        return [self.replies[i % len(self.replies)] for i in range(len(requests))]


def test_an_answer_cut_by_the_token_limit_is_not_scored_from_its_cut_entry():
    images, _ = load_images(2050, 2, ID_SHAPES)
    plain = LVLMDetector(Fixed(Reply(CUT)), ["cat", "dog"])
    assert plain.score(images)[0] == pytest.approx(0.10) and plain.statuses_ == {"partial": 2}  # looks complete
    det = LVLMDetector(Fixed(Reply(CUT, truncated=True)), ["cat", "dog"])
    scores = det.score(images)
    assert det.statuses_ == {"truncated": 2} and all(s != s for s in scores)  # NaN: excluded, not 0.10
    sure = LVLMDetector(Fixed(Reply("Prediction: cat\nConfidence:\n- cat: 100\n- dog: 9", truncated=True)),
                        ["cat", "dog"])
    assert list(sure.score(images)) == [1.0, 1.0]  # what is left decides S_max


def test_none_of_these_is_never_named_as_a_class():
    images, _ = load_images(2051, 1, ID_SHAPES)
    det = LVLMDetector(Fixed(Reply('{"cat": 0, "dog": 0, "none of these classes": 100}')), ["cat", "dog"])
    assert list(det.classify(images)) == [-1] and det.statuses_ == {"none_of_these": 1}
    assert det.predict(images, threshold=0.5).is_ood.tolist() == [True]


def test_reguide_stage1_failures_are_counted_and_suggestions_never_restate_id_classes():
    images, _ = load_images(2052, 3, ID_SHAPES)
    class TwoStage(LVLMClient):
        model_id = "two"

        def generate_many(self, requests, progress=None, **params):
            stage1 = "similar" in str(requests[0].prompt).lower() and "dissimilar" in str(requests[0].prompt).lower()
            return [Reply(None, error="HTTP 500") if stage1 else Reply("Prediction: cat\nConfidence: {cat: 90, dog: 1}")
                    for _ in requests]

    det = LVLMDetector(TwoStage(), ["cat", "dog"], prompt="reguide")
    det.score(images)
    assert det.stage1_failed_ == 3 and det.suggestions_ == [[], [], []]
    assert parse_suggestions("- Teddy-Bear\n- teddy  bear\n- Maple Trees\n- fox", ["teddy bear", "maple_tree"]) == ["fox"]
    assert stage2_classes(["bus", "glass", "car"], ["buses", "Glasses", "cart", "Carts"]) == ["bus", "glass", "car",
                                                                                            "cart"]


def test_truncation_flag_comes_from_the_server_and_survives_the_cache(loopback, tmp_path):
    server = loopback(lambda req: reply(CUT, finish_reason="length"))
    images, _ = load_images(2053, 2, ID_SHAPES)
    client = OpenAIClient(server.base_url, "loopback-vl", cache=tmp_path / "c")
    det = LVLMDetector(client, ["cat", "dog"])
    det.score(images)
    assert det.statuses_ == {"truncated": 2}
    server.reset()
    again = LVLMDetector(OpenAIClient(server.base_url, "loopback-vl", cache=tmp_path / "c"), ["cat", "dog"])
    again.score(images)
    assert server.requests == 0 and again.statuses_ == {"truncated": 2}


def test_a_run_where_no_request_gets_an_answer_fails(loopback, tmp_path, capsys):
    from lvlm_server import reject

    server = loopback(lambda req: reject("no route /chat/completions", status=404))
    load_images(2054, 1, ID_SHAPES)[0][0].save(tmp_path / "a.png")
    code = main(["lvlm", "score", "--base-url", server.base_url, "--model", "loopback-vl", "--classes", "a,b",
                 "--images", str(tmp_path / "a.png"), "--out", str(tmp_path / "s.csv")])
    assert code == 1 and "no request got an answer" in capsys.readouterr().err
