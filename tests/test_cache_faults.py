"""Faulty environments: interrupted and killed runs resume, read-only folders, full disks, broken cache indexes."""
import errno
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import vlmood._signals
import vlmood.features as feats_mod
import vlmood.text.cache as cache_mod
from vlmood.features import extract_features, feature_namespace
from vlmood.text import EmbeddingCache, embed_texts
from vlmood.text.cache import CacheWarning, atomic_write_bytes
from vlmood.text.embed import cache_namespace

PROMPTS = [f"a photo of a {w}" for w in ["cat", "dog", "big red bus", "sea urchin", "tiny house", "x"]]


def make_images(folder, n, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def count_encoded(enc, monkeypatch):
    """A list that grows by the batch size on every image forward pass of ``enc``'s class."""
    seen = []
    real = type(enc)._encode_image_batch

    def spy(this, batch, local):
        seen.append(batch.shape[0])
        return real(this, batch, local)

    monkeypatch.setattr(type(enc), "_encode_image_batch", spy)
    return seen


def cached_rows(enc, local=False):
    """Rows of the default feature cache for ``enc``, read from the shards' own metadata."""
    from safetensors import safe_open

    folder = EmbeddingCache(os.environ["VLMOOD_CACHE"], kind="features").folder(feature_namespace(enc, local))
    total = 0
    for p in folder.glob("*.safetensors"):
        with safe_open(str(p), framework="pt") as f:
            total += int(f.metadata()["count"])
    return total


def cache_warnings(record):
    return [w for w in record if "cache" in str(w.message)]


def all_temp_files(root):
    return [p for p in pathlib.Path(root).rglob("*") if p.name.endswith(".tmp")]


# ------------------------------------------------------------------ interrupted runs (item: resumable runs)
@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_exception_in_encoder_flushes_what_was_computed(tiny, tmp_path, monkeypatch, exc):
    make_images(tmp_path / "imgs", 10)
    real = type(tiny)._encode_image_batch
    calls = []

    def crash_on_third(this, batch, local):
        calls.append(1)
        if len(calls) == 3:
            raise exc("simulated crash")
        return real(this, batch, local)

    monkeypatch.setattr(type(tiny), "_encode_image_batch", crash_on_third)
    with pytest.raises(exc, match="simulated crash"):  # re-raised unchanged after the flush
        extract_features(tiny, tmp_path / "imgs", batch_size=3, num_workers=0, progress=False)
    monkeypatch.setattr(type(tiny), "_encode_image_batch", real)
    seen = count_encoded(tiny, monkeypatch)
    f = extract_features(tiny, tmp_path / "imgs", batch_size=3, num_workers=0, progress=False)
    assert sum(seen) == 4  # the 2 batches of 3 encoded before the crash were saved
    ref = extract_features(tiny, tmp_path / "imgs", cache=False, num_workers=0, progress=False)
    assert torch.allclose(f.features, ref.features, atol=1e-6)


@pytest.mark.parametrize("interval", ["images", "seconds"])
def test_shards_are_written_during_the_run(tiny, tmp_path, monkeypatch, interval):
    make_images(tmp_path / "imgs", 10)
    monkeypatch.setattr(feats_mod, "_FLUSH_IMAGES", 4 if interval == "images" else 10**9, raising=False)
    monkeypatch.setattr(feats_mod, "_FLUSH_SECONDS", 0.0 if interval == "seconds" else 1e9, raising=False)
    real = type(tiny)._encode_image_batch
    on_disk = []

    def spy(this, batch, local):
        on_disk.append(cached_rows(tiny))  # what a SIGKILL now would leave
        return real(this, batch, local)

    monkeypatch.setattr(type(tiny), "_encode_image_batch", spy)
    extract_features(tiny, tmp_path / "imgs", batch_size=2, num_workers=0, progress=False)
    # batches of 2: every 4 images, or after every batch (0 s interval)
    assert on_disk == ([0, 0, 4, 4, 8] if interval == "images" else [0, 2, 4, 6, 8])
    assert cached_rows(tiny) == 10


class Stop(Exception):
    """Stands for the process ending (the default action of SIGTERM) in an in-process test."""


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_interrupted_text_embedding_keeps_the_completed_prompts(tiny, tmp_path, monkeypatch, how):
    import vlmood.text.embed as embed_mod

    prompts = [f"the prompt number {i}." for i in range(1000)]
    monkeypatch.setattr(embed_mod, "_STORE_PROMPTS", 300, raising=False)
    real = type(tiny)._encode_token_batch
    calls = []

    def interrupt_fifth(this, tokens, length):
        calls.append(len(tokens))
        if len(calls) == 5:
            if how == "ctrl-c":
                raise KeyboardInterrupt
            handler = signal.getsignal(signal.SIGTERM)
            assert callable(handler), "no SIGTERM handler while embedding"  # never kill the test run
            os.kill(os.getpid(), signal.SIGTERM)  # vlmood's handler unwinds; the default would kill us
            time.sleep(5)
        return real(this, tokens, length)

    died = []
    monkeypatch.setattr(vlmood._signals, "_die_of", lambda signum: died.append(signum) or (_ for _ in ()).throw(Stop()))
    monkeypatch.setattr(type(tiny), "_encode_token_batch", interrupt_fifth)
    cache = EmbeddingCache(tmp_path / "c")
    with pytest.raises(KeyboardInterrupt if how == "ctrl-c" else Stop):
        embed_texts(tiny, prompts, batch_size=100, cache=cache)
    assert died == ([] if how == "ctrl-c" else [signal.SIGTERM])
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    monkeypatch.setattr(type(tiny), "_encode_token_batch", real)
    hits = EmbeddingCache(tmp_path / "c").get(cache_namespace(tiny), prompts)
    assert len(hits) == 400  # a 300-prompt shard after batch 3, and batch 4 when the 5th was interrupted
    ref = embed_texts(tiny, prompts)
    got = torch.stack([hits[i] for i in sorted(hits)])
    assert torch.allclose(got, ref[sorted(hits)], atol=1e-6)
    calls.clear()
    monkeypatch.setattr(type(tiny), "_encode_token_batch", lambda this, t, n: calls.append(len(t)) or real(this, t, n))
    again = embed_texts(tiny, prompts, batch_size=100, cache=cache)
    assert sum(calls) == 600 and torch.allclose(again, ref, atol=1e-6)  # the run resumes


CHILD = r"""
import sys, time
import vlmood.features as F
from vlmood.testing import tiny_encoder

folder, flush_images, slow_from, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
F._FLUSH_IMAGES = flush_images
enc = tiny_encoder(0)
real = type(enc)._encode_image_batch
calls = [0]

def slow(self, batch, local):
    calls[0] += 1
    print(f"call {calls[0]}", flush=True)
    if calls[0] >= slow_from:
        time.sleep(30)  # the parent signals us here
    return real(self, batch, local)

type(enc)._encode_image_batch = slow
F.extract_features(enc, folder, batch_size=2, num_workers=workers, progress=False)
print("finished", flush=True)
"""


def run_child_and_signal(folder, flush_images, at_call, sig, workers=0):
    """Run an extraction in a subprocess and send it ``sig`` while its encoder call ``at_call`` is running; with
    ``workers`` (DataLoader decoding processes), to its whole process group, as a terminal or a job manager does."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(folder), str(flush_images), str(at_call), str(workers)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=workers > 0)
    try:
        for line in proc.stdout:
            if line.strip() == f"call {at_call}":
                break
        else:
            pytest.fail(f"child ended before call {at_call}: {proc.stderr.read()}")
        if workers:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        proc.wait(timeout=60)
        return proc.returncode, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_flushes_then_terminates_like_the_default(tiny, tmp_path, monkeypatch):
    make_images(tmp_path / "imgs", 10)
    rc, err = run_child_and_signal(tmp_path / "imgs", 10**9, 3, signal.SIGTERM)  # 2 batches of 2 done
    assert rc == -signal.SIGTERM, err  # killed by SIGTERM, as without vlmood's handler
    assert "Traceback" not in err
    seen = count_encoded(tiny, monkeypatch)
    extract_features(tiny, tmp_path / "imgs", batch_size=2, num_workers=0, progress=False)
    assert sum(seen) == 6  # only the rest: the 4 images encoded before SIGTERM were flushed
    assert not all_temp_files(os.environ["VLMOOD_CACHE"])
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # not left installed in this process either


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="no process groups")
def test_sigterm_to_the_process_group_with_workers_prints_no_traceback(tiny, tmp_path, monkeypatch):
    make_images(tmp_path / "imgs", 12)
    rc, err = run_child_and_signal(tmp_path / "imgs", 2, 3, signal.SIGTERM, workers=2)  # 2 batches of 2 done
    assert rc == -signal.SIGTERM, err
    assert "Traceback" not in err and "Exception ignored" not in err and "killed by signal" not in err, err
    seen = count_encoded(tiny, monkeypatch)
    extract_features(tiny, tmp_path / "imgs", batch_size=2, num_workers=0, progress=False)
    assert sum(seen) == 8  # the 4 images encoded before SIGTERM were flushed


def test_sigkill_loses_at_most_the_last_interval(tiny, tmp_path, monkeypatch):
    make_images(tmp_path / "imgs", 12)
    rc, err = run_child_and_signal(tmp_path / "imgs", 4, 6, signal.SIGKILL)  # 5 batches of 2 done
    assert rc == -signal.SIGKILL, err
    seen = count_encoded(tiny, monkeypatch)
    extract_features(tiny, tmp_path / "imgs", batch_size=2, num_workers=0, progress=False)
    assert sum(seen) == 4  # flushed after 4 and 8 images; the 5th batch (pending) and the 6th are redone


def test_sigterm_handler_only_while_extracting(tiny, tmp_path, monkeypatch):
    make_images(tmp_path / "imgs", 4)
    seen = {}
    real = type(tiny)._encode_image_batch

    def spy(this, batch, local):
        seen["handler"] = signal.getsignal(signal.SIGTERM)
        return real(this, batch, local)

    monkeypatch.setattr(type(tiny), "_encode_image_batch", spy)
    extract_features(tiny, tmp_path / "imgs", batch_size=2, num_workers=0, cache=False, progress=False)
    assert callable(seen["handler"]) and seen["handler"] not in (signal.SIG_DFL, signal.SIG_IGN)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    mine = signal.signal(signal.SIGTERM, lambda *a: None)  # an application's own handler is left alone
    try:
        extract_features(tiny, tmp_path / "imgs", batch_size=2, num_workers=0, cache=False, progress=False)
        assert seen["handler"] is signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, mine)


# ------------------------------------------------------------------ read-only folder, full disk
@pytest.fixture
def make_readonly(monkeypatch):
    """``make_readonly(path)``: writes under ``path`` fail. chmod 0o555 where that works; as root (where it does
    not), creating folders and opening files for writing there raise ``OSError(EROFS)``."""
    chmodded = []

    def apply(path):
        path = pathlib.Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for p in [path, *[q for q in path.rglob("*") if q.is_dir()]]:
            p.chmod(0o555)
            chmodded.append(p)
        if not os.access(path, os.W_OK):
            return
        under = str(path.resolve())
        real_mkdir, real_open = pathlib.Path.mkdir, open

        def is_under(p):
            return str(pathlib.Path(p).resolve()).startswith(under)

        def mkdir(self, *a, **kw):
            if is_under(self) and not self.is_dir():
                raise OSError(errno.EROFS, "Read-only file system", str(self))
            return real_mkdir(self, *a, **kw)

        def ro_open(file, mode="r", *a, **kw):
            if any(c in mode for c in "wax+") and is_under(file):
                raise OSError(errno.EROFS, "Read-only file system", str(file))
            return real_open(file, mode, *a, **kw)

        monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
        monkeypatch.setattr(cache_mod, "open", ro_open, raising=False)

    yield apply
    for p in chmodded:
        p.chmod(0o755)


def test_readonly_feature_cache_on_a_miss(tiny, tmp_path, monkeypatch, make_readonly):
    make_images(tmp_path / "imgs", 9)
    extract_features(tiny, sorted((tmp_path / "imgs").glob("*.png"))[:3], num_workers=0, progress=False)
    make_readonly(os.environ["VLMOOD_CACHE"])
    monkeypatch.setattr(feats_mod, "_FLUSH_IMAGES", 2, raising=False)  # many flushes, still one warning
    seen = count_encoded(tiny, monkeypatch)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        f = extract_features(tiny, tmp_path / "imgs", batch_size=2, num_workers=0, progress=False)
    assert sum(seen) == 6  # the 3 cached images were read, the 6 others computed
    ref = extract_features(tiny, tmp_path / "imgs", cache=False, num_workers=0, progress=False)
    assert torch.allclose(f.features, ref.features, atol=1e-6)
    (w,) = cache_warnings(record)
    assert w.category is CacheWarning and "continuing without it" in str(w.message)
    assert "Read-only file system" in str(w.message) or "Permission denied" in str(w.message)


def test_readonly_text_cache_on_a_miss(tiny, tmp_path, make_readonly):
    make_readonly(tmp_path / "ro")
    cache = EmbeddingCache(tmp_path / "ro" / "c")  # cannot even be created
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        a = embed_texts(tiny, PROMPTS[:3], cache=cache)
        b = embed_texts(tiny, PROMPTS, cache=cache)
    assert torch.allclose(b, embed_texts(tiny, PROMPTS), atol=1e-6) and torch.equal(a, b[:3])
    assert len(cache_warnings(record)) == 1  # once per cache root, not once per call


class FullDiskFile:
    """A file whose ``write`` writes half of the data, then fails like a full disk (or raises ``error``)."""

    def __init__(self, f, error=None):
        self.f, self.error = f, error

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        raise self.error or OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.fixture
def full_disk(monkeypatch):
    real_open = open

    def fake_open(file, mode="r", *a, **kw):
        f = real_open(file, mode, *a, **kw)
        return FullDiskFile(f) if mode == "wb" else f

    import vlmood._io as io_mod

    monkeypatch.setattr(cache_mod, "open", fake_open, raising=False)
    monkeypatch.setattr(io_mod, "open", fake_open, raising=False)  # where atomic_write_bytes lives


def test_atomic_write_failure_removes_its_temp_file(tmp_path, monkeypatch, full_disk):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(OSError, match="No space left"):
        atomic_write_bytes(target, b"new contents")
    assert target.read_text() == "old" and not all_temp_files(tmp_path)
    import vlmood._io as io_mod

    monkeypatch.setattr(io_mod, "open", lambda *a: FullDiskFile(open(*a), KeyboardInterrupt()), raising=False)
    with pytest.raises(KeyboardInterrupt):  # every failure path, not only OSError
        atomic_write_bytes(target, b"new contents")
    assert target.read_text() == "old" and not all_temp_files(tmp_path)


def test_full_disk_during_feature_cache_write(tiny, tmp_path, monkeypatch, full_disk):
    make_images(tmp_path / "imgs", 7)
    monkeypatch.setattr(feats_mod, "_FLUSH_IMAGES", 2, raising=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        f = extract_features(tiny, tmp_path / "imgs", batch_size=2, local=True, num_workers=0, progress=False)
    ref = extract_features(tiny, tmp_path / "imgs", local=True, cache=False, num_workers=0, progress=False)
    assert torch.allclose(f.features, ref.features, atol=1e-6) and torch.allclose(f.local, ref.local, atol=1e-6)
    (w,) = cache_warnings(record)
    assert "No space left on device" in str(w.message)
    assert not all_temp_files(os.environ["VLMOOD_CACHE"])


def test_full_disk_during_text_cache_write(tiny, tmp_path, full_disk):
    cache = EmbeddingCache(tmp_path / "c")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = embed_texts(tiny, PROMPTS, cache=cache)
    assert torch.allclose(got, embed_texts(tiny, PROMPTS), atol=1e-6)
    assert len(cache_warnings(record)) == 1 and not all_temp_files(tmp_path / "c")


def test_stale_temp_files_are_swept(tiny, tmp_path):
    cache = EmbeddingCache(tmp_path / "c")
    embed_texts(tiny, PROMPTS, cache=cache)
    folder = cache.folder(cache_namespace(tiny))
    stale, fresh = folder / ".x.safetensors.dead.tmp", folder / ".y.safetensors.busy.tmp"
    stale.write_bytes(b"partial")
    fresh.write_bytes(b"a concurrent writer's")
    old = time.time() - 2 * cache_mod.STALE_TMP_SECONDS
    os.utime(stale, (old, old))
    again = EmbeddingCache(tmp_path / "c")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hits = again.get(cache_namespace(tiny), PROMPTS)
    assert len(hits) == len(PROMPTS)
    assert not stale.exists() and fresh.exists()


# ------------------------------------------------------------------ malformed index.json
@pytest.mark.parametrize("bad", [
    '{"shards": {"ab', "[1, 2]", '{"shards": [1]}', '{"shards": "abc"}', '{"shards": {"SHARD": 5}}',
    '{"shards": {"SHARD": {"count": "3", "checksum": 7}}}', "",
])
def test_malformed_index_is_rebuilt_from_the_shards(tiny, tmp_path, monkeypatch, bad):
    from safetensors import safe_open

    cache = EmbeddingCache(tmp_path / "c")
    first = embed_texts(tiny, PROMPTS[:3], cache=cache)
    folder = cache.folder(cache_namespace(tiny))
    (shard,) = folder.glob("*.safetensors")
    (folder / "index.json").write_text(bad.replace("SHARD", shard.name))
    calls = []
    real = type(tiny)._encode_token_batch
    monkeypatch.setattr(type(tiny), "_encode_token_batch", lambda self, t, n: calls.append(len(t)) or real(self, t, n))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the good shard is neither reported nor removed
        both = embed_texts(tiny, PROMPTS, cache=EmbeddingCache(tmp_path / "c"))
    assert sum(calls) == 3 and torch.equal(both[:3], first)
    index = json.loads((folder / "index.json").read_text())["shards"]
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) == 2 and set(index) == {p.name for p in shards}
    for p in shards:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata()
        assert index[p.name] == {"count": int(meta["count"]), "checksum": meta["checksum"]}
    assert sorted(e["count"] for e in index.values()) == [3, 3]


# ------------------------------------------------------------------ unreadable shards, warnings per kind
@pytest.mark.parametrize("error", [PermissionError(errno.EACCES, "Permission denied"),
                                   OSError(errno.EIO, "Input/output error"),
                                   OSError(errno.EMFILE, "Too many open files"), MemoryError()])
def test_unreadable_shard_is_skipped_not_removed(tiny, tmp_path, monkeypatch, error):
    import safetensors

    cache = EmbeddingCache(tmp_path / "c")
    first = embed_texts(tiny, PROMPTS[:3], cache=cache)
    folder = cache.folder(cache_namespace(tiny))
    (old,) = folder.glob("*.safetensors")
    embed_texts(tiny, PROMPTS, cache=cache)
    (bad,) = set(folder.glob("*.safetensors")) - {old}  # holds PROMPTS[3:]
    real = safetensors.safe_open

    def flaky(path, *a, **kw):
        if pathlib.Path(path) == bad:
            raise error
        return real(path, *a, **kw)

    monkeypatch.setattr(safetensors, "safe_open", flaky)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        hits = EmbeddingCache(tmp_path / "c").get(cache_namespace(tiny), PROMPTS)
        EmbeddingCache(tmp_path / "c").get(cache_namespace(tiny), PROMPTS)  # no second warning
    assert sorted(hits) == [0, 1, 2] and torch.equal(torch.stack([hits[i] for i in range(3)]), first)
    (w,) = cache_warnings(record)
    assert w.category is CacheWarning and f"cannot read text cache shard {bad}" in str(w.message)
    assert "skipping it (not removed)" in str(w.message) and type(error).__name__ in str(w.message)
    assert bad.exists() and old.exists()  # neither removed: the bad one is not known to be corrupted
    monkeypatch.setattr(safetensors, "safe_open", real)
    assert len(EmbeddingCache(tmp_path / "c").get(cache_namespace(tiny), PROMPTS)) == len(PROMPTS)


def test_cache_warnings_are_once_per_kind(tmp_path, full_disk):
    emb = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for kind in ("text", "features", "features", "text"):
            assert EmbeddingCache(tmp_path / "c", kind=kind).put("ns", ["a", "b"], emb) is None
    got = [str(w.message) for w in cache_warnings(record)]
    assert len(got) == 2 and "write the text cache" in got[0] and "write the features cache" in got[1], got
