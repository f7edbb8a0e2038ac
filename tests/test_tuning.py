"""Few-shot prompt learning (vlmood.tuning): CoOp / LoCoOp on the toy world, resume, learned-prompt files, bad input."""
import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import vlmood
from vlmood.data import MemorySource
from vlmood.errors import ImageLoadError, InvalidInputError
from vlmood.toyworld import ID_SHAPES, load_images
from vlmood.tuning import CoOp, LearnedPrompts, LoCoOp, NonFiniteLossError, load_prompts, lr_at
from vlmood.tuning.learner import build_prompts, init_context
from vlmood.tuning.views import augment, crop_box, extract_views, geometry

CLASSES = list(ID_SHAPES)


@pytest.fixture(scope="module")
def enc():
    return vlmood.load_encoder("toyworld")


@pytest.fixture(scope="module")
def train():
    images, names = load_images(5, 60, ID_SHAPES)
    return MemorySource(images, names, name="toy-train")


def summaries(trainer):
    return [r for r in trainer.log_ if r.get("summary")]


def _nan_after(cls, calls):
    """A trainer class whose loss turns NaN from its ``calls``-th step on."""

    class Broken(cls):
        n = 0

        def _loss(self, logits, local_logits, labels):
            total, parts = super()._loss(logits, local_logits, labels)
            type(self).n += 1
            return (total * float("nan"), parts) if type(self).n >= calls else (total, parts)

    return Broken


# ------------------------------------------------------------------------------------------- prompt construction
def test_init_phrase_prompts_equal_the_text_path(enc):
    """Context = the embeddings of "a photo of a" reproduces the ordinary text features of "a photo of a {c}."."""
    ctx = init_context(enc, len(CLASSES), None, "a photo of a", csc=False, seed=0)
    assert ctx.shape == (4, 128)
    learned = LearnedPrompts(CLASSES, ctx).text_features(enc)
    direct = enc.encode_texts([f"a photo of a {c}." for c in CLASSES])
    assert learned.shape == (6, enc.embed_dim)
    assert torch.allclose(learned, direct, atol=1e-5)
    csc = init_context(enc, len(CLASSES), None, "a photo of a", csc=True, seed=0)
    assert csc.shape == (6, 4, 128)
    assert torch.allclose(LearnedPrompts(CLASSES, csc).text_features(enc), direct, atol=1e-5)


def test_init_phrase_prompts_equal_the_text_path_bpe(tiny):
    """The same with open_clip's BPE tokenizer (77 positions, '.' its own token) and an underscored class name."""
    classes = ["golden_retriever", "tabby cat", "tiger shark"]
    ctx = init_context(tiny, 3, None, "a_photo of a", csc=False, seed=0)
    direct = tiny.encode_texts([f"a photo of a {c}." for c in ("golden retriever", "tabby cat", "tiger shark")])
    assert torch.allclose(LearnedPrompts(classes, ctx).text_features(tiny), direct, atol=1e-5)


def test_random_init_is_seeded_normal(enc):
    a = init_context(enc, 6, None, None, csc=False, seed=3)
    assert a.shape == (16, 128)
    assert torch.equal(a, init_context(enc, 6, None, None, csc=False, seed=3))
    assert not torch.equal(a, init_context(enc, 6, None, None, csc=False, seed=4))
    assert abs(float(a.std()) - 0.02) < 0.002 and abs(float(a.mean())) < 0.002
    assert init_context(enc, 6, 8, None, csc=True, seed=3).shape == (6, 8, 128)


def test_prompts_that_do_not_fit_the_context_are_named(enc):
    # the toy world's context is 20 tokens: start + 16 context + 3 name words + end = 21
    with pytest.raises(InvalidInputError, match=r"do not fit the text context of 20 tokens.*'big red circle'"):
        build_prompts(enc, ["circle", "big red circle"], 16)
    assert build_prompts(enc, ["circle", "big red circle"], 15).eot.tolist() == [17, 19]
    with pytest.raises(InvalidInputError, match="phrase sets the context length"):
        init_context(enc, 6, 16, "a photo of a", csc=False, seed=0)


