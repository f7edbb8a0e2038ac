"""Tests of vlmood.lvlm.parser: the hand-written reply corpus (tests/data/lvlm_replies.jsonl) and one unit test per
deviation from the answer format."""
from __future__ import annotations

import json
import random
import time
from collections import Counter
from pathlib import Path

import pytest

from vlmood.errors import InvalidInputError
from vlmood.lvlm.parser import NONE_LABEL, STATUSES, VALID_STATUSES, ParsedResponse, parse_response

CORPUS = Path(__file__).parent / "data" / "lvlm_replies.jsonl"
ROWS = [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]
A = ["cat", "dog", "bird"]
N = ["golden retriever", "tabby cat", "red fox", NONE_LABEL]


def P(text, classes=A) -> ParsedResponse:
    return parse_response(text, classes)


# ----------------------------------------------------------------------------------------------- corpus
def test_corpus_size_and_coverage():
    assert len(ROWS) >= 200
    statuses = Counter(r["expected_status"] for r in ROWS)
    for s in STATUSES:
        if s != "parse_error":
            assert statuses[s] >= 3, f"status {s} only {statuses[s]} times in the corpus"
    tags = Counter(r["tag"] for r in ROWS)
    for tag in ("json", "pydict", "unquoted", "wrapped", "percent", "strings", "several", "truncated", "case",
                "plural", "punct", "lostletter", "template", "refusal", "description", "allzero", "offlist",
                "delim", "single", "predonly", "none", "partial", "empty", "long"):
        assert tags[tag] >= 3, tag
    assert len({r["text"] for r in ROWS}) == len(ROWS), "duplicate replies in the corpus"


@pytest.mark.parametrize("row", ROWS, ids=[f"{i + 1}-{r['tag']}" for i, r in enumerate(ROWS)])
def test_corpus_line(row):
    p = parse_response(row["text"], row["classes"])
    assert p.status == row["expected_status"], p.reason
    if "expected_confidences" in row:
        assert p.confidences == {k: float(v) for k, v in row["expected_confidences"].items()}, p.reason
    if "expected_prediction" in row:
        assert p.prediction == row["expected_prediction"], p.reason
    if "expected_valid" in row:
        assert p.valid == row["expected_valid"], p.reason
    # invariants of every answer
    assert p.valid <= (p.status in VALID_STATUSES)
    if p.status in ("complete", "partial", "none_of_these"):
        assert p.valid
    assert set(p.confidences) <= set(row["classes"])
    assert all(0.0 <= v <= 100.0 for v in p.confidences.values())
    assert p.prediction is None or p.prediction in row["classes"] and p.prediction != NONE_LABEL
    assert p.reason and "\n" not in p.reason


# ----------------------------------------------------------------------------------------------- per deviation
def test_well_formed_json():
    p = P('Prediction: dog\nConfidence: {"cat": 10, "dog": 85, "bird": 5}')
    assert (p.status, p.valid, p.prediction, p.confidences) == ("complete", True, "dog",
                                                                 {"cat": 10.0, "dog": 85.0, "bird": 5.0})
    assert p.reason == "all 3 classes"


def test_python_dict_and_string_values():
    p = P("{'cat': 12.5, 'dog': '80%', 'bird': \"7.5\"}")
    assert p.confidences == {"cat": 12.5, "dog": 80.0, "bird": 7.5}
    assert p.prediction == "dog" and p.status == "complete"


def test_unquoted_and_wrapped_keys():
    assert P("cat: 70, dog: 20, bird: 10").confidences == {"cat": 70.0, "dog": 20.0, "bird": 10.0}
    assert P("{cat}: 70, {{dog}}: 20, [bird]: 10").confidences == {"cat": 70.0, "dog": 20.0, "bird": 10.0}
    assert P("cat 70%, dog 20%, bird 10%").confidences == {"cat": 70.0, "dog": 20.0, "bird": 10.0}


