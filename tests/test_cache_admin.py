"""vlmood.text.cache.cache_info / clear_cache on a temporary cache root filled by real embedding calls."""
import json
import os
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

import vlmood
from vlmood.errors import InvalidInputError
from vlmood.testing import tiny_encoder
from vlmood.text.cache import UNKNOWN, _file_lock, cache_info, clear_cache
from vlmood.text.embed import class_embeddings

DAY = 86400.0


@pytest.fixture(scope="module")
def other():
    return tiny_encoder(seed=1)


def files_under(folder: Path) -> tuple[int, float]:
    """Bytes and newest mtime of the regular files under ``folder`` (an independent walk, links not followed)."""
    size, newest = 0, 0.0
    for d, _, names in os.walk(folder):
        for n in names:
            st = os.lstat(os.path.join(d, n))
            if not os.path.islink(os.path.join(d, n)):
                size, newest = size + st.st_size, max(newest, st.st_mtime)
    return size, newest


@pytest.fixture
def filled(tiny, other):
    """tiny: 3 classes x 2 templates (6 prompts) and 4 images with local features (a local and a global folder);
    other: 5 classes x 1 template."""
    class_embeddings(tiny, ["cat", "dog", "fox"], ["a {}.", "the {}."])
    imgs = [Image.new("RGB", (24, 24), c) for c in ("red", "green", "blue", "white")]
    vlmood.extract_features(tiny, imgs, local=True, num_workers=0, progress=False)
    class_embeddings(other, ["cat", "dog", "fox", "owl", "emu"], ["a {}."])
    return vlmood._paths.cache_root()


def by(rows, **kw):
    return [r for r in rows if all(r[k] == v for k, v in kw.items())]


def test_info_counts_the_entries_written(filled, tiny, other):
    rows = cache_info()
    assert len(rows) == 4
    (t,) = by(rows, kind="text", fingerprint=tiny.fingerprint)
    assert (t["entries"], t["spec"], t["precision"]) == (6, str(tiny.spec), "fp32")
    (o,) = by(rows, kind="text", fingerprint=other.fingerprint)
    assert o["entries"] == 5
    feats = by(rows, kind="features", fingerprint=tiny.fingerprint)
    assert sorted(r["entries"] for r in feats) == [4, 4]
    assert sorted(r["detail"].split(",", 1)[0] for r in feats) == ["global", "local"]
    for r in rows:
        assert (r["bytes"], r["modified"]) == files_under(Path(r["path"]))
        assert Path(r["path"]).parent.parent == filled
    assert cache_info(filled) == rows  # root= explicit
    assert cache_info(filled / "nothing-here") == []


def test_clear_by_fingerprint_prefix_removes_only_that_encoder(filled, tiny, other):
    weights = tiny.fingerprint.rsplit(":", 1)[1]
    assert weights[:8] != other.fingerprint.rsplit(":", 1)[1][:8]
    mine = {r["path"] for r in by(cache_info(), fingerprint=tiny.fingerprint)}
    done = clear_cache(encoder=weights[:8])
    assert {r["path"] for r in done["removed"]} == mine
    assert len(done["removed"]) == 3 and done["entries"] == 6 + 4 + 4 and not done["errors"]
    assert all(not Path(r["path"]).exists() for r in done["removed"])
    left = cache_info()
    assert [(r["kind"], r["fingerprint"], r["entries"]) for r in left] == [("text", other.fingerprint, 5)]
    # the cache still works afterwards: recomputed, stored again
    class_embeddings(tiny, ["cat"], ["a {}."])
    assert by(cache_info(), fingerprint=tiny.fingerprint)[0]["entries"] == 1
    # the whole fingerprint works too
    assert len(clear_cache(encoder=other.fingerprint)["removed"]) == 1


def test_older_than_uses_the_newest_file(filled, tiny, other):
    (old,) = by(cache_info(), kind="text", fingerprint=other.fingerprint)
    stamp = time.time() - 10 * DAY
    for d, _, names in os.walk(old["path"]):
        for n in names:
            os.utime(os.path.join(d, n), (stamp, stamp))
    assert clear_cache(older_than_days=11)["removed"] == []
    assert clear_cache(encoder=tiny.fingerprint, older_than_days=5)["removed"] == []  # AND: tiny's are new
    done = clear_cache(older_than_days=5)
    assert [r["path"] for r in done["removed"]] == [old["path"]] and not Path(old["path"]).exists()
    assert len(cache_info()) == 3
    with pytest.raises(InvalidInputError, match="older_than_days must be a number of days >= 0"):
        clear_cache(older_than_days=-1)


def test_ambiguous_or_unknown_prefix_is_one_line(filled, tiny, other):
    with pytest.raises(InvalidInputError) as e:
        clear_cache(encoder="open_clip:vlmood-tiny")
    msg = str(e.value)
    assert "matches 2 cached encoders" in msg and tiny.fingerprint in msg and other.fingerprint in msg
    assert "\n" not in msg
    with pytest.raises(InvalidInputError, match="no cached encoder matches 'zzz'; cached encoders: open_clip:"):
        clear_cache(encoder="zzz")
    assert len(cache_info()) == 4  # nothing removed