# ------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("cls", [CoOp, LoCoOp])
def test_training_lowers_the_loss(enc, train, cls, tmp_path):
    trainer = cls(enc, CLASSES, seed=1)
    prompts = trainer.fit(train, shots=4, epochs=6, batch_size=8, views=2, out=tmp_path / "run", progress=False)
    s = summaries(trainer)
    assert [r["epoch"] for r in s] == list(range(1, 7))
    assert s[-1]["loss"] < s[0]["loss"] - 0.3, [r["loss"] for r in s]
    steps = [r for r in trainer.log_ if not r.get("summary")]
    assert len(steps) == 6 * 3  # 24 images / batch 8
    assert {"epoch", "step", "loss", "ce", "lr", "acc", "elapsed"} <= set(steps[0])
    if cls is LoCoOp:
        assert all(r["entropy"] <= 0 and math.isclose(r["loss"], r["ce"] + 0.25 * r["entropy"], rel_tol=1e-5)
                   for r in steps)
        assert prompts.meta["hyperparameters"]["top_k"] == 1  # 200 * 6 / 1000 rounded
    assert [r["lr"] for r in s] == [lr_at(e, 0.002, 6) for e in range(6)]
    on_disk = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert on_disk == trainer.log_
    assert prompts.ctx.shape == (16, 128) and prompts.classes == CLASSES
    assert prompts.meta["method"] == cls.method and prompts.meta["shots"] == 4
    assert prompts.meta["encoder"]["fingerprint"] == enc.fingerprint
    sample = json.loads((tmp_path / "run" / "sample.json").read_text())
    assert sample == trainer.samples_ and len(sample) == 24
    assert sorted(r["class"] for r in sample) == sorted(CLASSES * 4)
    loaded = load_prompts(tmp_path / "run" / "prompts.safetensors", enc)
    assert torch.equal(loaded.ctx, prompts.ctx)


def test_lr_schedule_matches_the_reference():
    """Dassl: 1 constant warmup epoch at 1e-5, then cosine over `epochs` restarted after the warmup."""
    assert lr_at(0, 0.002, 50) == 1e-5
    assert lr_at(1, 0.002, 50) == pytest.approx(0.002)
    assert lr_at(26, 0.002, 50) == pytest.approx(0.001)
    assert lr_at(49, 0.002, 50) == pytest.approx(0.002 * (1 + math.cos(math.pi * 48 / 50)) / 2)


def test_few_shot_sample_is_seeded(enc, train):
    a, b, c = (CoOp(enc, CLASSES, seed=s) for s in (0, 0, 1))
    for t in (a, b):
        t.fit(train, shots=2, epochs=1, views=1, progress=False)
    with torch.no_grad():  # training turns gradients back on
        c.fit(train, shots=2, epochs=2, views=1, progress=False)
    assert a.samples_ == b.samples_ != c.samples_
    labels = dict(zip(train.ids, train.labels))
    assert all(labels[r["id"]] == r["class"] for r in a.samples_)


def test_resume_equals_an_uninterrupted_run(enc, train, tmp_path):
    kw = dict(shots=4, epochs=4, batch_size=8, views=2, progress=False)
    full = LoCoOp(enc, CLASSES, seed=2)
    ref = full.fit(train, out=tmp_path / "full", **kw)

    class Interrupted(LoCoOp):
        calls = 0

        def _loss(self, *a):
            type(self).calls += 1
            if type(self).calls == 8:  # epoch 3, step 2
                raise KeyboardInterrupt
            return super()._loss(*a)

    with pytest.raises(KeyboardInterrupt):
        Interrupted(enc, CLASSES, seed=2).fit(train, out=tmp_path / "cut", **kw)
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["epoch"] == 2
    again = LoCoOp(enc, CLASSES, seed=2)
    got = again.fit(train, out=tmp_path / "cut", resume=True, **kw)
    assert torch.equal(got.ctx, ref.ctx)

    def strip(log):
        return [{k: v for k, v in r.items() if k not in ("elapsed", "epoch_s")} for r in log]

    assert strip(again.log_) == strip(full.log_)
    # a finished run resumes to the same prompts without training
    assert torch.equal(LoCoOp(enc, CLASSES, seed=2).fit(train, out=tmp_path / "cut", resume=True, **kw).ctx, ref.ctx)