def test_percent_fraction_and_ratio_values():
    assert P('{"cat": 0.6, "dog": 0.3, "bird": 0.1}').confidences == {"cat": 60.0, "dog": 30.0, "bird": 10.0}
    assert "fractions of 1" in P('{"cat": 0.6, "dog": 0.3, "bird": 0.1}').reason
    assert P("cat: 8/10, dog: 2/10, bird: 0/10").confidences == {"cat": 80.0, "dog": 20.0, "bird": 0.0}
    assert P("cat: 5 percent, dog: 95 percent, bird: 0 percent").prediction == "dog"
    # integers 0/1 are on the 0-100 scale (no decimal point: not fractions)
    assert P('{"cat": 1, "dog": 0, "bird": 0}').confidences["cat"] == 1.0


def test_out_of_range_values_are_clipped_and_said():
    p = P('{"cat": 130, "dog": -4, "bird": 0}')
    assert p.confidences == {"cat": 100.0, "dog": 0.0, "bird": 0.0}
    assert "clipped" in p.reason


def test_several_answers_take_the_last_complete_one():
    p = P('Prediction: cat\nConfidence: {"cat": 70, "dog": 20, "bird": 10}\nHmm, no.\n'
          'Prediction: dog\nConfidence: {"cat": 10, "dog": 85, "bird": 5}\nPrediction: bird\nConfidence: {"cat": 1')
    assert p.status == "complete" and p.prediction == "dog"
    assert p.confidences == {"cat": 10.0, "dog": 85.0, "bird": 5.0}
    assert p.reason.startswith("all 3 classes; 3 confidence lists in the response; used the last complete one (#2)")


def test_truncated_decided_keeps_complete_entries():
    p = P('Prediction: cat\nConfidence: {"cat": 80, "dog": 15, "bi')
    assert (p.status, p.valid, p.prediction, p.confidences) == ("truncated", True, "cat", {"cat": 80.0, "dog": 15.0})
    assert "decide S_max = 80" in p.reason


def test_truncated_last_number_touching_the_end_is_dropped():
    p = P('Prediction: cat\nConfidence: {"cat": 80, "dog": 1')  # "1" may be the start of "15"
    assert p.confidences == {"cat": 80.0} and p.valid
    assert "dropped the last, possibly cut value of 'dog'" in p.reason


def test_truncated_undecided_is_invalid():
    p = P('Confidence: {"cat": 40, "dog": 35, "bi')  # bird could have been 60
    assert (p.status, p.valid, p.prediction) == ("truncated", False, None)
    assert p.confidences == {"cat": 40.0, "dog": 35.0}
    assert "could change S_max" in p.reason
    p = P('Prediction: dog\nConfidence: {"cat": 40, "dog": 30, "bird"')  # stated dog is not the kept maximum
    assert (p.status, p.valid, p.prediction) == ("truncated", False, "dog")
    assert P('Confidence: {"cat": 100, "dog": 0, "bi').valid  # nothing can exceed 100


def test_case_differences():
    p = P('Prediction: DOG\nConfidence: {"Cat": 5, "DOG": 90, "BiRd": 5}')
    assert p.confidences == {"cat": 5.0, "dog": 90.0, "bird": 5.0} and p.prediction == "dog"


def test_plurals():
    p = parse_response('{"buses": 60, "boxes": 10, "strawberries": 10, "glasses": 10, "horses": 10}',
                       ["bus", "box", "strawberry", "glass", "horse"])
    assert p.confidences == {"bus": 60.0, "box": 10.0, "strawberry": 10.0, "glass": 10.0, "horse": 10.0}
    assert "read 'buses' as 'bus'" in p.reason
    # only a plural reply -> a singular class; a singular reply is not read as a plural class ("glass" != "glasses")
    p = parse_response('{"glass": 90}', ["glasses", "cup"])
    assert (p.status, p.valid, p.confidences) == ("off_list", False, {})
    assert parse_response('{"cat": 90}', ["cats", "dogs"]).status == "off_list"


