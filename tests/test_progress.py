"""vlmood._progress: plain lines outside a terminal (start, throttled progress with ETA, done), quiet small jobs,
a tqdm bar on a terminal; and the start lines of text embeddings and image features."""
import io

import pytest

from vlmood import _progress
from vlmood._progress import duration, progress


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


class Pipe(io.StringIO):
    """stderr redirected to a file or a pipe."""

    def isatty(self):
        return False


class Terminal(io.StringIO):
    def isatty(self):
        return True


def run(total, per_step, steps, step_seconds, enabled=None, **kw):
    """Drive a job with a fake clock: ``steps`` updates of ``per_step`` units, ``step_seconds`` apart."""
    out, clock = Pipe(), Clock()
    with progress(total, "text embeddings", "prompts", enabled, stream=out, clock=clock, **kw) as p:
        for _ in range(steps):
            clock.t += step_seconds
            p.update(per_step)
    return out.getvalue().splitlines()


def test_long_job_prints_start_throttled_progress_with_eta_and_done():
    # 1000 prompts, 100 updates of 10 prompts, 3 s each: 300 s, 3.33 prompts/s
    lines = run(1000, 10, 100, 3.0, start="encoding 1,000 prompts with toy — first time only, cached afterwards")
    assert lines[0] == "encoding 1,000 prompts with toy — first time only, cached afterwards"
    assert lines[-1] == "text embeddings: done, 1,000 prompts in 5m00s"
    middle = lines[1:-1]
    # a line at most every 10% of the job and 10 s apart: the first 100 prompts after the start line (printed at the
    # second update, 20 prompts, t=6 s, when the rate since the first update predicts 300 s > LONG_SECONDS)
    assert [int(ln.split("/")[0].split()[-1].replace(",", "")) for ln in middle] == list(range(120, 1000, 100))
    assert middle[0] == "text embeddings: 120/1,000 prompts (12%), 3.3 prompts/s, ETA 4m24s"  # 880 / (10/3)
    assert all("ETA" in ln for ln in middle)


def test_lines_are_at_least_ten_seconds_apart():
    # 100 updates of 1% each, 1 s apart: the 10% rule alone would allow a line every 10 updates; time allows one
    # every 10 s as well, so both hold at once: 10 s and 10% between lines
    lines = run(100, 1, 100, 1.0, enabled=True)
    assert lines[0] == "text embeddings: 100 prompts"
    times = [int(ln.split("/")[0].split()[-1]) for ln in lines[1:-1]]
    assert times and all(b - a >= 10 for a, b in zip(times, times[1:]))
    lines = run(100, 1, 100, 0.5, enabled=True)  # 50 s in all: lines 10 s (20 updates) apart, not every 10%
    times = [int(ln.split("/")[0].split()[-1]) for ln in lines[1:-1]]
    assert times == [20, 40, 60, 80]


def test_small_jobs_print_nothing():
    assert run(100, 10, 10, 0.5) == []  # 5 s, predicted 5 s: quiet
    assert run(10_000, 5000, 2, 4.0) == []  # big but fast
    assert run(100, 10, 10, 5.0, enabled=False) == []  # 50 s but disabled
    assert run(0, 1, 0, 1.0, enabled=True) == []  # nothing to do


def test_a_job_is_announced_once_it_runs_long():
    # 100 updates of 0.2 s: predicted 20 s (< LONG_SECONDS), announced once it has run QUIET_SECONDS
    lines = run(100, 1, 100, 0.2)
    assert lines[0] == "text embeddings: 100 prompts"
    assert lines[-1] == "text embeddings: done, 100 prompts in 20s"
    assert len(lines) >= 2
    # predicted long from the second update on (the first may be a slow warm-up): announced then
    assert run(1000, 1, 2, 1.0)[0] == "text embeddings: 1,000 prompts"
    assert run(1000, 1, 1, 9.0) == []  # one slow (warm-up) update predicts nothing


def test_stopped_job_and_postfix():
    out, clock = Pipe(), Clock()
    with pytest.raises(KeyboardInterrupt):
        with progress(10, "coop training", "steps", True, stream=out, clock=clock) as p:
            clock.t += 65
            p.set_postfix(epoch="2/5", loss="0.5000")
            p.update(4)
            raise KeyboardInterrupt
    assert out.getvalue().splitlines() == [
        "coop training: 10 steps",
        "coop training: 4/10 steps (40%), 0.1 steps/s, ETA 1m38s (epoch 2/5, loss 0.5000)",  # 6 / (4/65) s
        "coop training: stopped at 4/10 steps after 1m05s (epoch 2/5, loss 0.5000)"]


def test_ascii_stream_and_broken_stream():
    out = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    with progress(1, "x", "items", True, start="a — b", stream=out) as p:
        p.update(1)
    out.flush()
    assert out.buffer.getvalue().decode().splitlines()[0] == "a ? b"
    closed = Pipe()
    closed.close()
    with progress(3, "x", "items", True, stream=closed) as p:  # never raises
        p.update(3)


def test_terminal_uses_tqdm(monkeypatch):
    made = []
    import tqdm.auto

    real = tqdm.auto.tqdm

    def spy(*a, **kw):
        made.append(kw)
        return real(*a, **kw)

    monkeypatch.setattr(tqdm.auto, "tqdm", spy)
    out = Terminal()
    with progress(50, "encoding images", "images", True, stream=out) as p:
        p.update(50)
    assert made and made[0]["total"] == 50 and made[0]["delay"] == 0 and made[0]["file"] is out
    text = out.getvalue()
    assert "encoding images:   0%|" in text and "0/50" in text and "done" not in text  # a bar, not lines
    made.clear()
    with progress(50, "auto", "images", None, stream=Terminal()) as p:
        p.update(50)
    assert made[0]["delay"] == _progress.TTY_DELAY


def test_duration():
    assert [duration(s) for s in (4.24, 42.4, 125, 3720)] == ["4.2s", "42s", "2m05s", "1h02m"]


def test_embedding_and_feature_start_lines(tiny, monkeypatch, tmp_path):
    """The start lines say how many texts/images, with which model, and that the result is cached."""
    import vlmood
    from PIL import Image

    seen = []
    real = _progress.progress

    def spy(total, desc, unit="items", enabled=None, **kw):
        seen.append((total, kw.get("start")))
        return real(total, desc, unit, False, **kw)

    monkeypatch.setattr("vlmood.text.embed._progress", spy)
    monkeypatch.setattr("vlmood.features._progress", spy)
    vlmood.text.embed.class_embeddings(tiny, ["cat", "dog", "fox"], ["a {}."], what="lexicon words")
    assert seen[-1] == (3, f"encoding 3 lexicon words with {tiny.spec} — first time only, cached afterwards")
    vlmood.text.embed.class_embeddings(tiny, ["cat", "dog", "owl", "emu"], ["a {}.", "the {}."], cache=False,
                                       what="lexicon words")
    assert seen[-1] == (8, f"encoding 8 prompts (4 lexicon words x 2 templates) with {tiny.spec}")
    vlmood.text.embed.embed_texts(tiny, ["a cat.", "a dog.", "a yak."], cache=True)
    assert seen[-1] == (1, f"encoding 1 prompts with {tiny.spec} (2 already cached) — first time only, "
                           "cached afterwards")
    imgs = [Image.new("RGB", (20, 20), c) for c in ("red", "blue")]
    vlmood.extract_features(tiny, imgs, num_workers=0)
    assert seen[-1] == (2, f"encoding 2 images of images with {tiny.spec} — first time only, cached afterwards")