def test_run_folder_is_never_overwritten_or_resumed_with_other_arguments(enc, train, tmp_path):
    kw = dict(shots=2, epochs=1, views=1, progress=False)
    CoOp(enc, CLASSES).fit(train, out=tmp_path, **kw)
    with pytest.raises(InvalidInputError, match="already holds a run .*resume=True"):
        CoOp(enc, CLASSES).fit(train, out=tmp_path, **kw)
    with pytest.raises(InvalidInputError, match="its run differs in lr"):
        CoOp(enc, CLASSES).fit(train, out=tmp_path, resume=True, lr=0.01, **kw)
    with pytest.raises(InvalidInputError, match=r"differs in hyperparameters\.\w+, hyperparameters\.\w+, method"):
        LoCoOp(enc, CLASSES).fit(train, out=tmp_path, resume=True, **kw)
    with pytest.raises(InvalidInputError, match="resume=True needs the run folder"):
        CoOp(enc, CLASSES).fit(train, resume=True, **kw)


@pytest.mark.parametrize("cls", [CoOp, LoCoOp])
def test_non_finite_loss_stops_naming_epoch_and_step(enc, train, tmp_path, cls):
    broken = _nan_after(cls, 5)  # 3 steps per epoch: the 5th is epoch 2, step 2
    with pytest.raises(NonFiniteLossError) as e:
        broken(enc, CLASSES).fit(train, shots=4, epochs=3, batch_size=8, views=1, out=tmp_path, progress=False)
    msg = str(e.value)
    assert "\n" not in msg
    assert "non-finite loss at epoch 2, step 2 of 3" in msg and "after epoch 1" in msg
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 1
    last = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    assert last["error"] == "non-finite loss" and (last["epoch"], last["step"]) == (2, 2)
    assert not (tmp_path / "prompts.safetensors").exists()
    with pytest.raises(NonFiniteLossError, match="epoch 1, step 1 of 1.*no checkpoint is kept"):
        _nan_after(cls, 1)(enc, CLASSES).fit(train, shots=1, epochs=2, views=1, progress=False)


# ------------------------------------------------------------------------------------------- views
def test_view_features_are_the_encoded_augmentations_and_resume(enc, train, tmp_path, monkeypatch):
    monkeypatch.setattr(enc, "image_batch_size", 4)  # 9 (image, view) pairs: batches of 4, 4 and 1
    idx, ident = [0, 7, 9], [train.identity(i) for i in (0, 7, 9)]
    store = extract_views(enc, train, idx, ident, views=3, seed=4, local=True, folder=tmp_path, progress=False)
    geo = geometry(enc)
    assert geo.size == 64
    x = augment(train.load(7), np.random.default_rng([4, 3, 1, 2]), geo)  # tag 3: the views' stream
    g, loc = enc.encode_images(x[None], local=True)
    got_g, got_l = store.batch(np.array([1]), np.array([2]))
    assert torch.allclose(got_g, g, atol=1e-6) and torch.allclose(got_l, loc, atol=2e-3)  # local kept in fp16
    assert not torch.allclose(store.batch(np.array([1]), np.array([0]))[0], got_g)  # views differ
    before_g, before_l = np.array(store.global_), np.array(store.local)
    store.done[1, 2] = 0  # as if interrupted before the second batch was flushed
    store.global_[1, 1:] = 0
    store.done.flush()
    store.global_.flush()
    calls = []
    real = type(enc).encode_images
    monkeypatch.setattr(type(enc), "encode_images", lambda self, x, **k: calls.append(len(x)) or real(self, x, **k))
    again = extract_views(enc, train, idx, ident, views=3, seed=4, local=True, folder=tmp_path, progress=False)
    assert calls == [1, 4]  # the size probe, then only the batch holding the missing view, whole
    assert np.array_equal(np.array(again.global_), before_g) and np.array_equal(np.array(again.local), before_l)


