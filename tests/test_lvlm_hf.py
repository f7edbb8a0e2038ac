"""TransformersClient end to end on a tiny random-weight LLaVA built in-process (no download): saved to a folder and
loaded back through AutoProcessor + AutoModelForImageTextToText. Its answers are noise over a word vocabulary that
holds no class name and no digit, so the parser must mark every one invalid."""
from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from vlmood.errors import EncoderLoadError, InvalidInputError, VlmoodError
from vlmood.lvlm.base import Request
from vlmood.lvlm.hf import TransformersClient

WORDS = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "user", "assistant", ":", "zor", "blip", "quux", "vex", "mop",
         "tarn", "glim", "fesh", "brack", "sulo", "wend", "pry"]
TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {% if m['content'] is string %}{{ m['content'] }}{% else %}"
            "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% elif c['type'] == 'text' %}"
            "{{ c['text'] }}{% endif %}{% endfor %}{% endif %} </s> {% endfor %}"
            "{% if add_generation_prompt %}assistant : {% endif %}")


def _tiny(chat_template=TEMPLATE, seed=0):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()  # words joined by spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", extra_special_tokens={"image_token": "<image>"})
    proc = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                             crop_size={"height": 32, "width": 32}),
                          tokenizer=fast, patch_size=16, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=chat_template)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=16, projection_dim=16)
    text = LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, pad_token_id=0,
                       bos_token_id=2, eos_token_id=3)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_index=4,
                                                      vision_feature_select_strategy="default",
                                                      vision_feature_layer=-1)).eval()
    return model, proc


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llava")
    model, proc = _tiny()
    model.save_pretrained(d)
    proc.save_pretrained(d)
    return d


def _images(tmp_path):
    ims = [Image.fromarray((np.random.RandomState(i).rand(24 + 8 * i, 40, 3) * 255).astype("uint8"))
           for i in range(3)]
    path = tmp_path / "im1.png"
    ims[1].save(path)
    buf = io.BytesIO()
    ims[2].save(buf, format="PNG")
    return [ims[0], path, buf.getvalue()]  # a PIL image, a path, encoded bytes


def _requests(tmp_path):
    a, b, c = _images(tmp_path)
    return [Request("zor blip", a), Request("quux vex mop tarn glim fesh brack sulo", b),
            Request([{"role": "system", "content": "wend"}, {"role": "user", "content": [{"type": "text",
                                                                                          "text": "pry zor"}]}], c),
            Request("blip blip blip"),  # text only, in the same batch as images
            Request("zor", tmp_path / "missing.png")]


def test_end_to_end(tiny_dir, tmp_path):
    from vlmood.lvlm.cache import ResponseCache

    client = TransformersClient(str(tiny_dir), batch_size=4, max_new_tokens=8, cache=ResponseCache(tmp_path / "c"))
    assert client.model_id.startswith(f"hf:{tiny_dir}@") and client.device.type in ("cpu", "cuda")
    assert client.tokenizer.padding_side == "left"
    reqs = _requests(tmp_path)
    calls = []
    generate = client.model.generate
    client.model.generate = lambda **kw: (calls.append(kw["input_ids"].shape), generate(**kw))[1]
    first = client.generate_many(reqs)
    assert [r.error for r in first[:4]] == [None] * 4
    assert first[4].text is None and first[4].error == f"image file not found: {tmp_path / 'missing.png'}"
    texts = [r.text for r in first[:4]]
    assert all(isinstance(t, str) for t in texts) and any(texts)
    # only the new tokens are decoded: at most 8 words (a prompt echo alone is >= 6: "user : zor blip assistant :")
    assert all(len(t.split()) <= 8 for t in texts)
    assert [r.attempts for r in first] == [1, 1, 1, 1, 0] and not any(r.cached for r in first)
    assert len(calls) == 1 and calls[0][0] == 4  # one left-padded batch of 4 prompts of different lengths

    # batched == unbatched (greedy), by a client without cache
    single = TransformersClient(str(tiny_dir), batch_size=1, max_new_tokens=8, cache=False)
    assert single.model_id == client.model_id
    assert [r.text for r in single.generate_many(reqs)[:4]] == texts
    assert single.generate("zor blip", _images(tmp_path)[0]) == texts[0]

    # the cache makes a second call free (no generate call), and serves the same texts
    calls.clear()
    second = client.generate_many(reqs)
    assert calls == [] and [r.text for r in second[:4]] == texts
    assert [r.cached for r in second] == [True] * 4 + [False] and [r.attempts for r in second[:4]] == [0] * 4
    assert len(ResponseCache(tmp_path / "c")) == 4
    # other generation parameters are other entries: max_tokens=2 generates again, and bounds the answer
    short = client.generate_many(reqs[:2], max_tokens=2)
    assert len(calls) == 1 and not any(r.cached for r in short)
    assert all(len(r.text.split()) <= 2 for r in short)


