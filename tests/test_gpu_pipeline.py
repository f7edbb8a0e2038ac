"""benchmarks/gpu_pipeline.py on the CPU: its tensor preprocess against the PIL preprocess, its on-device scoring
against the detectors' own ``score_features``, and its CPU dry run end to end (what it skips, what it prints)."""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("gpu_pipeline", ROOT / "benchmarks" / "gpu_pipeline.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_pipeline"] = mod  # its dataclass looks its module up there
    spec.loader.exec_module(mod)
    return mod


gp = _load()


def _vit_b16_preprocess():
    """ViT-B-16's eval preprocess as open_clip builds it (Resize 224 bicubic, CenterCrop 224, OpenAI mean/std),
    without building the model."""
    import open_clip
    from open_clip.transform import image_transform

    return image_transform(224, is_train=False, mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torchvision 0.29's image decoders point to TorchCodec
def test_tensor_preprocess_matches_pil(tmp_path):
    from torchvision.io import ImageReadMode, decode_jpeg

    from vlmood.data import load_image

    pre = _vit_b16_preprocess()
    plan = gp.preprocess_plan(pre)
    assert plan.size == 224 and plan.crop == (224, 224) and plan.mode == "bicubic"
    rng = np.random.default_rng(3)
    sizes = [(500, 375), (375, 500), (500, 333), (640, 480), (100, 80), (224, 224)]  # ImageNet's, one upscale, one 1:1
    paths = []
    for k, (w, h) in enumerate(sizes):
        p = tmp_path / f"{k}.jpg"
        p.write_bytes(gp._photo_like(rng, w, h))
        paths.append(str(p))
    decoded = decode_jpeg([gp.read_bytes(p) for p in paths], mode=ImageReadMode.RGB)
    mine = gp.tensor_preprocess(decoded, plan)  # mixed sizes in one call: grouped, then put back in order
    ref = torch.stack([pre(load_image(p)) for p in paths])
    assert mine.shape == ref.shape == (len(sizes), 3, 224, 224)
    levels = (mine - ref).abs() * torch.tensor(plan.std).view(1, 3, 1, 1) * 255  # in 8-bit levels
    # Stated tolerance: at most 1 level anywhere, and under 0.1% of values off by any level.
    assert float(levels.max()) <= 1.0 + 1e-3
    assert float((levels > 0.5).float().mean()) < 1e-3
    # The tolerance tells resizers apart: one float pass (no rounding between Pillow's two passes) misses it.
    d0 = decoded[0]
    one_pass = F.interpolate(d0[None].float(), size=gp.resized_size(d0.shape[1], d0.shape[2], plan), mode="bicubic",
                             antialias=True).round().clamp(0, 255)
    from torchvision.transforms.v2 import functional as TF

    x = (TF.center_crop(one_pass, [224, 224]) / 255 - torch.tensor(plan.mean).view(1, 3, 1, 1)) \
        / torch.tensor(plan.std).view(1, 3, 1, 1)
    assert float(((x - ref[:1]).abs() * torch.tensor(plan.std).view(1, 3, 1, 1) * 255 > 0.5).float().mean()) > 1e-2


def test_preprocess_plan_refuses_unknown_steps():
    from torchvision import transforms as T

    with pytest.raises(ValueError, match="not reproduced"):
        gp.preprocess_plan(T.Compose([T.Resize(224), T.RandomHorizontalFlip(), T.CenterCrop(224), T.ToTensor(),
                                      T.Normalize((0.5,) * 3, (0.5,) * 3)]))
    with pytest.raises(ValueError, match="lacks"):
        gp.preprocess_plan(T.Compose([T.Resize(224), T.ToTensor()]))


def test_device_scorer_matches_detectors(tiny):
    dets = gp.build_detectors(tiny, "cifar10", gp.SMALL_LEXICON, 10)
    scorer = gp.DeviceScorer(dets, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    d = tiny.embed_dim
    feats = F.normalize(torch.randn(20, d, generator=g), dim=-1)
    local = F.normalize(torch.randn(20, 16, d, generator=g), dim=-1)
    feats[3, 0] = float("nan")  # NaN scores everywhere
    local[5, 2, 1] = float("inf")  # NaN for GL-MCM only
    got = scorer(feats, local)
    assert set(got) == set(dets) | {"pred"}
    for name, det in dets.items():
        want = det.score_features(feats, local) if det.needs_local else det.score_features(feats)
        np.testing.assert_allclose(got[name].numpy(), want, rtol=1e-5, atol=1e-6, err_msg=name)  # NaN == NaN
        assert np.isnan(want[3]) and (np.isnan(want[5]) == (name == "glmcm")), name
    keep = [i for i in range(20) if i != 3]
    np.testing.assert_array_equal(got["pred"].numpy()[keep], dets["mcm"].classify_features(feats[keep]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine main() runs the full GPU benchmark")
def test_cpu_dry_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where its temporary folder goes
    out = tmp_path / "r.json"
    res = gp.main(["--model", "open_clip:vlmood-tiny-vit/none", "--cpu-images", "4", "--batch-size", "4",
                   "--lexicon-limit", "200", "--out", str(out)])
    printed = capsys.readouterr().out
    assert json.loads(out.read_text())["images"] == res["images"] == 4
    assert res["gpu"] is None and "no CUDA device" in res["skipped"][0] and "nvjpeg" in res["skipped"][0]
    assert gp.GPU_COMMAND in printed and "SKIPPED: no CUDA device" in printed
    assert "projection_90k_s" not in res  # no throughput claim without a GPU
    # both pipelines scored the same 4 images alike (fp32 on the CPU: (b)'s decoder and preprocess, its scoring)
    ag = res["agreement_b_vs_a"]
    assert ag["same_class"] == 1.0
    for name in ("mcm", "glmcm", "energy", "maxlogit", "neglabel", "clipn"):
        assert ag[name]["max_score_diff"] <= 0.01 * ag[name]["score_range"], name  # 1-level pixel differences
        assert res["device_scoring_vs_detectors_max_diff"][name] < 1e-5, name
    assert res["preprocess_check"]["max_levels"] <= 1.0 + 1e-3
    assert res["lexicon_encoding"]["prompts"] == 200 and "skipped" in res["lexicon_encoding"]
    assert set(res["cpu_decode"]["stage_images_per_s"]) >= {"file read", "image tower", "scoring (detectors, CPU)"}
    assert res["gpu_decode"]["limited_by"] in res["gpu_decode"]["stage_images_per_s"]
    assert os.listdir(tmp_path) == ["r.json"]  # the JPEGs and the cache folder are gone


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_decode_batch_falls_back_per_image(tiny, tmp_path):
    """A batch with a PNG and a corrupt file: the JPEGs are decoded together, the PNG through vlmood's PIL path,
    the corrupt file reported; rows stay in input order and equal the PIL preprocess."""
    from PIL import Image

    from vlmood.data import load_image

    rng = np.random.default_rng(1)
    files = {"a.jpg": gp._photo_like(rng, 500, 375), "b.png": None, "c.jpg": b"\xff\xd8\xff\xe0 not a jpeg",
             "d.jpg": gp._photo_like(rng, 375, 500)}
    Image.fromarray((rng.random((60, 80, 3)) * 255).astype(np.uint8)).save(tmp_path / "b.png")
    paths = []
    for name, data in files.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
        paths.append(str(tmp_path / name))
    plan = gp.preprocess_plan(tiny.preprocess)
    batch, kept, errors = gp.decode_batch([gp.read_bytes(p) for p in paths], paths, tiny, plan, torch.device("cpu"))
    assert kept == [0, 1, 3] and [p for p, _ in errors] == [paths[2]]
    ref = torch.stack([tiny.preprocess(load_image(paths[i])) for i in kept])
    levels = (batch - ref).abs() * torch.tensor(plan.std).view(1, 3, 1, 1) * 255
    assert batch.shape == ref.shape and float(levels.max()) <= 1.0 + 1e-3