def test_unwritable_cache_keeps_views_in_memory(enc, train, tmp_path, monkeypatch):
    kw = dict(shots=2, epochs=2, views=2, progress=False)
    on_disk = LoCoOp(enc, CLASSES).fit(train, **kw)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("VLMOOD_CACHE", str(blocker))
    with pytest.warns(UserWarning, match="keeping them in memory"):
        in_memory = LoCoOp(enc, CLASSES).fit(train, **kw)
    assert torch.equal(in_memory.ctx, on_disk.ctx)


def test_crop_boxes_stay_inside_the_image():
    rng = np.random.default_rng(0)
    for w, h in [(64, 64), (300, 40), (17, 900), (1, 1)]:
        for _ in range(50):
            left, top, cw, ch = crop_box(rng, w, h)
            assert 0 <= left and 0 <= top and 0 < cw and 0 < ch and left + cw <= w and top + ch <= h


def test_unreadable_training_image_is_named(enc, tmp_path):
    (tmp_path / "circle").mkdir()
    (tmp_path / "circle" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ImageLoadError, match="bad.png"):
        CoOp(enc, ["circle"]).fit(str(tmp_path), shots=1, epochs=1, views=1, progress=False)


# ------------------------------------------------------------------------------------------- learned-prompt files
def test_save_load_round_trip_gives_identical_text_features(enc, tmp_path):
    ctx = init_context(enc, 6, 5, None, csc=True, seed=9)
    p = LearnedPrompts(CLASSES, ctx, meta={"method": "coop", "seed": 9,
                                           "encoder": {"spec": str(enc.spec), "fingerprint": enc.fingerprint}})
    q = LearnedPrompts.load(p.save(tmp_path / "p.safetensors"), enc)
    assert q.classes == CLASSES and q.csc and q.n_ctx == 5 and q.meta == p.meta
    assert torch.equal(q.text_features(enc), p.text_features(enc))
    assert torch.allclose(q.text_features(enc).norm(dim=-1), torch.ones(6), atol=1e-6)


