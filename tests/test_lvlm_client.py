"""OpenAI-compatible LVLM client and response cache, against the loopback chat-completions server."""
import email.utils
import io
import json
import logging
import os
import time
import warnings

import pytest
from PIL import Image

pytest.importorskip("httpx")

from lvlm_server import (drop, free_port, loopback, rate_limited, reject,  # noqa: F401 (loopback: a fixture)
                         request_image, request_image_bytes, request_text, sequence, server_error, slow)
from vlmood.errors import InvalidInputError, VlmoodError
from vlmood.lvlm.base import Request
from vlmood.lvlm.cache import ResponseCache, image_hash
from vlmood.lvlm.http import OpenAIClient, retry_after_seconds
from vlmood.text.cache import CacheWarning

MODEL = "loopback-vl"
KEY = "sk-TEST-secret-4242"


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch):
    for k in ("VLMOOD_LVLM_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(k, raising=False)


def red(i):
    return Image.new("RGB", (6, 5), (i, 10, 20))


def red_of(req):
    """The red value of the request's image (the tests' image index)."""
    return request_image(req).getpixel((0, 0))[0]


def client(server, tmp_path, **kw):
    kw.setdefault("cache", tmp_path / "replies")
    kw.setdefault("backoff", 0.01)
    kw.setdefault("jitter", 0.0)
    return OpenAIClient(server.base_url, kw.pop("model", MODEL), **kw)


# --------------------------------------------------------------------------------------------- requests
def test_well_formed_replies_in_order_with_the_request_body(loopback, tmp_path):
    server = loopback(lambda req: f"image {red_of(req)}: {request_text(req)}", latency=0.01)
    c = client(server, tmp_path, concurrency=4)
    replies = c.generate_many([Request(f"prompt {i}", red(i)) for i in range(10)])
    assert [r.text for r in replies] == [f"image {i}: prompt {i}" for i in range(10)]
    assert all(r.error is None and r.attempts == 1 and not r.cached for r in replies)
    body = next(b for b in server.bodies if red_of(b) == 3)
    assert body["model"] == MODEL and body["temperature"] == 0.0 and body["max_tokens"] == 512
    parts = body["messages"][0]["content"]
    assert body["messages"][0]["role"] == "user" and [p["type"] for p in parts] == ["image_url", "text"]
    assert parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert request_image(body).tobytes() == red(3).tobytes()  # lossless PNG
    assert server.model_listings == 1  # check() ran once
    assert all("authorization" not in {k.lower() for k in h} for h in server.headers)  # no key, no header
    assert c.model_id == f"{server.base_url}|{MODEL}"


def test_text_only_prompt_messages_and_params(loopback, tmp_path):
    server = loopback(lambda req: json.dumps(req["messages"]))
    c = client(server, tmp_path)
    assert json.loads(c.generate("hello")) == [{"role": "user", "content": "hello"}]
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is it?"}]
    sent = json.loads(c.generate(msgs, red(1), temperature=0.7, max_tokens=9, top_p=0.5))
    assert sent[0] == msgs[0] and sent[1]["content"][1] == {"type": "text", "text": "what is it?"}
    last = server.bodies[-1]
    assert (last["temperature"], last["max_tokens"], last["top_p"]) == (0.7, 9, 0.5)
    with pytest.raises(InvalidInputError, match="string or a non-empty list of chat messages"):
        c.generate_many([Request(42)])


def test_image_files_and_bytes_keep_their_encoding(loopback, tmp_path):
    server = loopback(lambda req: "ok")
    jpg = tmp_path / "a.jpg"
    red(7).save(jpg, quality=80)
    png = io.BytesIO()
    red(8).save(png, format="PNG")
    c = client(server, tmp_path, concurrency=1)  # requests reach the server in order
    replies = c.generate_many([Request("p", str(jpg)), Request("p", png.getvalue()), Request("p", b"not an image"),
                               Request("p", str(tmp_path / "missing.png"))])
    assert [r.text for r in replies[:2]] == ["ok", "ok"]
    assert request_image_bytes(server.bodies[0]) == ("image/jpeg", jpg.read_bytes())
    assert request_image_bytes(server.bodies[1]) == ("image/png", png.getvalue())
    assert replies[2].error == "image bytes is not an image (unrecognised format)" and replies[2].text is None
    assert replies[3].error.startswith(f"cannot read image {tmp_path / 'missing.png'}: ")
    assert server.requests == 2  # bad images are never sent
    with pytest.raises(InvalidInputError, match="PIL image, a file path or encoded bytes, not list"):
        c.generate_many([Request("p", [1, 2])])


# --------------------------------------------------------------------------------------------- retries
def test_429_retry_after_is_honoured(loopback, tmp_path):
    server = loopback(sequence(rate_limited("1"), "fine"))
    c = client(server, tmp_path, concurrency=1)
    t = time.monotonic()
    r = c.generate_many([Request("p", red(1))])[0]
    elapsed = time.monotonic() - t
    assert (r.text, r.attempts, server.requests) == ("fine", 2, 2)
    assert 1.0 <= elapsed < 3.0  # the backoff alone would be 0.01 s


def test_retry_after_is_capped(loopback, tmp_path):
    server = loopback(sequence(rate_limited("3600"), "fine"))
    c = client(server, tmp_path, max_retry_after=0.2)
    t = time.monotonic()
    assert c.generate("p", red(1)) == "fine"
    assert 0.2 <= time.monotonic() - t < 2.0


def test_retry_after_parsing():
    now = 1_700_000_000.0
    assert retry_after_seconds("2") == 2.0 and retry_after_seconds(" 0.5 ") == 0.5
    assert retry_after_seconds(email.utils.formatdate(now + 30, usegmt=True), now=now) == 30.0
    assert retry_after_seconds(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0
    assert retry_after_seconds("-3") == 0.0
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None


def test_500_then_success_with_exponential_backoff(loopback, tmp_path):
    server = loopback(sequence(server_error(500), server_error(503), "recovered"))
    c = client(server, tmp_path, backoff=0.15)
    t = time.monotonic()
    r = c.generate_many([Request("p", red(1))])[0]
    assert (r.text, r.attempts, server.requests) == ("recovered", 3, 3)
    assert time.monotonic() - t >= 0.15 + 0.30  # backoff, then twice the backoff


def test_backoff_delays_with_seeded_jitter(tmp_path):
    kw = dict(cache=False, backoff=0.5, max_backoff=3.0, jitter=0.1, seed=7)
    a = OpenAIClient("http://127.0.0.1:1/v1", MODEL, **kw)
    b = OpenAIClient("http://127.0.0.1:1/v1", MODEL, **kw)
    da = [a._delay(k, None) for k in range(1, 6)]
    assert da == [b._delay(k, None) for k in range(1, 6)]  # same seed, same delays
    for k, d in enumerate(da, 1):
        base = min(0.5 * 2 ** (k - 1), 3.0)
        assert base <= d <= base * 1.1
    assert a._delay(1, 7.5) == 7.5 and a._delay(1, 1e6) == 60.0  # Retry-After wins, capped


def test_dropped_connection_then_success(loopback, tmp_path):
    server = loopback(sequence(drop(), "after the drop"))
    r = client(server, tmp_path).generate_many([Request("p", red(1))])[0]
    assert (r.text, r.attempts, server.requests) == ("after the drop", 2, 2)


def test_timeout_gives_an_error_after_max_retries(loopback, tmp_path):
    server = loopback(slow(3.0))
    c = client(server, tmp_path, timeout=0.2, max_retries=2)
    t = time.monotonic()
    r = c.generate_many([Request("p", red(1))])[0]
    assert time.monotonic() - t < 2.0
    assert r.text is None and r.attempts == 3 and server.requests == 3
    assert r.error == (f"no answer from {server.base_url}/chat/completions within 0.2 s (gave up after 3 attempts)")
    with pytest.raises(VlmoodError, match="within 0.2 s"):
        c.generate("p", red(2))


def test_rejected_image_is_recorded_and_the_run_goes_on(loopback, tmp_path):
    server = loopback(lambda req: reject("Invalid image: decoder failed\n(line 2)") if red_of(req) == 3 else "fine")
    c = client(server, tmp_path, concurrency=3)
    replies = c.generate_many([Request("p", red(i)) for i in range(6)])
    assert [r.text for r in replies] == ["fine"] * 3 + [None] + ["fine"] * 2
    assert replies[3].error == (f"HTTP 400 from {server.base_url}/chat/completions: "
                                "Invalid image: decoder failed (line 2)")
    assert replies[3].attempts == 1 and server.requests == 6  # a 4xx other than 429 is not retried
    assert len(ResponseCache(tmp_path / "replies")) == 5  # errors are never cached


def test_unreadable_200_reply_is_an_error(loopback, tmp_path):
    from lvlm_server import Behaviour

    server = loopback(sequence(Behaviour(status=200, body={"choices": []})))
    r = client(server, tmp_path).generate_many([Request("p")])[0]
    assert r.error == f"unreadable reply from {server.base_url}/chat/completions: the reply has no choices[0].message"


# --------------------------------------------------------------------------------------------- concurrency
@pytest.mark.parametrize("limit", [1, 4])
def test_concurrency_limit(loopback, tmp_path, limit):
    server = loopback(lambda req: "ok", latency=0.08)
    c = client(server, tmp_path, concurrency=limit, cache=False)
    replies = c.generate_many([Request("p", red(i)) for i in range(12)])
    assert [r.text for r in replies] == ["ok"] * 12
    assert server.max_in_flight == limit


# --------------------------------------------------------------------------------------------- cache
def test_second_run_is_served_from_the_cache(loopback, tmp_path):
    server = loopback(lambda req: f"answer {red_of(req)}")
    reqs = [Request("classify", red(i)) for i in range(8)]
    first = client(server, tmp_path).generate_many(reqs)
    server.reset()
    second = client(server, tmp_path).generate_many(reqs)  # a new client (a new process), same cache folder
    assert server.requests == 0
    assert [r.text for r in second] == [r.text for r in first] == [f"answer {i}" for i in range(8)]
    assert all(r.cached and r.attempts == 0 and r.error is None for r in second)
    # another prompt or other generation parameters are other entries
    again = client(server, tmp_path)
    again.generate_many(reqs[:2], temperature=0.5)
    again.generate_many([Request("classify!", red(0))])
    again.generate_many(reqs[:2], max_tokens=100)
    assert server.requests == 5


def test_run_failing_midway_resumes_from_the_cache(loopback, tmp_path):
    server = loopback(lambda req: server_error(502) if red_of(req) >= 5 else f"answer {red_of(req)}")
    reqs = [Request("p", red(i)) for i in range(8)]
    first = client(server, tmp_path, max_retries=0).generate_many(reqs)
    assert [r.error is None for r in first] == [True] * 5 + [False] * 3
    server.script = lambda req: f"answer {red_of(req)}"
    server.reset()
    second = client(server, tmp_path).generate_many(reqs)
    assert sorted(red_of(b) for b in server.bodies) == [5, 6, 7]  # only the missing ones
    assert [r.text for r in second] == [f"answer {i}" for i in range(8)]
    assert [r.cached for r in second] == [True] * 5 + [False] * 3


def test_interrupted_run_resumes_from_the_cache(loopback, tmp_path, monkeypatch):
    server = loopback(lambda req: f"answer {red_of(req)}")
    reqs = [Request("p", red(i)) for i in range(8)]
    c = client(server, tmp_path, concurrency=1)
    real, calls = OpenAIClient._post, []

    def interrupting(self, body, stop):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(self, body, stop)

    monkeypatch.setattr(OpenAIClient, "_post", interrupting)
    with pytest.raises(KeyboardInterrupt):
        c.generate_many(reqs)
    monkeypatch.setattr(OpenAIClient, "_post", real)
    # the 3 answered before the interruption are cached; the worker may have sent one more (answered and cached
    # too) before the interruption reached the caller: every answered request is cached, none is lost
    done = server.requests
    assert done in (3, 4) and len(ResponseCache(tmp_path / "replies")) == done
    server.reset()
    replies = client(server, tmp_path).generate_many(reqs)
    asked = sorted(red_of(b) for b in server.bodies)  # only what no earlier request answered (and cached)
    assert len(asked) == 8 - done and len(set(asked)) == len(asked) and 3 in asked and {0, 1, 2}.isdisjoint(asked)
    assert [r.text for r in replies] == [f"answer {i}" for i in range(8)]


def test_cache_keys_layout_and_roundtrip(tmp_path):
    cache = ResponseCache(tmp_path / "c")
    base = ("http://h/v1|m", "prompt", "sha256:ab", {"temperature": 0.0, "max_tokens": 512})
    k = cache.key(*base)
    assert k == cache.key(*base) and len(k) == 64
    variants = [("http://h/v1|m2",) + base[1:], (base[0], "prompt ", *base[2:]), (*base[:2], "sha256:ac", base[3]),
                (*base[:3], {"temperature": 0.0, "max_tokens": 513}),
                (base[0], [{"role": "user", "content": "prompt"}], *base[2:])]
    assert len({k} | {cache.key(*v) for v in variants}) == 6
    assert cache.get(k) is None
    assert cache.put(k, "an answer ✓")
    assert cache.get(k) == "an answer ✓" and cache.path(k) == tmp_path / "c" / k[:2] / f"{k}.json"
    assert len(cache) == 1 and list((tmp_path / "c").rglob("*.tmp")) == []
    with pytest.raises(TypeError):
        cache.put(k, None)
    with pytest.raises(InvalidInputError, match="JSON data"):
        cache.key("m", {"x": object()}, "none", {})


def test_default_cache_root_is_under_vlmood_cache():
    assert ResponseCache().root == __import__("pathlib").Path(os.environ["VLMOOD_CACHE"]) / "lvlm"


def test_corrupt_entry_is_a_miss_with_one_warning(tmp_path):
    cache = ResponseCache(tmp_path / "c")
    k, other = cache.key("m", "p", "none", {}), cache.key("m", "q", "none", {})
    cache.put(k, "x")
    cache.path(k).write_bytes(b'{"key": "' + k.encode() + b'", "te')  # truncated
    cache.put(other, "y")
    cache.path(other).write_text(json.dumps({"key": k, "text": "not mine"}))  # another key's content
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert cache.get(k) is None and cache.get(k) is None and cache.get(other) is None
    msgs = [str(x.message) for x in w if issubclass(x.category, CacheWarning)]
    assert len(msgs) == 2 and msgs[0].startswith(f"corrupt LVLM response cache entry {cache.path(k)} (")
    cache.put(k, "fresh")
    assert cache.get(k) == "fresh"


def test_failed_write_leaves_no_temp_file_and_warns_once(tmp_path, monkeypatch):
    cache = ResponseCache(tmp_path / "c")

    def full_disk(*a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert cache.put(cache.key("m", "a", "none", {}), "x") is False
        assert cache.put(cache.key("m", "b", "none", {}), "y") is False
    assert [str(x.message) for x in w] == [
        f"cannot write the LVLM response cache {tmp_path / 'c'}: No space left on device; replies are not cached"]
    assert [p for p in (tmp_path / "c").rglob("*") if p.is_file()] == []


def test_image_hash_by_content(tmp_path):
    png = io.BytesIO()
    red(1).save(png, format="PNG")
    (tmp_path / "a.png").write_bytes(png.getvalue())
    assert image_hash(str(tmp_path / "a.png")) == image_hash(png.getvalue()) == image_hash(tmp_path / "a.png")
    assert image_hash(red(1)) == image_hash(red(1).copy()) != image_hash(red(2))
    assert image_hash(None) == "none"
    with pytest.raises(InvalidInputError):
        image_hash(3.5)


# --------------------------------------------------------------------------------------------- bad servers
def test_unreachable_server_one_line_before_any_image(tmp_path, monkeypatch):
    import vlmood.lvlm.http as http_mod

    url = f"http://127.0.0.1:{free_port()}/v1"
    c = OpenAIClient(url, MODEL, cache=tmp_path / "c")
    with pytest.raises(VlmoodError) as e:
        c.check()
    msg = str(e.value)
    assert msg.startswith(f"cannot reach the LVLM server at {url} (ConnectError: ") and msg.endswith("is it running?")
    assert "\n" not in msg

    def touched(*a):
        raise AssertionError("an image was processed")

    monkeypatch.setattr(http_mod, "image_hash", touched)
    monkeypatch.setattr(http_mod, "image_data_url", touched)
    with pytest.raises(VlmoodError, match=f"cannot reach the LVLM server at {url} "):
        c.generate_many([Request("p", red(i)) for i in range(3)])


def test_unknown_model(loopback, tmp_path):
    server = loopback(lambda req: "ok", models=["qwen2-vl-7b", "llava:latest"])
    c = client(server, tmp_path, model="gpt-9")
    with pytest.raises(VlmoodError) as e:
        c.generate_many([Request("p", red(1))])
    assert str(e.value) == (f"LVLM server at {server.base_url} does not serve model 'gpt-9'; it serves: "
                            "qwen2-vl-7b, llava:latest")
    assert server.requests == 0
    assert client(server, tmp_path, model="llava").check() == ["qwen2-vl-7b", "llava:latest"]  # Ollama's tag
    c._checked = True  # skip the check: the server's own 404 is passed on, not retried
    r = c.generate_many([Request("p", red(1))])[0]
    assert r.error == f"HTTP 404 from {server.base_url}/chat/completions: The model `gpt-9` does not exist."
    assert r.attempts == 1


def test_bad_arguments():
    with pytest.raises(InvalidInputError, match="must start with http"):
        OpenAIClient("localhost:8000", MODEL)
    with pytest.raises(InvalidInputError, match="concurrency must be an integer >= 1, got 0"):
        OpenAIClient("http://h/v1", MODEL, concurrency=0)
    with pytest.raises(InvalidInputError, match="timeout must be > 0"):
        OpenAIClient("http://h/v1", MODEL, timeout=0)
    with pytest.raises(InvalidInputError, match="model name is empty"):
        OpenAIClient("http://h/v1", " ")


# --------------------------------------------------------------------------------------------- API key
def test_api_key_is_sent_but_never_logged_cached_or_shown(loopback, tmp_path, caplog):
    script = lambda req: (reject(f"Incorrect API key provided: {KEY}", 401) if red_of(req) == 1  # noqa: E731
                          else server_error(500, f"upstream rejected {KEY}") if red_of(req) == 2 else "ok")
    server = loopback(script)
    c = client(server, tmp_path, api_key=KEY, max_retries=1)
    with caplog.at_level(logging.DEBUG):
        replies = c.generate_many([Request("p", red(i)) for i in range(3)])
    assert {h.get("Authorization") or h.get("authorization") for h in server.headers} == {f"Bearer {KEY}"}
    assert replies[0].text == "ok"
    assert replies[1].error == f"HTTP 401 from {server.base_url}/chat/completions: Incorrect API key provided: ***"
    assert replies[2].error.endswith("upstream rejected *** (gave up after 2 attempts)")
    assert "retry 1/1" in caplog.text and KEY not in caplog.text
    assert KEY not in repr(c) and KEY not in c.model_id
    files = [p for p in (tmp_path / "replies").rglob("*") if p.is_file()]
    assert len(files) == 1 and all(KEY.encode() not in p.read_bytes() for p in files)


def test_api_key_from_the_environment(loopback, tmp_path, monkeypatch):
    server = loopback(lambda req: "ok")
    monkeypatch.setenv("OPENAI_API_KEY", "from-openai")
    client(server, tmp_path, cache=False).generate("p")
    monkeypatch.setenv("VLMOOD_LVLM_API_KEY", "from-vlmood")
    client(server, tmp_path, cache=False).generate("p")
    client(server, tmp_path, cache=False, api_key="explicit").generate("p")
    auth = [h.get("Authorization") or h.get("authorization") for h in server.headers]
    assert auth == ["Bearer from-openai", "Bearer from-vlmood", "Bearer explicit"]
