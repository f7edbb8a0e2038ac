"""CLIPN training (vlmood.clipn.trainer) on toy-world pairs: DDP over 2 CPU processes equals one process on the same
global batch, torchrun with one process, resume, a non-finite loss, unreadable images and long captions, what is
trained (only the no side, the reference's weight-decay rule and cosine schedule) and what is saved."""
import json
import math
import os
import re
import socket
import traceback
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import vlmood
from vlmood.clipn import trainer as clipn_trainer
from vlmood.clipn.model import CLIPNModel
from vlmood.clipn.pairs import PairSource, as_pairs
from vlmood.clipn.trainer import CLIPNTrainer, decays, distributed, init_distributed, lr_at
from vlmood.encoders.base import hash_state_dict
from vlmood.errors import ImageLoadError, InvalidInputError
from vlmood.toyworld import World
from vlmood.tuning.trainer import NonFiniteLossError

N, LR = 128, 1e-3
PARTS = ("loss", "bin_yes", "bin_no", "tso")
NO_PREFIXES = ("transformer_no.", "token_embedding_no.", "positional_embedding_no", "ln_final_no.",
               "text_projection_no", "prompt_no")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Exact-equality tests (resume, torchrun with one process) compare two runs of the same computation. With several
    CPU threads torch's reductions may round differently from run to run, and AdamW turns that noise in exactly-zero
    gradients (the key bias of attention) into ~1e-5 weight differences; one thread makes the runs bit-identical."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def enc():
    return vlmood.load_encoder("toyworld", device="cpu")  # CPU even where there is a GPU: gloo, fork


@pytest.fixture(scope="module")
def world_pairs():
    images, captions, _ = World(0).batch(N)
    return PairSource.from_memory([Image.fromarray(a) for a in images], captions, name="toy")


@pytest.fixture(scope="module")
def full(enc, world_pairs, tmp_path_factory):
    """One uninterrupted run (2 epochs, batch 32: 8 steps) and its run folder, trained under its own cache."""
    root = tmp_path_factory.mktemp("full")
    with pytest.MonkeyPatch.context() as m:
        m.setenv("VLMOOD_CACHE", str(root / "cache"))
        tr = _fit(enc, world_pairs, out=root / "run")
    return tr, root / "run"


def _fit(enc, pairs, out=None, epochs=2, batch_size=32, lr=LR, **kw):
    tr = CLIPNTrainer(enc, lr=lr, seed=0, **{k: kw.pop(k) for k in ("warmup_steps", "weight_decay") if k in kw})
    tr.fit(pairs, epochs=epochs, batch_size=batch_size, out=out, progress=False, **kw)
    return tr