def test_noise_answers_are_invalid(tiny_dir, tmp_path):
    parse_response = pytest.importorskip("vlmood.lvlm.parser").parse_response
    client = TransformersClient(str(tiny_dir), cache=False)
    replies = client.generate_many(_requests(tmp_path)[:4], max_tokens=12) + client.generate_many(
        _requests(tmp_path)[:2], max_tokens=1)
    assert all(isinstance(r.text, str) for r in replies)
    for r in replies:
        parsed = parse_response(r.text, ["cat", "dog"])
        assert parsed.valid is False and parsed.confidences == {} and parsed.reason, (r.text, parsed)


def test_built_model_and_fingerprint(tiny_dir):
    model, proc = _tiny()
    client = TransformersClient(model, proc, device="cpu", cache=False, max_new_tokens=4)
    loaded = TransformersClient(str(tiny_dir), device="cpu", cache=False, max_new_tokens=4)
    assert client.model_id.split("@")[1] == loaded.model_id.split("@")[1]  # same weights, same template
    assert client.generate("zor") == loaded.generate("zor")
    other, _ = _tiny(seed=1)
    assert TransformersClient(other, proc, cache=False).model_id != client.model_id
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1.0  # a sampled (first) value changes
    assert TransformersClient(model, proc, cache=False).model_id != client.model_id
    with pytest.raises(InvalidInputError, match=r"^a built model \(LlavaForConditionalGeneration\) needs its "
                                                r"processor: TransformersClient\(model, processor=\.\.\.\)$"):
        TransformersClient(model)


def test_bad_input(tiny_dir, tmp_path):
    missing = tmp_path / "nope" / "model"
    with pytest.raises(InvalidInputError) as e:
        TransformersClient(str(missing))
    assert str(e.value) == f"LVLM model folder not found: {missing}"
    with pytest.raises(EncoderLoadError) as e:
        TransformersClient("no-such-org/no-such-vlm")
    assert str(e.value).startswith("could not load the LVLM no-such-org/no-such-vlm: ") and "\n" not in str(e.value)

    bare = tmp_path / "bare"
    shutil.copytree(tiny_dir, bare)
    (bare / "chat_template.jinja").unlink()
    with pytest.raises(InvalidInputError) as e:
        TransformersClient(str(bare))
    assert str(e.value) == (f"the processor of {bare} has no chat template: pass a processor with chat_template "
                            "set (or save one as chat_template.jinja in the model folder)")

    client = TransformersClient(str(tiny_dir), cache=False, max_new_tokens=3)
    for kw, msg in [({"temperature": -1}, "temperature must be a finite number >= 0, got -1"),
                    ({"max_tokens": 0}, "max_tokens must be a positive integer, got 0"),
                    ({"top_q": 0.5}, "unknown generation parameter(s) for transformers: top_q (temperature, "
                                     "max_tokens and GenerationConfig fields such as top_p)")]:
        with pytest.raises(InvalidInputError) as e:
            client.generate_many([Request("zor")], **kw)
        assert str(e.value) == msg
    replies = client.generate_many([
        Request([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]),
        Request(""), Request("zor", b"not an image"), Request("zor")])
    assert replies[0].error == ("chat message 0 has a 'image_url' part: only text parts are accepted (the image "
                                "goes in Request.image)")
    assert replies[1].error is None and isinstance(replies[1].text, str)  # an empty prompt is still a prompt
    assert replies[2].error == "not an image (or an unsupported format): given as bytes"
    assert replies[3].error is None and isinstance(replies[3].text, str)
    sampled = client.generate_many([Request("zor"), Request("blip")], temperature=1.0, top_p=0.9)
    assert [r.error for r in sampled] == [None, None] and all(isinstance(r.text, str) for r in sampled)
    with pytest.raises(VlmoodError, match="^not an image"):
        client.generate("zor", b"not an image")