def test_stray_punctuation_and_markdown():
    p = P('**Prediction:** cat.\n- **cat.**: 80\n- `dog`: 15\n- "bird!": 5,,')
    assert p.confidences == {"cat": 80.0, "dog": 15.0, "bird": 5.0} and p.prediction == "cat"
    assert P('{"golden_retriever": 80, "tabby-cat": 20}', N).confidences == {"golden retriever": 80.0,
                                                                              "tabby cat": 20.0}


def test_lost_leading_letter_only_when_unambiguous():
    p = P('{"at": 80, "dog": 15, "bird": 5}')
    assert p.confidences == {"cat": 80.0, "dog": 15.0, "bird": 5.0}
    assert "read 'at' as 'cat' (lost first letter; every other class listed)" in p.reason
    p = P('{"at": 80, "dog": 20}')  # bird not listed: "at" is not guessed
    assert (p.status, p.confidences, p.prediction) == ("partial", {"dog": 20.0}, "dog")
    assert "ignored 1 confidence(s) for names not in the class list: 'at'" in p.reason
    p = parse_response('{"at": 80, "dog": 20}', ["cat", "bat", "dog"])  # cat or bat: not guessed
    assert p.confidences == {"dog": 20.0} and p.status == "partial"
    assert "'at'" in p.reason  # named among the ignored names
    assert P('{"t": 80, "dog": 20}').confidences == {"dog": 20.0}  # one letter left: too little


def test_chat_template_tokens():
    p = P('<|im_start|>assistant\nPrediction: dog\nConfidence: {"cat": 5, "dog": 90, "bird": 5}<|im_end|>\n'
          '<|im_start|>user\n{"cat": 100}')
    assert p.confidences == {"cat": 5.0, "dog": 90.0, "bird": 5.0}
    assert "dropped the text after an end-of-turn token" in p.reason
    assert "removed chat-template tokens" in p.reason
    p = P('[INST] classify [/INST] {"cat": 90, "dog": 5, "bird": 5}</s>')
    assert p.status == "complete" and p.prediction == "cat"
    for t in ("<|eot_id|>", "</s>", "<|im_start|>assistant\n<|im_end|>", "[INST][/INST]"):
        assert P(t).status == "empty", t


def test_think_block_is_ignored():
    p = P('<think>maybe {"cat": 50, "dog": 50}</think>{"cat": 5, "dog": 90, "bird": 5}')
    assert p.confidences == {"cat": 5.0, "dog": 90.0, "bird": 5.0}
    assert "removed a <think> block" in p.reason


@pytest.mark.parametrize("text", ["I'm sorry, I can't help with that.", "As an AI, I cannot see images.",
                                  "I am unable to classify this image.", "I apologize, but I cannot identify it."])
def test_refusals(text):
    p = P(text)
    assert (p.status, p.valid, p.confidences, p.prediction) == ("refusal", False, {}, None)
    assert p.reason.startswith("the model refused: ")


def test_hedge_with_an_answer_is_not_a_refusal():
    assert P('I\'m sorry, I can\'t be sure, but {"cat": 60, "dog": 30, "bird": 10}').status == "complete"


def test_description_without_numbers():
    p = P("A small orange cat sits next to a dog on the grass.")
    assert (p.status, p.valid, p.prediction) == ("no_confidence", False, None)
    assert p.reason == "no class confidences in the text: 'A small orange cat sits next to a dog on the grass.'"
    assert P("Taken at 12:30.").status == "no_confidence"


def test_every_confidence_zero_means_none_of_these():
    p = P('Prediction: cat\nConfidence: {"cat": 0, "dog": 0, "bird": 0}')
    assert (p.status, p.valid, p.prediction) == ("none_of_these", True, None)
    assert p.confidences == {"cat": 0.0, "dog": 0.0, "bird": 0.0}
    assert p.reason.startswith("every ID-class confidence is 0: read as none of these classes; S_max = 0")
    # zeros for only some classes: no statement about the missing ones
    assert P('{"cat": 0, "dog": 0}').status == "partial"