def _records(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _steps(log):
    return [r for r in log if "step" in r and not r.get("summary") and "error" not in r]


def _timeless(log):
    """Log records without their wall-clock fields."""
    clocks = ("elapsed", "epoch_s", "features_s")
    return [{k: _timeless([v])[0] if isinstance(v, dict) else v for k, v in r.items() if k not in clocks} for r in log]


def _without_key_bias(sd):
    """The no side without the key part of each attention's in_proj_bias: its true gradient is exactly 0 (softmax
    ignores a shift shared by all keys), so it carries only rounding noise, which AdamW's normalisation scales up
    to ~lr per step (measured: 1.7e-5 between 2 processes and 1 after 8 steps at lr 1e-3; it changes no output)."""
    out = dict(sd)
    for k, v in sd.items():
        if k.endswith("attn.in_proj_bias"):
            w = v.shape[0] // 3
            out[k] = torch.cat([v[:w], v[2 * w:]])
    return out


def _max_diff(a, b):
    assert set(a) == set(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_line(e):
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


# ---------------------------------------------------------------------------------------------- DDP
def _ddp_worker(rank, world, port, enc, pairs, run, out, batch_size):
    """One rank of a 2-process gloo run, in a forked child: trains, writes its final no side and what
    init_distributed returned, or its traceback."""
    try:
        torch.set_num_threads(1)  # libgomp's thread pool does not survive fork: one thread in the child
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
        got = init_distributed(device="cpu")  # gloo
        tr = _fit(enc, pairs, out=run, epochs=2, batch_size=batch_size)
        save_file(tr.model_.state_dict_no(), str(out / f"rank{rank}.safetensors"))
        (out / f"rank{rank}.json").write_text(json.dumps({"init": list(got), "distributed": list(distributed()),
                                                          "meta_world": tr.model_.meta["world_size"]}))
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        os._exit(1)


def test_ddp_two_gloo_processes_equal_one_process_on_the_global_batch(enc, world_pairs, full, tmp_path,
                                                                      monkeypatch):
    b, world = 16, 2
    ctx = torch.multiprocessing.get_context("fork")  # the parent's imports and encoder: no 10 s start per rank
    port = _free_port()
    run = tmp_path / "ddp"
    monkeypatch.setenv("VLMOOD_CACHE", str(tmp_path / "shared-cache"))
    procs = [ctx.Process(target=_ddp_worker, args=(r, world, port, enc, world_pairs, run, tmp_path, b))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join()
    errors = "".join((tmp_path / f"rank{r}.err").read_text() for r in range(world)
                     if (tmp_path / f"rank{r}.err").exists())
    assert not hung and all(p.exitcode == 0 for p in procs) and not errors, errors or "a rank hung"
    for r in range(world):
        assert json.loads((tmp_path / f"rank{r}.json").read_text()) == {"init": [r, 2], "distributed": [r, 2],
                                                                       "meta_world": 2}

    one, one_run = full  # one process, batch 2 * 16, its own cache
    assert one.model_.meta["batch_size"] == world * b
    ddp_log, one_log = _records(run / "log.jsonl"), _records(one_run / "log.jsonl")
    assert ddp_log[0]["data"]["pairs"] == N and ddp_log[0]["data"]["skipped"] == {}
    ddp_steps, one_steps = _steps(ddp_log), _steps(one_log)
    assert [(r["epoch"], r["step"]) for r in ddp_steps] == [(e, s) for e, s in zip([1] * 4 + [2] * 4, range(1, 9))]
    assert [(r["epoch"], r["step"]) for r in ddp_steps] == [(r["epoch"], r["step"]) for r in one_steps]
    for d, o in zip(ddp_steps, one_steps):
        assert d["lr"] == o["lr"]
        for k in PARTS:
            assert abs(d[k] - o[k]) <= 1e-5, (d, o)

    want = one.model_.state_dict_no()
    start = CLIPNModel(enc).state_dict_no()
    assert _max_diff(want, start) > 1e-3  # it trained: equal weights below are not the untouched start
    results = [load_file(str(run / "clipn.safetensors")), load_file(str(tmp_path / "rank0.safetensors")),
               load_file(str(tmp_path / "rank1.safetensors"))]
    assert _max_diff(results[1], results[2]) == 0  # every rank applies the same summed gradient
    for got in results:
        assert _max_diff(_without_key_bias(got), _without_key_bias(want)) <= 1e-5
    # and the no side computes the same features (the key bias included)
    ddp = CLIPNModel.load(run / "clipn.safetensors", encoder=enc)
    texts = world_pairs.captions[:32]
    assert float((ddp.text_features_no(texts, cache=False) - one.model_.text_features_no(texts, cache=False))
                 .abs().max()) <= 1e-5
    # the checkpoint is written by rank 0 only and records the world size it was trained with
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["step"] == 8 and json.loads(state["signature"])["world_size"] == 2


def test_torchrun_with_one_process_trains_as_one_process(enc, world_pairs, full, monkeypatch):
    plain = full[0]
    for k, v in dict(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(_free_port()), TORCHELASTIC_RUN_ID="none").items():
        monkeypatch.setenv(k, v)  # what `torchrun --nproc_per_node 1` sets
    assert init_distributed() == (0, 1)
    assert not torch.distributed.is_initialized() and distributed() == (0, 1)
    tr = _fit(enc, world_pairs)  # one process needs no run folder
    assert tr.model_.meta["world_size"] == 1
    assert _max_diff(tr.model_.state_dict_no(), plain.model_.state_dict_no()) == 0
    assert _timeless(_steps(tr.log_)) == _timeless(_steps(plain.log_))


# ---------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("where", ["after epoch 1", "mid epoch 2"])
def test_resume_equals_an_uninterrupted_run(enc, world_pairs, full, tmp_path, monkeypatch, where):
    full, full_run = full
    run = tmp_path / "cut"
    with monkeypatch.context() as m:
        if where == "after epoch 1":
            real_epoch, calls = CLIPNTrainer._epoch, []

            def cut(self, loop, epoch, step):
                calls.append(epoch)
                if len(calls) == 2:
                    raise KeyboardInterrupt
                return real_epoch(self, loop, epoch, step)

            m.setattr(CLIPNTrainer, "_epoch", cut)
            kept_step, kw = 4, {}
        else:
            real_loss, calls = clipn_trainer.clipn_loss, []

            def cut(*a):
                calls.append(1)
                if len(calls) == 6:  # in step 6 (epoch 2, step 2 of 4), after step 5's checkpoint
                    raise KeyboardInterrupt
                return real_loss(*a)

            m.setattr(clipn_trainer, "clipn_loss", cut)
            kept_step, kw = 5, {"checkpoint_seconds": 1e-9}
        with pytest.raises(KeyboardInterrupt):
            _fit(enc, world_pairs, out=run, **kw)
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == kept_step
    assert not (run / "clipn.safetensors").exists()  # the result is written only when the run completes
    resumed = _fit(enc, world_pairs, out=run, resume=True, **kw)
    assert _max_diff(resumed.model_.state_dict_no(), full.model_.state_dict_no()) == 0
    assert _max_diff(load_file(str(run / "clipn.safetensors")), load_file(str(full_run / "clipn.safetensors"))) == 0
    # the log file holds every record once, as the uninterrupted run's (its data record, 8 steps, 2 summaries)
    assert _timeless(_records(run / "log.jsonl")) == _timeless(_records(full_run / "log.jsonl"))
    assert _timeless(resumed.log_) == _timeless(full.log_)
    assert len(_steps(resumed.log_)) == 8


def test_resume_refusals(enc, world_pairs, tmp_path):
    run = tmp_path / "run"
    _fit(enc, world_pairs, out=run)
    with pytest.raises(InvalidInputError) as e:
        _fit(enc, world_pairs, out=run)
    assert re.fullmatch(r".*run \(checkpoint after step 8\); pass resume=True \(--resume\) to continue it, or choose "
                        r"another run folder", _one_line(e)) and str(run) in str(e.value)
    with pytest.raises(InvalidInputError) as e:
        _fit(enc, world_pairs, out=run, resume=True, lr=2 * LR)
    assert _one_line(e) == (f"cannot resume {run}: its run differs in hyperparameters.lr; resume with the same "
                            "arguments, or choose another run folder")
    with pytest.raises(InvalidInputError, match=r"its run differs in batch_size, data\.pairs, data\.sha256;"):
        _fit(enc, world_pairs.subset(range(96)), out=run, resume=True, batch_size=16)
    with pytest.raises(InvalidInputError) as e:
        _fit(enc, world_pairs, resume=True)
    assert _one_line(e) == "resume=True needs the run folder out= of the run to continue"
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 8  # the refusals changed nothing
    # resume=True on a folder without a checkpoint starts the run, saying so
    with pytest.warns(UserWarning, match="no checkpoint in .*: starting a new run"):
        fresh = _fit(enc, world_pairs, out=tmp_path / "new", resume=True)
    assert _max_diff(fresh.model_.state_dict_no(), load_file(str(run / "clipn.safetensors"))) == 0


# ---------------------------------------------------------------------------------------------- non-finite
@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_non_finite_loss_stops_naming_epoch_and_step_and_keeps_the_last_checkpoint(enc, world_pairs, full, tmp_path,
                                                                                  monkeypatch, what):
    run = tmp_path / "run"
    real_loss, calls, seen = clipn_trainer.clipn_loss, [], {}

    def bad(image, yes, no, scale):
        total, parts = real_loss(image, yes, no, scale)
        calls.append(1)
        if len(calls) == 6:  # global step 6 = epoch 2, step 2 of 4
            seen["checkpoint"] = (run / "checkpoint.pt").read_bytes()
            if what == "loss":
                total = total * float("nan")
            else:  # same value, NaN gradient: d sqrt(x)/dx at 0 is inf, times 0
                total = total + 0.0 * torch.sqrt((no - no.detach()).pow(2).sum())
        return total, parts

    monkeypatch.setattr(clipn_trainer, "clipn_loss", bad)
    with pytest.raises(NonFiniteLossError) as e:
        _fit(enc, world_pairs, out=run, checkpoint_seconds=1e-9)
    msg = _one_line(e)
    assert re.fullmatch(rf"clipn training stopped: non-finite {what} at epoch 2, step 2 of 4 \(loss=\S+, bin_yes=\S+, "
                        rf"bin_no=\S+, tso=\S+\); the last good checkpoint is kept in "
                        rf"{re.escape(str(run / 'checkpoint.pt'))}; lower lr or check the training data", msg), msg
    assert ("loss=nan" in msg) == (what == "loss")
    # the checkpoint of step 5 is untouched and loads
    assert (run / "checkpoint.pt").read_bytes() == seen["checkpoint"]
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["step"] == 5
    CLIPNModel(enc).no.load_state_dict(state["no"])
    assert not (run / "clipn.safetensors").exists()
    log = _records(run / "log.jsonl")
    assert [r["step"] for r in _steps(log)] == [1, 2, 3, 4, 5]
    err = log[-1]
    assert err["error"] == f"non-finite {what}" and (err["epoch"], err["step"]) == (2, 6)
    assert (err["loss"] is None) == (what == "loss")  # NaN is written as null: the file stays valid JSON
    # nothing is lost: resuming (the fault gone) finishes as an uninterrupted run
    monkeypatch.setattr(clipn_trainer, "clipn_loss", real_loss)
    resumed = _fit(enc, world_pairs, out=run, resume=True, checkpoint_seconds=1e-9)
    assert _max_diff(resumed.model_.state_dict_no(), full[0].model_.state_dict_no()) == 0
    assert all("error" not in r for r in _records(run / "log.jsonl"))


# ---------------------------------------------------------------------------------------------- data problems
def _manifest(tmp_path, n=64):
    images, captions, _ = World(1).batch(n)
    folder = tmp_path / "img"
    folder.mkdir()
    lines = ["path,caption"]
    for k, (a, c) in enumerate(zip(images, captions)):
        Image.fromarray(a).save(folder / f"{k:03d}.png")
        lines.append(f"img/{k:03d}.png,{c}")
    (folder / "bad.png").write_bytes(b"this is not a png")
    lines.insert(10, "img/bad.png,a red circle")
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tmp_path / "pairs.csv"


def test_unreadable_image_is_skipped_and_counted_or_raises(enc, tmp_path):
    pairs = as_pairs(str(_manifest(tmp_path)))
    assert len(pairs) == 65
    skipped = r"skipped 1 pair\(s\) whose image could not be read \(1 image\(s\)\): .*bad\.png"
    with pytest.warns(UserWarning, match=skipped):
        tr = _fit(enc, pairs, out=tmp_path / "run", epochs=1, batch_size=16, on_error="skip")
    assert tr.skipped_ == {"unreadable image": 1}
    data = _records(tmp_path / "run" / "log.jsonl")[0]["data"]
    assert (data["pairs"], data["skipped"], data["truncated"]) == (64, {"unreadable image": 1}, 0)
    assert tr.model_.meta["data"]["pairs"] == 64 and tr.model_.meta["data"]["skipped"] == {"unreadable image": 1}
    assert len(_steps(tr.log_)) == 4  # 64 pairs / 16

    with pytest.raises(ImageLoadError) as e:
        _fit(enc, pairs, out=tmp_path / "strict", epochs=1, batch_size=16, on_error="error")
    assert "bad.png" in _one_line(e)
    assert not (tmp_path / "strict").exists()  # nothing written for a run that never started
    with pytest.raises(InvalidInputError, match=r"^on_error must be one of \('skip', 'error'\), got 'ignore'$"):
        _fit(enc, pairs, epochs=1, on_error="ignore")


def test_long_caption_is_truncated_counted_and_warned_once(enc, tmp_path):
    images, captions, _ = World(2).batch(64)
    captions[5] = " ".join(["a", "big", "red", "striped", "circle"] * 8)  # 40 words; the context holds 18 + 2
    pairs = PairSource.from_memory([Image.fromarray(a) for a in images], captions)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr = _fit(enc, pairs, out=tmp_path / "run", epochs=1, batch_size=16)
    assert [str(w.message) for w in caught] == [
        "1 of 64 captions are longer than the text context of 20 tokens and were truncated"]
    data = _records(tmp_path / "run" / "log.jsonl")[0]["data"]
    assert (data["pairs"], data["truncated"], data["skipped"]) == (64, 1, {})
    assert tr.model_.meta["data"]["truncated"] == 1 and tr.skipped_ == {}


# ---------------------------------------------------------------------------------------------- what is trained
def test_training_lowers_the_loss_and_changes_only_the_no_side(enc, world_pairs, tmp_path):
    before = {k: v.detach().clone() for k, v in enc.model.state_dict().items()}
    fp, digest, flags, mode = enc.fingerprint, hash_state_dict(enc.model.state_dict()), \
        [p.requires_grad for p in enc.model.parameters()], enc.model.training
    tr = _fit(enc, world_pairs, out=tmp_path / "run", epochs=3, batch_size=32)
    summaries = [r for r in tr.log_ if r.get("summary")]
    assert [r["epoch"] for r in summaries] == [1, 2, 3]
    assert summaries[-1]["loss"] < summaries[0]["loss"] - 0.1, summaries
    # the summary is the mean of its epoch's steps
    for s in summaries:
        steps = [r for r in _steps(tr.log_) if r["epoch"] == s["epoch"]]
        assert len(steps) == 4 and s["loss"] == pytest.approx(sum(r["loss"] for r in steps) / 4, abs=1e-9)
    after = enc.model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert enc.fingerprint == fp and hash_state_dict(enc.model.state_dict()) == digest
    assert [p.requires_grad for p in enc.model.parameters()] == flags and enc.model.training == mode
    no = tr.model_.state_dict_no()
    start = CLIPNModel(enc).state_dict_no()
    assert float(no["prompt_no"].abs().max()) > 1e-4 and float(start["prompt_no"].abs().max()) == 0
    assert all(not torch.equal(no[k], start[k]) for k in ("token_embedding_no.weight", "text_projection_no",
                                                            "transformer_no.resblocks.0.attn.in_proj_weight"))


def test_weight_decay_groups_follow_the_reference_rule(enc, world_pairs, tmp_path):
    p1, p2, p3 = torch.zeros(4), torch.zeros(4, 4), torch.zeros(2, 4, 4)
    decayed = {"prompt_no": p3, "token_embedding_no.weight": p2, "positional_embedding_no": p2,
               "text_projection_no": p2, "transformer_no.resblocks.0.attn.in_proj_weight": p2,
               "transformer_no.resblocks.0.attn.out_proj.weight": p2, "transformer_no.resblocks.0.mlp.c_fc.weight": p2}
    kept = {"ln_final_no.weight": p1, "ln_final_no.bias": p1, "transformer_no.resblocks.0.ln_1.weight": p1,
            "transformer_no.resblocks.0.attn.in_proj_bias": p1, "transformer_no.resblocks.0.mlp.c_proj.bias": p1,
            "some.ln_x.weight": p2, "some.bn.weight": p2, "layer.bias": p2, "logit_scale": p2, "scale": p1}
    assert all(decays(k, p) for k, p in decayed.items())
    assert not any(decays(k, p) for k, p in kept.items())
    # the optimiser in the checkpoint: group 0 without decay (every 1-D tensor here), group 1 with wd (every matrix)
    tr = _fit(enc, world_pairs, out=tmp_path / "run", epochs=1, weight_decay=0.1)
    named = list(tr.model_.no.named_parameters())
    groups = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.0, 0.1]
    assert [(g["betas"], g["eps"]) for g in groups] == [((0.9, 0.98), 1e-6)] * 2
    by_shape = [len([k for k, p in named if p.ndim < 2]), len([k for k, p in named if p.ndim >= 2])]
    assert [len(g["params"]) for g in groups] == by_shape and by_shape[1] == 4 + 4 * _layers(named)


def _layers(named):
    return len({k.split(".")[2] for k, _ in named if k.startswith("transformer_no.resblocks.")})


def _reference_cosine_lr(step, base_lr, warmup_length, steps):
    """xmed-lab/CLIPN src/training/scheduler.py cosine_lr, written out."""
    if step < warmup_length:
        return base_lr * (step + 1) / warmup_length
    return 0.5 * (1 + np.cos(np.pi * (step - warmup_length) / (steps - warmup_length))) * base_lr


def test_lr_schedule_is_the_reference_cosine(enc, world_pairs):
    for warmup in (0, 1, 5):
        for step in range(20):
            assert lr_at(step, 3e-4, 20, warmup) == pytest.approx(_reference_cosine_lr(step, 3e-4, warmup, 20),
                                                                   rel=1e-12, abs=0)
    assert lr_at(0, 3e-4, 10) == 3e-4 and lr_at(5, 1.0, 10) == pytest.approx(0.5)
    assert [lr_at(s, 1.0, 10, 4) for s in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert lr_at(7, 1.0, 10, 4) == pytest.approx(0.5)
    tr = _fit(enc, world_pairs, epochs=2, warmup_steps=3)  # 8 steps: 3 of warmup
    assert [r["lr"] for r in _steps(tr.log_)] == pytest.approx(
        [_reference_cosine_lr(s, LR, 3, 8) for s in range(8)], rel=1e-12)


def test_saved_result_loads_with_the_same_no_features(enc, world_pairs, full):
    tr, run = full
    texts = world_pairs.captions[:8] + ["a photo of a red circle"]
    want = tr.model_.text_features_no(texts, cache=False)
    loaded = CLIPNModel.load(run / "clipn.safetensors", encoder=enc)
    assert float((loaded.text_features_no(texts, cache=False) - want).abs().max()) <= 1e-6
    tokens, _ = enc.tokenize(texts)
    with torch.no_grad():
        a = tr.model_.encode_no_tokens(tokens, torch.arange(len(texts)) % 17)
        b = loaded.encode_no_tokens(tokens, torch.arange(len(texts)) % 17)
    assert float((a - b).abs().max()) <= 1e-6
    assert loaded.fingerprint == tr.model_.fingerprint
    own = CLIPNModel.load(run / "clipn.safetensors")  # the base encoder from the file's own record
    assert own.encoder.fingerprint == enc.fingerprint
    assert float((own.text_features_no(texts, cache=False) - want).abs().max()) <= 1e-6
    untrained = CLIPNModel(enc).text_features_no(texts, cache=False)
    assert float((untrained - want).abs().max()) > 1e-3  # the comparison above can tell trained from not


# ---------------------------------------------------------------------------------------------- what is saved
def test_checkpoint_and_result_hold_only_the_no_side_and_metadata(enc, full):
    tr, run = full
    no_keys = set(CLIPNModel(enc).no.state_dict())
    assert all(k.startswith(NO_PREFIXES) for k in no_keys) and "prompt_no" in no_keys

    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert set(state) == {"no", "optimizer", "step", "elapsed", "signature"}
    assert set(state["no"]) == no_keys
    assert not set(state["no"]) & set(enc.model.state_dict())  # no base-CLIP key
    assert not any(k.startswith(("visual.", "logit_scale")) for k in state["no"])
    assert state["step"] == 8 and len(state["optimizer"]["state"]) == len(list(tr.model_.no.parameters()))
    assert _max_diff(state["no"], tr.model_.state_dict_no()) == 0
    sig = json.loads(state["signature"])
    assert sig["encoder"]["fingerprint"] == enc.fingerprint and sig["hyperparameters"] == tr.hyperparameters()
    assert (sig["epochs"], sig["batch_size"], sig["world_size"], sig["data"]["pairs"]) == (2, 32, 1, N)

    with safe_open(str(run / "clipn.safetensors"), framework="pt") as f:
        keys, header = set(f.keys()), f.metadata()
    assert keys == no_keys and not keys & set(enc.model.state_dict())
    assert (header["format"], header["version"]) == ("vlmood.clipn", "1")
    meta = json.loads(header["meta"])
    assert meta["encoder"] == {"spec": "toyworld", "fingerprint": enc.fingerprint}  # the registered name, portable
    assert meta["hyperparameters"] == tr.hyperparameters() == {
        "n_prompts": 16, "lr": LR, "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 0.2, "warmup_steps": 0,
        "grad_clip": None, "grad_checkpointing": False, "seed": 0}
    assert (meta["epochs"], meta["batch_size"], meta["steps"], meta["n_prompts"]) == (2, 32, 8, 16)
    assert meta["data"]["pairs"] == N and meta["data"]["sha256"] == sig["data"]["sha256"]
    last = [r for r in tr.log_ if r.get("summary")][-1]
    assert meta["final"]["loss"] == last["loss"] and math.isfinite(meta["final"]["loss"])
    assert sorted(os.listdir(run)) == ["checkpoint.pt", "clipn.safetensors", "log.jsonl"]  # no temporary file left


def test_each_pair_uses_the_seeded_prompt_choice_with_the_mean_among_them(enc, world_pairs, monkeypatch):
    """Every step's no-tower call gets, for each pair of the batch, the prompt index drawn for that pair by
    default_rng([seed, 4, epoch]).integers(0, K + 1) (K = the mean prompt), over the epoch's order."""
    seen = []
    real = CLIPNModel.encode_no_tokens

    def spy(self, tokens, prompt=-1, eot=None):
        seen.append(torch.as_tensor(prompt).clone())
        return real(self, tokens, prompt, eot)

    monkeypatch.setattr(CLIPNModel, "encode_no_tokens", spy)
    _fit(enc, world_pairs, epochs=2, batch_size=32)
    k = 16
    expected = []
    for e in range(2):
        order = np.random.default_rng([0, clipn_trainer.ORDER_STREAM, e]).permutation(N)
        choice = np.random.default_rng([0, clipn_trainer.PROMPT_STREAM, e]).integers(0, k + 1, size=N)
        expected += [choice[order[s * 32 : (s + 1) * 32]] for s in range(N // 32)]
    assert len(seen) == len(expected) == 8
    for got, want in zip(seen, expected):
        assert got.tolist() == want.tolist()
    allp = torch.cat(seen)
    assert int(allp.max()) == k and int(allp.min()) == 0  # the mean prompt (index K) is among the choices


def test_features_stay_aligned_with_their_captions(enc, tmp_path):
    """_prepare pairs every caption with its own image: a manifest where one image has two captions and another
    image is unreadable gives, per kept pair, exactly the encoder's feature of that pair's image file."""
    from vlmood.clipn.trainer import _prepare

    images, captions, _ = World(3).batch(6)
    rows = ["path,caption"]
    for i, a in enumerate(images):
        Image.fromarray(a).save(tmp_path / f"{i}.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    rows += [f"{i}.png,{captions[i]}" for i in range(6)]
    rows += [f"2.png,a second caption of image two", "bad.png,a caption whose image is broken",
             f"0.png,another caption of image zero"]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    src = as_pairs(tmp_path / "m.csv")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = _prepare(enc, src, "skip", False, 0, 1)
    want_files = [f"{i}.png" for i in range(6)] + ["2.png", "0.png"]
    assert data.n == 8 and data.skipped.get("unreadable image") == 1
    direct = enc.encode_images([str(tmp_path / f) for f in want_files])
    assert torch.allclose(data.image, torch.nn.functional.normalize(direct.float(), dim=-1), atol=1e-5)
    want_caps = captions + ["a second caption of image two", "another caption of image zero"]
    assert torch.allclose(data.text, vlmood.embed_texts(enc, want_caps), atol=1e-5)


def test_a_subset_never_reads_images_no_pair_uses(enc, tmp_path):
    """subset() leaves the broken image without a pair: training with on_error='error' must not read it."""
    images, captions, _ = World(4).batch(40)
    rows = ["path,caption", "bad.png,broken"]
    (tmp_path / "bad.png").write_bytes(b"not an image")
    for i, a in enumerate(images):
        Image.fromarray(a).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{captions[i]}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    src = as_pairs(tmp_path / "m.csv").subset(range(1, 41))
    tr = _fit(enc, src, epochs=1, batch_size=16, on_error="error")
    assert tr.skipped_ == {}


def test_fit_under_torchrun_without_the_process_group_is_refused(enc, world_pairs, monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(InvalidInputError, match=r"WORLD_SIZE=2 \(torchrun\) but this process has not joined"):
        _fit(enc, world_pairs, out=tmp_path / "run", epochs=1)
    monkeypatch.setenv("WORLD_SIZE", "abc")
    with pytest.raises(InvalidInputError, match=r"WORLD_SIZE must be a non-negative integer .*'abc'"):
        init_distributed("cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(InvalidInputError, match=r"RANK=2 and WORLD_SIZE=2 do not fit"):
        init_distributed("cpu")
