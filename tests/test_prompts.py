"""Prompt wording against the reference implementations, and how template/class files are read (BOM, Latin-1)."""
import pytest

import vlmood
from vlmood.errors import InvalidInputError
from vlmood.text import load_classes, load_templates


# ------------------------------------------------------------------ the prompts each method uses by default
@pytest.mark.parametrize("method", ["mcm", "glmcm", "energy", "maxlogit"])
def test_mcm_family_prompt_has_no_full_stop(tiny, method):
    """MCM and GL-MCM (and their Energy/MaxLogit runs) prompt with f"a photo of a {c}", no full stop."""
    det = vlmood.make_detector(method, tiny, ["cat", "dog"])
    assert det.templates == ["a photo of a {}"]
    assert load_templates(None) == ["a photo of a {}"]


def test_neglabel_prompts_match_the_reference(tiny):
    """NegLabel's configs use template 85 of its list, 'the nice {}', for the ID classes and the noun negatives,
    and 'This is a {} photo' for adjectives."""
    det = vlmood.NegLabel(tiny, ["cat", "dog"])
    assert det.templates == ["the nice {}"]
    assert det.neg_templates == {"noun": ["the nice {}"], "adj": ["This is a {} photo"]}


def test_csp_prompt_ensembles(tiny):
    det = vlmood.CSP(tiny, ["cat", "dog"])
    assert len(det.templates) == 8 and det.neg_templates["noun"] == det.templates
    assert {"{}", "the {}", "the nice {}", "a photo of the nice {}."} <= set(det.templates)
    assert det.neg_templates["adj"][0] == "{}" and len(det.neg_templates["adj"]) == 4


def test_bundled_template_comments_are_not_templates():
    for name in ("simple", "imagenet7", "imagenet80", "neglabel_noun", "neglabel_adj", "csp_noun", "csp_adj"):
        assert all(not t.startswith("#") and t.count("{}") == 1 for t in load_templates(name)), name
    assert len(load_templates("imagenet80")) == 80 and len(load_templates("imagenet7")) == 7


# ------------------------------------------------------------------ file encodings
def test_utf8_bom_is_not_part_of_the_first_name(tmp_path):
    classes = tmp_path / "classes.txt"
    classes.write_bytes("\ufeffcrème brûlée\nrose\n".encode("utf-8"))
    assert load_classes(str(classes)) == ["crème brûlée", "rose"]
    templates = tmp_path / "templates.txt"
    templates.write_bytes("\ufeffa photo of a {}\n".encode("utf-8"))
    assert load_templates(str(templates)) == ["a photo of a {}"]


@pytest.mark.parametrize("loader,what", [(load_classes, "class list"), (load_templates, "template file")])
def test_latin1_file_is_one_clear_error(tmp_path, loader, what):
    f = tmp_path / "latin1.txt"
    f.write_bytes("crème {}\nrose {}\n".encode("latin-1"))
    with pytest.raises(InvalidInputError, match=rf"{what} .*latin1\.txt is not UTF-8 .*line 1.*save it as UTF-8") as e:
        loader(str(f))
    assert "\n" not in str(e.value)


def test_repeated_templates_are_refused(tmp_path):
    with pytest.raises(InvalidInputError, match="duplicate templates: 'a {}'"):
        load_templates(["a {}", "the {}", "a {}"])
    f = tmp_path / "t.txt"
    f.write_text("a photo of a {}\nart of the {}\na photo of a {}\n")
    with pytest.raises(InvalidInputError, match="duplicate templates"):
        load_templates(str(f))
