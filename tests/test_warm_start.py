"""Warm runs: fingerprint records let a cached re-run answer without building the model (``load_encoder(...,
defer=True)``, :class:`DeferredEncoder`), records never outlive the weights they describe, and ``import vlmood``
stays light."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vlmood
import vlmood.encoders.open_clip_backend as ocb
from vlmood.cli import main
from vlmood.encoders import load_encoder, parse_spec
from vlmood.encoders import record as rec_mod
from vlmood.encoders.deferred import DeferredEncoder
from vlmood.errors import EncoderLoadError
from vlmood.testing import TINY_ARCH, tiny_encoder
from vlmood.text.cache import cache_info, clear_cache

from test_bounded_memory import make_images  # noqa: E402
from test_hf import hf_dir  # noqa: E402,F401  (a tiny transformers CLIP folder)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def ckpt(tmp_path, monkeypatch):
    """A saved tiny encoder; records may be written at once (no racy-file wait)."""
    monkeypatch.setattr(rec_mod, "RACY_SECONDS", 0.0)
    path = tmp_path / "tiny.safetensors"
    tiny_encoder(seed=3).save(path)
    return path


@pytest.fixture
def loads(monkeypatch):
    """Counts the models actually built."""
    calls = []
    real = ocb.load_open_clip

    def counting(*a, **k):
        calls.append(a[0])
        return real(*a, **k)

    monkeypatch.setattr(ocb, "load_open_clip", counting)
    return calls


def spec_of(path):
    return f"open_clip:{TINY_ARCH}@{path}"


def test_second_deferred_load_builds_nothing_and_matches_the_real_encoder(ckpt, loads):
    first = load_encoder(spec_of(ckpt), device="cpu", defer=True)
    assert not isinstance(first, DeferredEncoder) and len(loads) == 1
    second = load_encoder(spec_of(ckpt), device="cpu", defer=True)
    assert isinstance(second, DeferredEncoder) and not second.loaded and len(loads) == 1
    for name in ("fingerprint", "logit_scale", "embed_dim", "supports_local", "preprocess_key", "exact_text_trimming",
                 "cache_precision", "precision", "image_batch_size", "text_batch_size", "word_level_tokenizer"):
        assert getattr(second, name) == getattr(first, name), name
    assert str(second.device) == str(first.device) and second.spec == first.spec
    assert "model not built yet" in repr(second)
    assert len(loads) == 1
    # anything the record does not hold builds the real model once, checked against the record
    x = torch_rand(2)
    assert np.array_equal(second.encode_images(x).numpy(), first.encode_images(x).numpy())
    assert second.loaded and len(loads) == 2
    assert second.model is second.materialize().model and len(loads) == 2


def torch_rand(n):
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, 32, 32, generator=g)


def test_not_deferred_without_defer_or_for_unrecorded_weights(ckpt, loads):
    assert not isinstance(load_encoder(spec_of(ckpt), device="cpu"), DeferredEncoder)
    assert not list((Path(os.environ["VLMOOD_CACHE"]) / "encoders").glob("*"))  # defer=False records nothing
    ident = rec_mod.weights_identity(parse_spec("open_clip:ViT-B-16/openai"))  # keyed by tag and hub cache
    assert ident["kind"] == "hub" and ident["tag"] == "openai" and ident["cache"] == os.path.realpath(ident["cache"])
    assert rec_mod.weights_identity(parse_spec("hf:some/dir")) is None  # a hub id, not a folder here


def test_schema_specs_are_never_recorded():
    for spec in ("open_clip:local-dir:mymodel/none", "open_clip:hf-hub:org/repo"):
        assert rec_mod.weights_identity(parse_spec(spec)) is None, spec


def test_assignments_go_to_the_real_encoder_so_keys_follow(ckpt):
    load_encoder(spec_of(ckpt), device="cpu", defer=True)
    enc = load_encoder(spec_of(ckpt), device="cpu", defer=True)
    default_key = enc.preprocess_key
    custom = lambda im: None  # noqa: E731
    enc.preprocess = custom
    assert enc.loaded and enc.preprocess is custom and enc.preprocess_key == repr(custom) != default_key
    enc.image_batch_size = 5
    assert enc.materialize().image_batch_size == 5


def test_unknown_names_monkeypatching_and_mirrored_fields(ckpt, loads, monkeypatch):
    load_encoder(spec_of(ckpt), device="cpu", defer=True)
    enc = load_encoder(spec_of(ckpt), device="cpu", defer=True)
    assert getattr(enc, "_repr_html_", None) is None and not hasattr(enc, "generate_many")
    assert not enc.loaded and len(loads) == 1  # probes for names the real encoder lacks build nothing
    x = torch_rand(1)
    with monkeypatch.context() as m:
        m.setattr(enc, "encode_images", lambda *a, **k: "fake")
        assert enc.encode_images(x) == "fake" and not enc.loaded
    assert enc.encode_images(x).shape == (1, enc.embed_dim) and enc.loaded  # undone: the real one again
    m2 = pytest.MonkeyPatch()
    m2.setattr(enc, "custom_flag", 1, raising=False)
    assert enc.materialize().custom_flag == 1
    m2.undo()
    assert not hasattr(enc.materialize(), "custom_flag")
    enc.image_batch_size, enc.device = 7, enc.device
    assert enc.materialize().image_batch_size == 7
    with pytest.raises(AttributeError):
        enc.logit_scale = 3.0  # a property, as on the real encoder


def test_toy_world_tokenizer_handed_out_before_the_build_is_kept():
    load_encoder("toyworld", device="cpu", defer=True)
    enc = load_encoder("toyworld", device="cpu", defer=True)
    tok = enc.tokenizer
    assert isinstance(enc, DeferredEncoder) and not enc.loaded
    enc.tokenize(["circle"])
    assert enc.loaded and enc.tokenizer is tok and enc.materialize().tokenizer is tok


def test_built_outside_inference_mode_and_once_across_threads(ckpt, loads):
    import threading

    import torch

    load_encoder(spec_of(ckpt), device="cpu", defer=True)
    enc = load_encoder(spec_of(ckpt), device="cpu", defer=True)
    with torch.inference_mode():
        enc.encode_images(torch_rand(1))
    assert not any(p.is_inference() for p in enc.model.parameters())
    enc2 = load_encoder(spec_of(ckpt), device="cpu", defer=True)
    n = len(loads)
    errors = []

    def work():
        try:
            enc2.encode_images(torch_rand(1))
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(loads) == n + 1


def test_toy_world_warm_fit_builds_nothing(loads):
    import torch

    from vlmood.toyworld import ID_SHAPES

    classes = list(ID_SHAPES)
    cold = vlmood.MCM(load_encoder("toyworld", device="cpu", defer=True), classes).fit()
    enc = load_encoder("toyworld", device="cpu", defer=True)
    assert isinstance(enc, DeferredEncoder)
    warm = vlmood.MCM(enc, classes).fit()  # the unknown-word check runs on the registered word-level tokenizer
    assert not enc.loaded and torch.equal(warm.text_features, cold.text_features)
    with pytest.warns(UserWarning, match="unknown to the tokenizer"):
        vlmood.MCM(enc, classes + ["zebra"])._warn_unknown_words()
    assert not enc.loaded and len(loads) == 1


def test_random_init_is_recorded_by_spec(loads):
    spec = f"open_clip:{TINY_ARCH}/none:seed=5"
    real = load_encoder(spec, device="cpu", defer=True)
    again = load_encoder(spec, device="cpu", defer=True)
    assert isinstance(again, DeferredEncoder) and again.fingerprint == real.fingerprint
    other = load_encoder(f"open_clip:{TINY_ARCH}/none:seed=6", device="cpu", defer=True)
    assert not isinstance(other, DeferredEncoder) and other.fingerprint != real.fingerprint


def rewrite_same_size(path, seed):
    """Replace the file's bytes in place with another model's of the same size, and put the mtime back."""
    st = os.stat(path)
    other = path.with_name("other.safetensors")
    tiny_encoder(seed=seed).save(other)
    data = other.read_bytes()
    assert len(data) == st.st_size
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_mtime_ns == st.st_mtime_ns and os.stat(path).st_size == st.st_size


def test_a_rewritten_file_with_the_old_size_and_mtime_is_not_served_from_its_record(ckpt, loads):
    first = load_encoder(spec_of(ckpt), device="cpu", defer=True)
    rewrite_same_size(ckpt, seed=4)
    again = load_encoder(spec_of(ckpt), device="cpu", defer=True)
    assert not isinstance(again, DeferredEncoder)  # the change time (and the sampled bytes) differ
    assert again.fingerprint != first.fingerprint
    third = load_encoder(spec_of(ckpt), device="cpu", defer=True)
    assert isinstance(third, DeferredEncoder) and third.fingerprint == again.fingerprint


def test_the_sampled_bytes_guard_alone(ckpt):
    spec = parse_spec(spec_of(ckpt))
    guard = rec_mod.file_guard(spec)
    data = bytearray(ckpt.read_bytes())
    data[-1] ^= 1
    ckpt.write_bytes(bytes(data))
    assert rec_mod.file_guard(spec)["sample"] != guard["sample"]


def test_a_file_modified_moments_ago_is_not_recorded(tmp_path, monkeypatch):
    monkeypatch.setattr(rec_mod, "RACY_SECONDS", 3600.0)  # every file is "fresh"
    path = tmp_path / "fresh.safetensors"
    tiny_encoder(seed=3).save(path)
    load_encoder(spec_of(path), device="cpu", defer=True)
    assert not isinstance(load_encoder(spec_of(path), device="cpu", defer=True), DeferredEncoder)


def test_a_file_changed_during_the_load_is_not_recorded(ckpt, monkeypatch):
    real = ocb.load_open_clip

    def changing(*a, **k):
        out = real(*a, **k)
        rewrite_same_size(ckpt, seed=4)
        return out

    monkeypatch.setattr(ocb, "load_open_clip", changing)
    load_encoder(spec_of(ckpt), device="cpu", defer=True)
    monkeypatch.setattr(ocb, "load_open_clip", real)
    assert not isinstance(load_encoder(spec_of(ckpt), device="cpu", defer=True), DeferredEncoder)


def test_symlink_records_the_target_and_follows_a_retargeted_link(tmp_path, ckpt, loads):
    other = tmp_path / "b.safetensors"
    tiny_encoder(seed=9).save(other)
    link = tmp_path / "link.safetensors"
    link.symlink_to(ckpt)
    a = load_encoder(spec_of(link), device="cpu", defer=True)
    assert isinstance(load_encoder(spec_of(ckpt), device="cpu", defer=True), DeferredEncoder)  # same real file
    link.unlink()
    link.symlink_to(other)
    b = load_encoder(spec_of(link), device="cpu", defer=True)
    assert not isinstance(b, DeferredEncoder) and b.fingerprint != a.fingerprint


def test_other_library_versions_or_precision_invalidate(ckpt, monkeypatch):
    load_encoder(spec_of(ckpt), device="cpu", defer=True)
    assert isinstance(load_encoder(spec_of(ckpt), device="cpu", defer=True), DeferredEncoder)
    # a precision never loaded has no recorded logit scale: loaded once, then recorded beside fp32
    bf = load_encoder(spec_of(ckpt), device="cpu", precision="bf16", defer=True)
    assert not isinstance(bf, DeferredEncoder)
    bf2 = load_encoder(spec_of(ckpt), device="cpu", precision="bf16", defer=True)
    assert isinstance(bf2, DeferredEncoder) and bf2.logit_scale == bf.logit_scale and bf2.cache_precision == "bf16-weights"
    assert isinstance(load_encoder(spec_of(ckpt), device="cpu", defer=True), DeferredEncoder)
    versions = rec_mod._versions()
    monkeypatch.setattr(rec_mod, "_versions", lambda: {**versions, "open_clip_torch": "0.0.0"})
    assert not isinstance(load_encoder(spec_of(ckpt), device="cpu", defer=True), DeferredEncoder)


def test_a_record_that_lies_is_caught_when_the_model_is_built(ckpt):
    load_encoder(spec_of(ckpt), device="cpu", defer=True)
    path = next((Path(os.environ["VLMOOD_CACHE"]) / "encoders").glob("*/record.json"))
    data = json.loads(path.read_text())
    data["fingerprint"] = "open_clip:x:" + "0" * 32
    path.write_text(json.dumps(data))
    enc = load_encoder(spec_of(ckpt), device="cpu", defer=True)
    assert isinstance(enc, DeferredEncoder)
    with pytest.raises(EncoderLoadError, match="changed while this run used their record.*run again"):
        enc.encode_images(torch_rand(1))
    assert not path.exists()  # removed: the next run loads and records afresh


@pytest.mark.parametrize("garbage", ["{", "[]", '{"version": 1}', ""])
def test_a_damaged_record_is_ignored(ckpt, garbage):
    load_encoder(spec_of(ckpt), device="cpu", defer=True)
    path = next((Path(os.environ["VLMOOD_CACHE"]) / "encoders").glob("*/record.json"))
    path.write_text(garbage)
    assert not isinstance(load_encoder(spec_of(ckpt), device="cpu", defer=True), DeferredEncoder)


def test_benchmark_from_caches_equals_the_real_run_and_builds_nothing(tmp_path, ckpt, loads):
    make_images(tmp_path / "id" / "cat", 4, 1)
    make_images(tmp_path / "id" / "dog", 4, 2)
    make_images(tmp_path / "ood", 5, 3)
    bench = vlmood.Benchmark(id=tmp_path / "id", ood={"far": {"noise": tmp_path / "ood"}}, classes=["cat", "dog"])
    dets = ["mcm", "energy", "maxlogit", "glmcm"]
    real = load_encoder(spec_of(ckpt), device="cpu", defer=True)
    cold = bench.run(real, dets, batch_size=3, num_workers=0)
    warm_enc = load_encoder(spec_of(ckpt), device="cpu", defer=True)
    warm = bench.run(warm_enc, dets, batch_size=3, num_workers=0)
    assert isinstance(warm_enc, DeferredEncoder) and not warm_enc.loaded and len(loads) == 1
    for m in dets:
        for name in cold.scores[m]:
            assert np.array_equal(cold.scores[m][name], warm.scores[m][name]), (m, name)
    assert warm.provenance["encoder"]["fingerprint"] == real.fingerprint
    # one image more: only then is the model built, and the scores still equal a real encoder's
    make_images(tmp_path / "ood2", 1, 8)
    (tmp_path / "ood2" / "000.png").rename(tmp_path / "ood" / "zzz.png")
    more = bench.run(warm_enc, dets, batch_size=3, num_workers=0)
    assert warm_enc.loaded and len(loads) == 2
    fresh = bench.run(tiny_encoder(seed=3), dets, batch_size=3, num_workers=0, cache=False)
    for m in dets:
        np.testing.assert_allclose(more.scores[m]["noise"], fresh.scores[m]["noise"], rtol=0, atol=1e-6)


def test_cli_eval_warm_builds_no_model_and_writes_the_same_report(tmp_path, ckpt, loads, capsys):
    make_images(tmp_path / "id" / "cat", 3, 1)
    make_images(tmp_path / "id" / "dog", 3, 2)
    make_images(tmp_path / "ood", 4, 3)
    args = ["eval", "--model", spec_of(ckpt), "--classes", "cat,dog", "--id", str(tmp_path / "id"),
            "--ood", f"far/noise={tmp_path / 'ood'}", "--methods", "mcm,glmcm", "--workers", "0", "--no-plots"]
    assert main(args + ["--report", str(tmp_path / "r1")]) == 0
    assert main(args + ["--report", str(tmp_path / "r2")]) == 0
    assert len(loads) == 1
    assert (tmp_path / "r1" / "scores.csv").read_text() == (tmp_path / "r2" / "scores.csv").read_text()
    assert not list((tmp_path / "r2").glob("*.png"))
    # --no-cache never defers (and never records)
    assert main(args + ["--report", str(tmp_path / "r3"), "--no-cache"]) == 0
    assert len(loads) == 2


def test_no_plots_names_stale_figures(tmp_path, ckpt, capsys):
    make_images(tmp_path / "id" / "cat", 2, 1)
    make_images(tmp_path / "id" / "dog", 2, 2)
    make_images(tmp_path / "ood", 2, 3)
    args = ["eval", "--model", spec_of(ckpt), "--classes", "cat,dog", "--id", str(tmp_path / "id"),
            "--ood", f"noise={tmp_path / 'ood'}", "--workers", "0", "--report", str(tmp_path / "r")]
    assert main(args) == 0
    assert (tmp_path / "r" / "comparison.png").is_file()
    capsys.readouterr()
    assert main(args + ["--no-plots"]) == 0
    err = capsys.readouterr().err
    assert "still holds figures of an earlier run (comparison.png, hist_mcm.png, roc.png)" in err


def test_cache_info_lists_records_and_clear_removes_them(ckpt):
    enc = load_encoder(spec_of(ckpt), device="cpu", defer=True)
    rows = [r for r in cache_info() if r["kind"] == "encoder-record"]
    assert len(rows) == 1 and rows[0]["fingerprint"] == enc.fingerprint and rows[0]["entries"] == 1
    assert os.path.realpath(ckpt) in rows[0]["detail"]
    out = clear_cache(encoder=enc.fingerprint)
    assert [r["kind"] for r in out["removed"]] == ["encoder-record"]
    assert not isinstance(load_encoder(spec_of(ckpt), device="cpu", defer=True), DeferredEncoder)


def test_import_vlmood_and_version_do_not_import_torch():
    code = ("import sys, vlmood, vlmood.cli\n"
            "assert 'torch' not in sys.modules, 'import'\n"
            "assert vlmood.errors.VlmoodError and vlmood.data.as_source and vlmood.metrics.evaluate\n"
            "assert 'torch' not in sys.modules, 'submodules'\n"
            "assert vlmood.cli.main(['--version']) == 0\n"
            "assert 'torch' not in sys.modules, 'version'\n"
            "assert vlmood.evaluation.list_suites and vlmood.toyworld and vlmood.encoders.load_encoder\n"
            "assert sorted(vlmood.__all__) == sorted(set(vlmood.__all__)) and 'MCM' in dir(vlmood)\n"
            "import vlmood as v; v.MCM, v.Benchmark, v.extract_features, vlmood.cli.build_parser()\n"
            "assert 'torch' not in sys.modules, 'detectors, features and the parser'\n"
            "v.MCM.text_features.fget; import vlmood._lazy as lz; lz.torch.zeros; assert 'torch' in sys.modules\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"vlmood {vlmood.__version__}"


def test_every_public_name_resolves():
    for name in vlmood.__all__:
        assert getattr(vlmood, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        vlmood.nope  # noqa: B018


def test_cli_demo_with_and_without_plots(tmp_path):
    assert main(["demo", "--n", "10", "--report", str(tmp_path / "d"), "--device", "cpu", "--no-plots"]) == 0
    assert (tmp_path / "d" / "scores.csv").is_file() and not list((tmp_path / "d").glob("*.png"))
    assert main(["demo", "--n", "10", "--report", str(tmp_path / "e"), "--device", "cpu"]) == 0
    assert (tmp_path / "e" / "comparison.png").is_file()


def test_hf_folder_recorded_file_by_file(hf_dir, tmp_path, monkeypatch, loads):
    import shutil

    import torch

    monkeypatch.setattr(rec_mod, "RACY_SECONDS", 0.0)
    folder = tmp_path / "clip"
    shutil.copytree(hf_dir, folder)
    real = load_encoder(f"hf:{folder}", device="cpu", defer=True)
    enc = load_encoder(f"hf:{folder}", device="cpu", defer=True)
    assert isinstance(enc, DeferredEncoder) and not enc.loaded
    for name in ("fingerprint", "logit_scale", "embed_dim", "preprocess_key", "exact_text_trimming"):
        assert getattr(enc, name) == getattr(real, name), name
    assert torch.equal(enc.encode_texts(["a dog"]), real.encode_texts(["a dog"]))
    (folder / "notes.txt").write_text("a file more")  # the folder changed: loaded again
    assert not isinstance(load_encoder(f"hf:{folder}", device="cpu", defer=True), DeferredEncoder)
    assert isinstance(load_encoder(f"hf:{folder}", device="cpu", defer=True), DeferredEncoder)
    weights = next(p for p in folder.iterdir() if p.name.startswith("model."))
    moved = tmp_path / weights.name
    weights.rename(moved)
    weights.symlink_to(moved)  # same bytes behind a link: another target, so loaded again
    assert not isinstance(load_encoder(f"hf:{folder}", device="cpu", defer=True), DeferredEncoder)
    (folder / ".hidden").write_text("x")  # hidden files are not read by from_pretrained... but the folder's times
    assert not isinstance(load_encoder(f"hf:{folder}", device="cpu", defer=True), DeferredEncoder)


# ------------------------------------------------------------------------------------------- pretrained tags
class FakeHub:
    """A Hugging Face hub cache (``models--ORG--NAME/{blobs,snapshots,refs}``) holding a tiny open_clip model under a
    pretrained tag ``testtag`` of the tiny architecture, read offline."""

    repo = "vlmood-test/tiny"

    def __init__(self, root, monkeypatch):
        import open_clip
        from huggingface_hub import constants

        ocb._open_clip()
        table = open_clip.pretrained._PRETRAINED
        monkeypatch.setitem(table, TINY_ARCH, {**table.get(TINY_ARCH, {}),
                                               "testtag": open_clip.pretrained._pcfg(hf_hub=f"{self.repo}/"),
                                               "urltag": open_clip.pretrained._pcfg(url="https://example.invalid/w.pt")})
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(rec_mod, "RACY_SECONDS", 0.0)
        self.root, self.folder = root, root / "models--vlmood-test--tiny"
        self.folder.mkdir(parents=True)
        self.spec = f"open_clip:{TINY_ARCH}/testtag"

    def publish(self, seed, commit, name="open_clip_model.safetensors"):
        """Write weights of ``tiny_encoder(seed)`` as a blob of snapshot ``commit`` and point ``refs/main`` at it."""
        import hashlib

        tmp = self.root / "weights.tmp"
        tiny_encoder(seed=seed).save(tmp)
        blob = self.folder / "blobs" / hashlib.sha256(tmp.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, blob)
        snap = self.folder / "snapshots" / commit
        snap.mkdir(parents=True, exist_ok=True)
        (snap / name).symlink_to(os.path.relpath(blob, snap))
        (self.folder / "refs").mkdir(exist_ok=True)
        (self.folder / "refs" / "main").write_text(commit)
        return blob


@pytest.fixture
def hub(tmp_path, monkeypatch):
    return FakeHub(tmp_path / "hub", monkeypatch)


def test_a_pretrained_tag_is_recorded_from_the_hub_cache(hub, loads):
    hub.publish(3, "a" * 40)
    first = load_encoder(hub.spec, device="cpu", defer=True)
    assert not isinstance(first, DeferredEncoder) and len(loads) == 1
    assert first.fingerprint == tiny_encoder(seed=3).fingerprint  # open_clip really read the hub file
    second = load_encoder(hub.spec, device="cpu", defer=True)
    assert isinstance(second, DeferredEncoder) and not second.loaded and len(loads) == 1
    for name in ("fingerprint", "logit_scale", "embed_dim", "preprocess_key", "exact_text_trimming"):
        assert getattr(second, name) == getattr(first, name), name
    rec = json.loads(next((Path(os.environ["VLMOOD_CACHE"]) / "encoders").glob("*/record.json")).read_text())
    assert rec["hub"] == {"repo": hub.repo, "files": ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]}
    assert rec["guard"]["file"] == "open_clip_model.safetensors" and "/snapshots/" + "a" * 40 in rec["guard"]["path"]
    x = torch_rand(2)  # built on demand from the tag, and equal to the real encoder
    assert np.array_equal(second.encode_images(x).numpy(), first.encode_images(x).numpy()) and len(loads) == 2


def test_a_new_snapshot_or_a_replaced_blob_is_not_served_from_the_record(hub, loads):
    hub.publish(3, "a" * 40)
    load_encoder(hub.spec, device="cpu", defer=True)
    assert isinstance(load_encoder(hub.spec, device="cpu", defer=True), DeferredEncoder)
    hub.publish(4, "b" * 40)  # refs/main moved to another revision with other weights
    moved = load_encoder(hub.spec, device="cpu", defer=True)
    assert not isinstance(moved, DeferredEncoder) and moved.fingerprint == tiny_encoder(seed=4).fingerprint
    warm = load_encoder(hub.spec, device="cpu", defer=True)
    assert isinstance(warm, DeferredEncoder) and warm.fingerprint == moved.fingerprint
    blob = Path(os.path.realpath(hub.folder / "snapshots" / ("b" * 40) / "open_clip_model.safetensors"))
    tmp = blob.with_name("new")
    tiny_encoder(seed=5).save(tmp)
    os.replace(tmp, blob)  # the blob replaced in place (a new inode): loaded again
    again = load_encoder(hub.spec, device="cpu", defer=True)
    assert not isinstance(again, DeferredEncoder) and again.fingerprint == tiny_encoder(seed=5).fingerprint
    (hub.folder / "refs" / "main").write_text("a" * 40)  # back to the first revision: its own record again
    back = load_encoder(hub.spec, device="cpu", defer=True)
    assert not isinstance(back, DeferredEncoder) and back.fingerprint == tiny_encoder(seed=3).fingerprint


def test_another_hub_cache_is_another_identity(hub, tmp_path, monkeypatch, loads):
    import shutil

    from huggingface_hub import constants

    hub.publish(3, "a" * 40)
    load_encoder(hub.spec, device="cpu", defer=True)
    assert isinstance(load_encoder(hub.spec, device="cpu", defer=True), DeferredEncoder)
    shutil.copytree(hub.root, tmp_path / "hub2", symlinks=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub2"))
    assert not isinstance(load_encoder(hub.spec, device="cpu", defer=True), DeferredEncoder)
    shutil.rmtree(tmp_path / "hub2")  # the recorded cache emptied: never served, the load itself fails
    with pytest.raises(EncoderLoadError, match="could not obtain the weights"):
        load_encoder(hub.spec, device="cpu", defer=True)


def test_the_safetensors_alternative_wins_as_in_open_clip_and_url_tags_are_not_recorded(hub, loads):
    import torch

    blob = hub.publish(3, "c" * 40, name="open_clip_pytorch_model.bin")  # only the .bin name: a torch file
    from safetensors.torch import load

    torch.save(load(blob.read_bytes()), str(blob) + ".pt")  # not over the file a mapping may still read
    os.replace(str(blob) + ".pt", blob)
    enc = load_encoder(hub.spec, device="cpu", defer=True)
    assert enc.fingerprint == tiny_encoder(seed=3).fingerprint
    rec = rec_mod._read(parse_spec(hub.spec), rec_mod.weights_identity(parse_spec(hub.spec)))
    assert rec["guard"]["file"] == "open_clip_pytorch_model.bin"
    snap = hub.folder / "snapshots" / ("c" * 40)
    (snap / "open_clip_model.safetensors").symlink_to(os.path.relpath(hub.publish(4, "d" * 40), snap))
    (hub.folder / "refs" / "main").write_text("c" * 40)  # both names now: open_clip takes the .safetensors one
    assert not isinstance(load_encoder(hub.spec, device="cpu", defer=True), DeferredEncoder)
    warm = load_encoder(hub.spec, device="cpu", defer=True)
    assert isinstance(warm, DeferredEncoder) and warm.fingerprint == tiny_encoder(seed=4).fingerprint
    assert rec_mod.hub_source(parse_spec(f"open_clip:{TINY_ARCH}/urltag")) is None  # downloaded from a URL
    assert rec_mod.hub_source(parse_spec(f"open_clip:{TINY_ARCH}/nosuchtag")) is None


def test_cli_eval_warm_with_a_pretrained_tag(tmp_path, hub, loads):
    hub.publish(3, "a" * 40)
    make_images(tmp_path / "id" / "cat", 3, 1)
    make_images(tmp_path / "id" / "dog", 3, 2)
    make_images(tmp_path / "ood", 3, 3)
    args = ["eval", "--model", hub.spec, "--classes", "cat,dog", "--id", str(tmp_path / "id"),
            "--ood", f"noise={tmp_path / 'ood'}", "--methods", "mcm,energy", "--workers", "0", "--no-plots"]
    assert main(args + ["--report", str(tmp_path / "r1")]) == 0
    assert main(args + ["--report", str(tmp_path / "r2")]) == 0
    assert len(loads) == 1
    assert (tmp_path / "r1" / "scores.csv").read_text() == (tmp_path / "r2" / "scores.csv").read_text()


# ------------------------------------------------------------------------------------ a warm run without torch
NO_TORCH_RUN = """
import sys
from vlmood.cli import main
rc = main(sys.argv[1:])
print("TORCH", "torch" in sys.modules, "MATPLOTLIB", "matplotlib" in sys.modules, file=sys.stderr)
sys.exit(rc)
"""


def run_cli(args, env_cache):
    env = {**os.environ, "VLMOOD_CACHE": env_cache, "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([sys.executable, "-c", NO_TORCH_RUN, *args], capture_output=True, text=True, cwd=ROOT, env=env)
    assert p.returncode == 0, p.stderr
    return p.stderr.strip().splitlines()[-1]


def test_a_fully_cached_eval_imports_neither_torch_nor_matplotlib_and_writes_the_same_report(tmp_path):
    """The fully cached path (records, cached features and reduced values, cached prompts, numpy scoring, kept
    figures) runs in a fresh process without importing torch, and writes what the run that computed everything
    wrote; one image more needs torch (and the model) again."""
    make_images(tmp_path / "id" / "cat", 3, 1)
    make_images(tmp_path / "id" / "dog", 3, 2)
    make_images(tmp_path / "ood", 4, 3)
    cache = str(tmp_path / "cache")
    args = ["eval", "--model", f"open_clip:{TINY_ARCH}/none:seed=3", "--classes", "cat,dog", "--id",
            str(tmp_path / "id"), "--ood", f"far/noise={tmp_path / 'ood'}", "--methods", "mcm,energy,maxlogit,glmcm",
            "--workers", "0", "--device", "cpu"]
    assert run_cli(args + ["--report", str(tmp_path / "r1")], cache) == "TORCH True MATPLOTLIB True"
    assert run_cli(args + ["--report", str(tmp_path / "r1")], cache) == "TORCH False MATPLOTLIB False"
    assert run_cli(args + ["--report", str(tmp_path / "r2")], cache) == "TORCH False MATPLOTLIB True"  # drawn
    for name in ("scores.csv", "results.csv", "comparison.png", "hist_glmcm.png", "roc.png"):
        assert (tmp_path / "r1" / name).read_bytes() == (tmp_path / "r2" / name).read_bytes(), name
    assert run_cli(args + ["--report", str(tmp_path / "r3"), "--no-plots"], cache) == "TORCH False MATPLOTLIB False"
    assert (tmp_path / "r3" / "scores.csv").read_text() == (tmp_path / "r1" / "scores.csv").read_text()
    cold = json.loads((tmp_path / "r1" / "results.json").read_text())
    warm = json.loads((tmp_path / "r3" / "results.json").read_text())
    assert cold["rows"] == warm["rows"] and cold["thresholds"] == warm["thresholds"]
    assert warm["provenance"]["encoder"]["device"] == "cpu"
    make_images(tmp_path / "more", 1, 9)
    (tmp_path / "more" / "000.png").rename(tmp_path / "ood" / "zzz.png")  # not cached: the model is built
    assert run_cli(args + ["--report", str(tmp_path / "r4"), "--no-plots"], cache) == "TORCH True MATPLOTLIB False"


def test_no_gpu_possible_reads_the_device_nodes_and_the_pci_bus(monkeypatch, tmp_path):
    from vlmood.encoders import base

    monkeypatch.setattr(base.sys, "platform", "linux")
    monkeypatch.setattr(base, "_PCI_DEVICES", str(tmp_path / "pci"))  # no PCI bus listed
    for nodes, want in ((["null", "tty", "sda"], True), (["null", "nvidiactl", "nvidia0"], False), (["kfd"], False),
                        (["dxg"], False), (["nvhost-ctrl", "nvmap"], False), (["nvgpu"], False)):
        monkeypatch.setattr(base.os, "listdir", lambda p, n=nodes, real=os.listdir: n if p == "/dev" else real(p))
        assert base.no_gpu_possible() is want, nodes
    monkeypatch.setattr(base.os, "listdir", os.listdir)
    for name, vendor, cls, want in (("0000:00:01.0", "0x8086", "0x030000", True),  # an Intel display: no CUDA
                                    ("0000:00:02.0", "0x1af4", "0x020000", True),
                                    ("0000:3b:00.0", "0x10de", "0x030200", False),  # an NVIDIA GPU, no nodes yet
                                    ("0000:3c:00.0", "0x1002", "0x038000", False)):  # an AMD one
        dev = tmp_path / "pci" / name
        dev.mkdir(parents=True)
        (dev / "vendor").write_text(vendor + "\n")
        (dev / "class").write_text(cls + "\n")
        monkeypatch.setattr(base.os, "listdir", lambda p, real=os.listdir: ["null"] if p == "/dev" else real(p))
        assert base.no_gpu_possible() is want, name
        if not want:
            (dev / "vendor").unlink()
            (dev / "class").unlink()
            dev.rmdir()
    monkeypatch.setattr(base.os, "listdir", os.listdir)
    monkeypatch.setattr(base.sys, "platform", "win32")
    assert base.no_gpu_possible() is False  # cannot be told without torch there
    monkeypatch.setattr(base.sys, "platform", "darwin")
    assert base.no_gpu_possible() is True
    assert base.device_type_without_torch("cpu") == "cpu"
    assert base.device_type_without_torch(" cpu") is None  # torch.device refuses it: resolved (and refused) there
    assert base.device_type_without_torch("cuda") is None
    assert base.device_type_without_torch(None) is None  # torch is loaded in this process: ask it


def test_a_deferred_encoder_that_chose_the_cpu_without_torch_is_built_on_the_cpu(ckpt, monkeypatch, loads):
    """Told "no GPU" from the device nodes (which may be wrong: nodes can appear at the first CUDA start), the proxy
    keys its caches for the CPU at fp32, and is built on the CPU at fp32 even if torch would now pick CUDA."""
    import torch

    from vlmood.encoders import deferred

    load_encoder(spec_of(ckpt), device="cpu", defer=True)
    monkeypatch.setattr(deferred, "device_type_without_torch", lambda d: "cpu" if d is None else None)
    enc = load_encoder(spec_of(ckpt), defer=True)
    assert isinstance(enc, DeferredEncoder) and enc.precision == "fp32" and enc.device_name == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # torch would choose CUDA (bf16) for device=None
    real = enc.materialize()
    assert real.device.type == "cpu" and real.precision == "fp32" and str(enc.device) == "cpu"
    assert enc.cache_precision == "fp32"


def test_is_tensor_while_torch_is_half_imported(monkeypatch):
    import types

    from vlmood import _lazy

    half = types.ModuleType("torch")  # what another thread's unfinished import leaves in sys.modules
    monkeypatch.setitem(sys.modules, "torch", half)
    assert _lazy.is_tensor(np.zeros(2)) is False


def test_warm_calibrate_and_score_with_a_detector_file_import_no_torch(tmp_path):
    """The deploy commands on cached images: the detector file is written and read as numpy arrays (the same file
    format), and scoring from it answers without torch, with the scores of the run that computed everything."""
    make_images(tmp_path / "id" / "cat", 3, 1)
    make_images(tmp_path / "id" / "dog", 3, 2)
    make_images(tmp_path / "new", 4, 3)
    cache = str(tmp_path / "cache")
    cal = ["calibrate", "--model", f"open_clip:{TINY_ARCH}/none:seed=3", "--classes", "cat,dog", "--method", "mcm",
           "--id", str(tmp_path / "id"), "--workers", "0", "--device", "cpu"]
    assert run_cli(cal + ["--out", str(tmp_path / "a.vlmood")], cache).startswith("TORCH True")
    assert run_cli(cal + ["--out", str(tmp_path / "b.vlmood")], cache) == "TORCH False MATPLOTLIB False"
    from vlmood.detectors import read_detector_meta

    a = read_detector_meta(tmp_path / "a.vlmood")
    b = read_detector_meta(tmp_path / "b.vlmood")
    assert {**a, "created": None} == {**b, "created": None} and a["threshold"] is not None
    score = ["score", "--detector", str(tmp_path / "b.vlmood"), "--images", str(tmp_path / "new"), "--workers", "0",
             "--device", "cpu"]
    assert run_cli(score + ["--out", str(tmp_path / "s1.csv")], cache).startswith("TORCH True")  # new images
    assert run_cli(score + ["--out", str(tmp_path / "s2.csv")], cache) == "TORCH False MATPLOTLIB False"
    assert (tmp_path / "s1.csv").read_text() == (tmp_path / "s2.csv").read_text()
    det = vlmood.load_detector(tmp_path / "a.vlmood", device="cpu")  # the numpy-written file, loaded in-process
    ref = vlmood.load_detector(tmp_path / "b.vlmood", device="cpu")
    assert np.array_equal(det.text_features.numpy(), ref.text_features.numpy())


def test_a_bad_device_on_a_proxy_changes_nothing(ckpt, loads):
    import torch

    from vlmood.errors import InvalidInputError

    load_encoder(spec_of(ckpt), device="cpu", defer=True)
    enc = load_encoder(spec_of(ckpt), device="cpu", defer=True)
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    with pytest.raises(InvalidInputError, match="CUDA is not available"):
        enc.device = "cuda"
    assert enc.device_name == "cpu" and str(enc.device) == "cpu" and enc.precision == "fp32" and not enc.loaded
    enc.device = "cpu"
    assert isinstance(enc.device, torch.device) and enc.materialize().device.type == "cpu"