def test_load_refuses_bad_files_in_one_line(enc, tiny, tmp_path):
    good = LearnedPrompts(CLASSES, init_context(enc, 6, 4, None, False, 0),
                          meta={"encoder": {"spec": str(enc.spec), "fingerprint": enc.fingerprint}})
    path = good.save(tmp_path / "good.safetensors")
    cases = {"missing.safetensors": "not found"}
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 40)
    cases["junk.safetensors"] = "not a readable safetensors file"
    save_file({"ctx": torch.zeros(4, 128)}, str(tmp_path / "other.safetensors"), metadata={"format": "x"})
    cases["other.safetensors"] = "not a vlmood learned-prompts file"
    meta = json.dumps({"classes": CLASSES, "n_ctx": 4, "csc": True, "position": "end"})
    save_file({"ctx": torch.zeros(5, 4, 128)}, str(tmp_path / "shape.safetensors"),
              metadata={"format": "vlmood.learned_prompts", "version": "1", "meta": meta})
    cases["shape.safetensors"] = "class-specific context for 5 classes but 6 class names"
    save_file({"ctx": torch.zeros(4, 128)}, str(tmp_path / "v2.safetensors"),
              metadata={"format": "vlmood.learned_prompts", "version": "2", "meta": meta})
    cases["v2.safetensors"] = "version '2'"
    for name, expected in cases.items():
        with pytest.raises(InvalidInputError, match=expected) as e:
            load_prompts(tmp_path / name)
        assert "\n" not in str(e.value)
    with pytest.raises(InvalidInputError, match="context width 128 but .* width 64"):
        load_prompts(path, tiny)  # the tiny ViT's text width is 64
    other = LearnedPrompts(CLASSES, torch.zeros(4, 64), meta={"encoder": {"fingerprint": tiny.fingerprint}})
    from vlmood.testing import tiny_encoder

    with pytest.warns(UserWarning, match="may not transfer"):
        load_prompts(other.save(tmp_path / "tiny.safetensors"), tiny_encoder(seed=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_prompts(path, enc).classes == CLASSES  # same encoder: silent


def test_class_list_check(enc):
    p = LearnedPrompts(CLASSES, torch.zeros(2, 128))
    assert p.check_classes(None) == CLASSES == p.check_classes(list(CLASSES))
    with pytest.raises(InvalidInputError, match=r"missing \['cross'\]"):
        p.check_classes(CLASSES[:5])
    with pytest.raises(InvalidInputError, match="another order"):
        p.check_classes(CLASSES[::-1])
    with pytest.raises(InvalidInputError, match="NaN"):
        LearnedPrompts(CLASSES, torch.full((2, 128), float("nan")))


# ------------------------------------------------------------------------------------------- bad input
def test_too_few_images_per_class(enc):
    images, names = load_images(11, 14, ID_SHAPES)
    counts = {c: names.count(c) for c in CLASSES}
    src = MemorySource(images, names, name="small")
    short = sorted(c for c, n in counts.items() if n < 3)
    assert short, counts
    with pytest.raises(InvalidInputError, match=f"fewer than 3 images for {len(short)} of 6 classes: .*{short[0]!r}"):
        CoOp(enc, CLASSES).fit(src, shots=3, epochs=1, views=1, progress=False)
    trainer = CoOp(enc, CLASSES)
    with pytest.warns(UserWarning, match="use_all"):
        trainer.fit(src, shots=3, epochs=1, views=1, progress=False, on_missing="use_all")
    assert len(trainer.samples_) == sum(min(n, 3) for n in counts.values())


def test_bad_labels_and_arguments(enc, train):
    images, names = load_images(1, 4, ID_SHAPES)
    with pytest.raises(InvalidInputError, match="labels outside the class list: 'ring'"):
        CoOp(enc, CLASSES).fit(MemorySource(images, names[:3] + ["ring"]), shots=1, epochs=1, progress=False)
    with pytest.raises(InvalidInputError, match="has no labels"):
        CoOp(enc, CLASSES).fit(MemorySource(images), shots=1, progress=False)
    for kw, msg in [({"shots": 0}, "shots must be"), ({"on_missing": "skip"}, "on_missing must be"),
                    ({"lr": float("nan")}, "lr must be"), ({"views": 0}, "views must be")]:
        with pytest.raises(InvalidInputError, match=msg):
            CoOp(enc, CLASSES).fit(train, **kw)
    with pytest.raises(InvalidInputError, match="top_k must be"):
        LoCoOp(enc, CLASSES, top_k=0)


def test_locoop_needs_local_features_coop_does_not(enc, train, monkeypatch):
    monkeypatch.setattr(type(enc), "supports_local", property(lambda self: False))
    with pytest.raises(InvalidInputError, match="LoCoOp needs local .*CoOp works without them"):
        LoCoOp(enc, CLASSES)
    p = CoOp(enc, CLASSES).fit(train, shots=1, epochs=1, views=1, progress=False)
    assert p.text_features(enc).shape == (6, enc.embed_dim)


def test_text_features_are_normalised_and_detached(enc):
    p = LearnedPrompts(CLASSES, init_context(enc, 6, None, None, False, 0))
    t = p.text_features(enc)
    assert not t.requires_grad and t.dtype == torch.float32 and t.device.type == "cpu"
    assert torch.allclose(t, F.normalize(t, dim=-1), atol=1e-6)


# ------------------------------------------------------------------------------------------- review fixes
def _store_shapes(enc):
    """(D, P) of the toy encoder: global feature width and patch count, read from a real forward."""
    g, loc = enc.encode_images(torch.zeros(1, 3, 64, 64), local=True)
    return int(g.shape[-1]), int(loc.shape[1])


def test_view_store_files_are_reserved_not_sparse(tmp_path):
    """A new store allocates every block up front, so a full disk cannot surface later as SIGBUS in a write."""
    from vlmood.tuning.views import ViewStore

    store = ViewStore(tmp_path / "s", 10, 4, 128, 64, key="k")
    assert store.local.shape == (10, 4, 64, 128)
    for name in ("global", "local", "done"):
        st = (tmp_path / "s" / f"{name}.npy").stat()
        assert st.st_blocks * 512 >= st.st_size, name  # sparse files have fewer blocks than bytes


def test_too_little_disk_space_is_one_clear_error(enc, train, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from vlmood.tuning import views as views_mod

    dim, patches = _store_shapes(enc)
    idx = list(range(6))
    ident = [train.identity(i) for i in idx]
    need = 6 * 3 * (4 * dim + 1 + 2 * patches * dim)  # float32 global, uint8 flags, float16 local: by hand
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    monkeypatch.setattr(views_mod, "MEMORY_LIMIT", need - 1)
    folder = tmp_path / "views"
    with pytest.raises(views_mod.ViewStorageError) as e:
        extract_views(enc, train, idx, ident, views=3, seed=0, local=True, folder=folder, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and f"({need} bytes)" in msg and str(folder) in msg
    assert "fewer views or shots" in msg and "VLMOOD_CACHE" in msg and "free" in msg
    assert not list(folder.glob("*.npy"))
    # a store that fits the memory limit stays in memory instead, with the same features
    monkeypatch.setattr(views_mod, "MEMORY_LIMIT", need)
    with pytest.warns(UserWarning, match="keeping them in memory"):
        mem = extract_views(enc, train, idx, ident, views=3, seed=0, local=True, folder=folder, progress=False)
    monkeypatch.undo()
    disk = extract_views(enc, train, idx, ident, views=3, seed=0, local=True, folder=folder, progress=False)
    assert not isinstance(mem.global_, np.memmap) and isinstance(disk.global_, np.memmap)
    assert np.array_equal(mem.global_, disk.global_) and np.array_equal(mem.local, disk.local)


def test_no_space_while_reserving_is_one_clear_error(enc, train, tmp_path, monkeypatch):
    import errno
    import os

    from vlmood.tuning import views as views_mod

    calls = []

    def full(fd, offset, length):
        calls.append(length)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    monkeypatch.setattr(views_mod, "MEMORY_LIMIT", 1)
    folder = tmp_path / "views"
    with pytest.raises(views_mod.ViewStorageError, match="No space left on device.*fewer views or shots") as e:
        extract_views(enc, train, [0, 1], [train.identity(0), train.identity(1)], views=2, seed=0, local=True,
                      folder=folder, progress=False)
    assert "\n" not in str(e.value) and calls
    assert not list(folder.iterdir())  # the half-made store is gone


def test_unwritable_cache_above_the_memory_limit_is_refused(enc, train, tmp_path, monkeypatch):
    from vlmood.tuning import views as views_mod

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("VLMOOD_CACHE", str(blocker))
    monkeypatch.setattr(views_mod, "MEMORY_LIMIT", 1000)
    with pytest.raises(views_mod.ViewStorageError, match=r"cannot be stored in .*not-a-folder.* more than the"):
        LoCoOp(enc, CLASSES).fit(train, shots=2, epochs=1, views=2, progress=False)


def test_resume_refuses_another_precision_or_device(enc, train, tmp_path, monkeypatch):
    from vlmood.tuning.trainer import PromptTrainer

    kw = dict(shots=2, epochs=2, views=1, progress=False)
    real = PromptTrainer._epoch

    def interrupted(self, loop, epoch, epochs, lr):
        if epoch == 1:
            raise KeyboardInterrupt
        return real(self, loop, epoch, epochs, lr)

    monkeypatch.setattr(PromptTrainer, "_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        CoOp(enc, CLASSES).fit(train, out=tmp_path, **kw)
    monkeypatch.setattr(PromptTrainer, "_epoch", real)
    with pytest.warns(UserWarning, match="bf16 on CPU"):
        bf16 = vlmood.load_encoder("toyworld", precision="bf16")
    assert bf16.fingerprint == enc.fingerprint  # same weights: only the precision tells the runs apart
    with pytest.raises(InvalidInputError, match=r"its run differs in encoder\.precision;"):
        CoOp(bf16, CLASSES).fit(train, out=tmp_path, resume=True, **kw)
    ck = tmp_path / "checkpoint.pt"
    state = torch.load(ck, weights_only=True)
    sig = json.loads(state["signature"])
    assert sig["encoder"]["precision"] == "fp32" and sig["encoder"]["device"] == "cpu"
    sig["encoder"]["device"] = "cuda"
    torch.save({**state, "signature": json.dumps(sig)}, ck)
    with pytest.raises(InvalidInputError, match=r"its run differs in encoder\.device;"):
        CoOp(enc, CLASSES).fit(train, out=tmp_path, resume=True, **kw)
    sig["encoder"]["device"] = "cpu"
    torch.save({**state, "signature": json.dumps(sig)}, ck)
    p = CoOp(enc, CLASSES).fit(train, out=tmp_path, resume=True, **kw)
    assert p.meta["encoder"]["precision"] == "fp32" and p.meta["encoder"]["device"] == "cpu"
    assert load_prompts(tmp_path / "prompts.safetensors").meta["encoder"] == p.meta["encoder"]


def test_random_streams_never_coincide(enc, train, monkeypatch):
    """numpy's SeedSequence drops trailing zeros: [s, k, 0] == [s, k] and s == [s, 0]. Every generator a fit
    creates (sampling, each epoch, each view) must start from its own state."""
    seeds = []
    real = np.random.default_rng

    def recording(seed=None):
        seeds.append(seed)
        return real(seed)

    monkeypatch.setattr(np.random, "default_rng", recording)
    CoOp(enc, CLASSES, seed=0).fit(train, shots=2, epochs=3, batch_size=4, views=2, progress=False)
    assert len(seeds) == 1 + 3 + 12 * 2  # the sample, 3 epochs, 12 images x 2 views
    states = {tuple(np.random.SeedSequence(s).generate_state(4)) for s in seeds}
    assert len(states) == len(seeds)
    # the sampling and epoch 0 permutations of the same n differ
    monkeypatch.undo()
    from vlmood.tuning.trainer import EPOCH_STREAM, SAMPLE_STREAM
    from vlmood.tuning.views import view_rng

    assert not np.array_equal(real([0, SAMPLE_STREAM]).permutation(50), real([0, EPOCH_STREAM, 0]).permutation(50))
    assert not np.array_equal(view_rng(0, 1, 0).permutation(50), real([0, EPOCH_STREAM, 1]).permutation(50))


def test_fit_works_under_inference_mode(enc, train):
    kw = dict(shots=2, epochs=2, views=1, progress=False)
    ref = LoCoOp(enc, CLASSES).fit(train, **kw)
    with torch.inference_mode():
        got = LoCoOp(enc, CLASSES).fit(train, **kw)
        assert torch.equal(got.text_features(enc), ref.text_features(enc))
    assert torch.equal(got.ctx, ref.ctx) and not got.ctx.is_inference()


def test_corrupt_checkpoint_is_one_line(enc, train, tmp_path):
    import argparse

    kw = dict(shots=2, epochs=1, views=1, progress=False)
    ck = tmp_path / "checkpoint.pt"
    for content in (b"not a checkpoint", None, {"epoch": 1}):
        if content is None:  # a pickle with a global that weights_only refuses: torch explains over many lines
            torch.save({"ctx": torch.zeros(2), "x": argparse.Namespace(a=1)}, ck)
        elif isinstance(content, dict):
            torch.save(content, ck)
        else:
            ck.write_bytes(content)
        with pytest.raises(InvalidInputError, match=r"cannot read the checkpoint .*checkpoint\.pt .*; delete the "
                                                    r"run folder .* to start afresh$") as e:
            CoOp(enc, CLASSES).fit(train, out=tmp_path, resume=True, **kw)
        assert "\n" not in str(e.value), str(e.value)
    assert "lacks ctx, optimizer, elapsed, signature" in str(e.value)


def test_init_phrase_with_unknown_words_is_refused(enc, tiny):
    with pytest.raises(InvalidInputError, match=r"init phrase 'a foto of a zorb' has words the tokenizer of .* does "
                                                r"not know: 'foto', 'zorb'"):
        CoOp(enc, CLASSES, init="a foto of a zorb")
    with pytest.raises(InvalidInputError, match="'foto'"):
        init_context(enc, 6, None, "a foto of a", csc=False, seed=0)
    assert CoOp(enc, CLASSES, init="a photo of a").init == "a photo of a"  # known words pass
    assert init_context(tiny, 3, None, "a foto of a zorb", csc=False, seed=0).shape[0] >= 5  # BPE: no unknown words