def test_none_of_these_label_in_classes():
    p = parse_response('Prediction: none of these classes\nConfidence: {"golden retriever": 4, "tabby cat": 3, '
                       '"red fox": 3, "None of these classes": 90}', N)
    assert (p.status, p.prediction, p.none_confidence) == ("complete", None, 90.0)
    assert p.confidences[NONE_LABEL] == 90.0
    assert p.reason.startswith("prediction: none of these classes; all 4 classes")
    assert parse_response("None of these classes.", N).status == "none_of_these"
    # without the label in classes its confidence is kept apart
    p = P('{"cat": 10, "dog": 5, "bird": 5, "none of these classes": 80}')
    assert p.confidences == {"cat": 10.0, "dog": 5.0, "bird": 5.0} and p.none_confidence == 80.0
    assert p.prediction is None


def test_class_outside_the_list_is_ignored_and_named():
    p = P('{"cat": 60, "dog": 30, "bird": 5, "fox": 5}')
    assert p.status == "complete" and "fox" not in p.confidences
    assert "ignored 1 confidence(s) for names not in the class list: 'fox'" in p.reason
    p = P('{"plane": 90, "car": 10}')
    assert (p.status, p.valid) == ("off_list", False)
    assert p.reason == "confidences only for names not in the class list: 'plane', 'car'"


def test_class_names_with_the_format_delimiters():
    D = ['a, b: c', 'say "hi"', "{x}", "o'clock", "cat"]
    want = {'a, b: c': 70.0, 'say "hi"': 10.0, "{x}": 10.0, "o'clock": 5.0, "cat": 5.0}
    assert parse_response('{"a, b: c": 70, "say \\"hi\\"": 10, "{x}": 10, "o\'clock": 5, "cat": 5}', D).confidences \
        == want
    assert parse_response("a, b: c: 70, say \"hi\": 10, {x}: 10, o'clock: 5, cat: 5", D).confidences == want
    # the longest class name wins over a shorter one it ends with, and over an "entry" inside a name
    p = parse_response('{"x, y": 30, "x": 50, "y": 20}', ["x, y", "x", "y"])
    assert p.confidences == {"x, y": 30.0, "x": 50.0, "y": 20.0}
    assert parse_response('{"a:1 b": 40, "c": 60}', ["a:1 b", "c"]).confidences == {"a:1 b": 40.0, "c": 60.0}
    assert parse_response("sea lion: 70, sea: 20, lion: 10", ["sea", "lion", "sea lion"]).confidences == \
        {"sea": 20.0, "lion": 10.0, "sea lion": 70.0}


def test_single_value():
    p = P("Prediction: cat\nConfidence: 85%")
    assert (p.status, p.valid, p.prediction, p.confidences) == ("single_value", True, "cat", {"cat": 85.0})
    p = P("Confidence: 85")
    assert (p.status, p.valid, p.confidences) == ("single_value", False, {})
    assert p.reason == "one confidence (85) but no predicted class"
    assert P("Prediction: truck\nConfidence: 0.9", ["truck", "ship"]).confidences == {"truck": 90.0}


def test_prediction_only():
    p = P("Prediction: Cats")
    assert (p.status, p.valid, p.prediction, p.confidences) == ("prediction_only", False, "cat", {})
    assert P("dog").prediction == "dog"
    p = P("Prediction: wolf")
    assert (p.status, p.prediction) == ("prediction_only", None)
    assert "'wolf' is not a listed class" in p.reason


def test_stated_prediction_disagreeing_with_confidences_is_noted():
    p = P('Prediction: dog\nConfidence: {"cat": 70, "dog": 20, "bird": 10}')
    assert p.prediction == "dog"
    assert "stated prediction 'dog' is not the highest confidence ('cat')" in p.reason


def test_ties_go_to_the_first_class():
    assert P('{"dog": 40, "cat": 40, "bird": 20}').prediction == "cat"


@pytest.mark.parametrize("text", [None, "", "   \n", b"", b"\x00\xff\xfe", bytes(range(256)), 42, ["cat: 5"],
                                  "\x00\x01\x02", "\ud800 lone surrogate"])