def test_old_and_missing_meta_files(filled, tiny):
    rows = cache_info()
    (t,) = by(rows, kind="text", fingerprint=tiny.fingerprint)
    meta = Path(t["path"]) / "meta.json"
    ns = json.loads(meta.read_text())["namespace"]
    meta.write_text(json.dumps({"namespace": ns}))  # written by an older vlmood: no "encoder" record
    (t2,) = by(cache_info(), kind="text", fingerprint=tiny.fingerprint)
    assert (t2["spec"], t2["precision"], t2["entries"]) == (None, "fp32", 6)
    meta.unlink()
    (u,) = by(cache_info(), kind="text", fingerprint=UNKNOWN)
    assert u["entries"] == 6
    clear_cache(encoder=tiny.fingerprint)  # features folders go, the unknown one stays
    assert [r["fingerprint"] for r in cache_info() if r["kind"] == "text"].count(UNKNOWN) == 1
    clear_cache()
    assert cache_info() == []


def test_other_caches_are_listed_and_foreign_files_left_alone(filled, tiny):
    from vlmood.lvlm.cache import ResponseCache

    rc = ResponseCache()
    for i in range(3):
        rc.put(rc.key("m", f"prompt {i}", "none", {}), "yes")
    views = filled / "tuning-views" / ("a" * 32)
    views.mkdir(parents=True)
    (views / "meta.json").write_text(json.dumps({"version": 1, "key": "a" * 32,
                                                 "shapes": {"global": [5, 2, 8], "done": [5, 2]}}))
    (filled / "my-notes.txt").write_text("not vlmood's")
    (filled / "text" / "not-a-namespace").mkdir()
    rows = cache_info()
    assert [r["entries"] for r in by(rows, kind="lvlm")] == [3]
    assert [r["entries"] for r in by(rows, kind="tuning-views")] == [10]
    # replies are aged one by one, and files vlmood did not write in lvlm/ stay
    old = sorted((filled / "lvlm").rglob("*.json"))[0]
    os.utime(old, (time.time() - 3 * DAY, time.time() - 3 * DAY))
    (filled / "lvlm" / "my-weights.bin").write_bytes(b"w")
    (old.parent / "notes.txt").write_text("mine")
    done = clear_cache(older_than_days=1)
    assert [(r["kind"], r["entries"]) for r in done["removed"]] == [("lvlm", 1)] and not old.exists()
    assert [r["entries"] for r in by(cache_info(), kind="lvlm")] == [2]
    done = clear_cache()
    assert len(done["removed"]) == 6 and [r["kind"] for r in cache_info()] == ["lvlm"]
    assert (filled / "my-notes.txt").is_file() and (filled / "text" / "not-a-namespace").is_dir()
    assert (filled / "lvlm" / "my-weights.bin").is_file() and (old.parent / "notes.txt").is_file()


def test_symlinks_out_of_the_root_are_not_followed(filled, tiny, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.bin").write_bytes(b"x" * 10_000)
    (outside / "index.lock").write_text("")
    (t,) = by(cache_info(), kind="text", fingerprint=tiny.fingerprint)
    before = t["bytes"]
    os.symlink(outside, Path(t["path"]) / "link-dir")
    os.symlink(outside / "precious.bin", Path(t["path"]) / "link.safetensors")
    os.symlink(outside, filled / "text" / ("b" * 24))  # a namespace folder that is a link
    os.symlink(outside, filled / "lvlm")
    rows = cache_info()
    assert len(rows) == 4 and by(rows, path=t["path"])[0]["bytes"] == before
    clear_cache()
    assert sorted(p.name for p in outside.iterdir()) == ["index.lock", "precious.bin"]
    assert (outside / "precious.bin").stat().st_size == 10_000
    assert not Path(t["path"]).exists()


def test_clear_waits_for_a_writer_holding_the_index_lock(filled, tiny, other):
    (o,) = by(cache_info(), kind="text", fingerprint=other.fingerprint)
    folder = Path(o["path"])
    result = {}
    with _file_lock(folder / "index.lock"):
        t = threading.Thread(target=lambda: result.update(clear_cache(encoder=other.fingerprint)))
        t.start()
        time.sleep(0.3)
        assert folder.is_dir() and not result  # still waiting for the writer
    t.join(10)
    assert len(result["removed"]) == 1 and not folder.exists()


def test_cli_cache_info_and_clear(filled, tiny, other, capsys):
    from vlmood.cli import main

    assert main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    rows = cache_info()
    assert f"total: {len(rows)} folder(s), {sum(r['entries'] for r in rows)} entries" in out
    assert tiny.fingerprint in out and other.fingerprint in out
    prefix = other.fingerprint.rsplit(":", 1)[-1][:8]  # a prefix of its weights hash
    assert main(["cache", "clear", "--encoder", prefix]) == 0
    assert "removed 1 folder(s), 5 entries" in capsys.readouterr().out
    assert {r["fingerprint"] for r in cache_info()} == {r["fingerprint"] for r in rows} - {other.fingerprint}
    assert main(["cache", "clear", "--encoder", "zzzz"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "zzzz" in err
    assert main(["cache", "clear", "--older-than", "-1"]) == 2
    assert main(["cache", "clear", "--older-than", "1"]) == 0  # everything was written just now
    assert "removed 0 folder(s)" in capsys.readouterr().out
    assert main(["cache", "clear"]) == 0
    assert cache_info() == [] and "the cache in" in (main(["cache", "info"]) or capsys.readouterr().out)