def test_anything_is_parsed_without_raising(text):
    p = P(text)
    assert p.status in STATUSES and p.status != "parse_error"
    assert not p.valid and p.confidences == {}


def test_random_junk_never_raises():
    rng = random.Random(0)
    alphabet = "{}[]():,;\"'% \n\t0123456789.-catdogbirdnone<|>/\\*_#sorry"
    classes = ["cat", "dog", "bird", "a, b: c"]
    for _ in range(1500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        p = parse_response(text, classes)
        assert p.status in STATUSES and p.status != "parse_error", (text, p.reason)
        assert set(p.confidences) <= set(classes) and all(0 <= v <= 100 for v in p.confidences.values())


def test_1000_classes_parse_fast():
    classes = [f"species {i:04d}" for i in range(1000)]
    text = "Prediction: species 0777\nConfidence: " + json.dumps({c: (91 if i == 777 else 0)
                                                                  for i, c in enumerate(classes)})
    parse_response("warm the class index", classes)
    t0 = time.perf_counter()
    p = parse_response(text, classes)
    elapsed = time.perf_counter() - t0
    assert (p.status, p.prediction, len(p.confidences)) == ("complete", "species 0777", 1000)
    assert p.confidences["species 0777"] == 91.0 and sum(p.confidences.values()) == 91.0
    assert elapsed < 1.0, elapsed
    # 4x the classes: about 4x the time, not 16x (measured ~0.04 s vs ~0.06 s with the index built)
    big = [f"species {i:04d}" for i in range(4000)]
    text4 = "Confidence: " + json.dumps({c: 1 for c in big})
    parse_response("warm", big)
    t0 = time.perf_counter()
    assert parse_response(text4, big).status == "complete"
    assert time.perf_counter() - t0 < 2.0


@pytest.mark.parametrize("classes,msg", [
    ([], "classes is empty: give at least one class name"),
    ("cat", "classes must be a list of class names, got str"),
    (["cat", "cat"], "duplicate class name 'cat'"),
    (["cat", " "], "class names must be non-empty strings, got ' '"),
    (["cat", 3], "class names must be non-empty strings, got 3"),
])
def test_bad_classes_are_one_clear_error(classes, msg):
    with pytest.raises(InvalidInputError) as e:
        parse_response("cat: 5", classes)
    assert str(e.value) == msg


def test_valid_statuses_documented():
    assert VALID_STATUSES == {"complete", "partial", "truncated", "single_value", "none_of_these"}
    assert VALID_STATUSES <= set(STATUSES)


# ----------------------------------------------------------------------------------------------- review fixes
C100 = None


def cifar():
    global C100
    if C100 is None:
        import vlmood
        C100 = list(vlmood.load_classes("cifar100")) + [NONE_LABEL]
    return C100


def test_lost_first_letter_needs_every_other_class():
    p = parse_response('{"owl": 93, "none of these classes": 7}', cifar())  # not bowl
    assert (p.status, p.valid, p.confidences, p.prediction) == ("none_of_these", True, {NONE_LABEL: 7.0}, None)
    assert "ignored 1 confidence(s) for names not in the class list: 'owl'" in p.reason
    p = parse_response('{"hair": 91}', cifar())  # not chair
    assert (p.status, p.valid, p.confidences) == ("off_list", False, {})
    assert p.reason == "confidences only for names not in the class list: 'hair'"


def test_lost_first_letter_never_for_a_stated_prediction():
    p = parse_response("Prediction: rain\nConfidence: 80", cifar())  # not train
    assert (p.status, p.valid, p.confidences, p.prediction) == ("single_value", False, {}, None)
    assert p.reason == "one confidence (80) but the stated prediction 'rain' is not a listed class"


@pytest.mark.parametrize("text,classes", [('{"sea-lion": 90}', None), ('{"teddy-bear": 88}', None),
                                          ('{"t-shirt": 85}', ["shirt"]), ('{"x": 5, "sea-lion": 90}', None)])
def test_hyphenated_name_is_not_its_last_word(text, classes):
    p = parse_response(text, classes or cifar())
    assert p.status == "off_list" and p.confidences == {} and not p.valid, p.reason


def test_hyphen_bullets_still_start_keys():
    p = P("- cat: 80\n -dog: 15\n-bird: 5")
    assert p.confidences == {"cat": 80.0, "dog": 15.0, "bird": 5.0}


@pytest.mark.parametrize("text,classes", [("Prediction: house cat\nConfidence: 80", None),
                                          ("Prediction: dog house\nConfidence: 90", ["dog", "cat"])])
def test_prediction_prefix_needs_punctuation_or_a_number_after(text, classes):
    p = parse_response(text, classes or cifar())
    assert (p.status, p.valid, p.confidences, p.prediction) == ("single_value", False, {}, None), p.reason
    assert P("Prediction: dog house").status == "prediction_only" and P("Prediction: dog house").prediction is None


def test_prediction_prefix_with_punctuation_or_number():
    assert P("Prediction: cat (95%)\nConfidence: 95").confidences == {"cat": 95.0}
    assert P("Prediction: cat - 90\nConfidence: 90").prediction == "cat"
    assert P("Prediction: cat, 90\nConfidence: 90").prediction == "cat"


def test_trailing_explanation_does_not_replace_the_answer():
    classes = ["cat", "dog", NONE_LABEL]
    p = parse_response('Prediction: cat\nConfidence: {"cat": 95, "dog": 3, "none of these classes": 2}\n'
                       'Explanation: dog: 3 because no dog is visible.', classes)
    assert (p.status, p.prediction, p.confidences) == ("complete", "cat", {"cat": 95.0, "dog": 3.0, NONE_LABEL: 2.0})
    assert "used the complete one with the most listed classes (#1)" in p.reason


def test_repeated_key_does_not_split_the_answer():
    classes = ["cat", "dog", NONE_LABEL]
    p = parse_response('{"cat": 95, "dog": 3, "none of these classes": 2, "cat": 10}', classes)
    assert (p.status, p.valid, p.confidences["cat"]) == ("complete", True, 95.0)
    assert "a class is repeated within one list" in p.reason


def test_equal_lists_take_the_one_after_a_confidence_label():
    # same count: the one after "Confidence:", wherever it is; else the last
    p = P('Confidence: {"cat": 70, "dog": 20, "bird": 10}\nNotes: cat: 1, dog: 2, bird: 3')
    assert p.confidences == {"cat": 70.0, "dog": 20.0, "bird": 10.0}
    p = P('cat: 1, dog: 2, bird: 3\nConfidence: {"cat": 70, "dog": 20, "bird": 10}')
    assert p.confidences == {"cat": 70.0, "dog": 20.0, "bird": 10.0}
    assert P('{"cat": 70, "dog": 20, "bird": 10}\n{"cat": 1, "dog": 2, "bird": 3}').confidences["cat"] == 1.0


def test_exponent_values():
    assert P('{"cat": 8e1, "dog": 1.5E1, "bird": 5}').confidences == {"cat": 80.0, "dog": 15.0, "bird": 5.0}


@pytest.mark.parametrize("text,bad,pred", [
    ('{"cat": NaN, "dog": 60, "bird": 5}', "cat", None),
    ('Prediction: cat\nConfidence: {"cat": "high", "dog": 10, "bird": 5}', "cat", "cat"),
    ('Prediction: cat\nConfidence: {"cat": 90, "dog": "low", "bird": 5}', "dog", "cat"),
    ("- cat: 80\n- dog: 10\n- bird: null", "bird", None),
])
def test_unreadable_value_for_a_listed_class_is_invalid(text, bad, pred):
    p = P(text)
    assert (p.status, p.valid, p.prediction) == ("bad_value", False, pred)
    assert bad not in p.confidences
    assert p.reason.startswith(f"unreadable value for 1 listed class(es): {bad!r}; S_max unknown")
