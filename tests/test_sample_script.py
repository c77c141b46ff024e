"""launch/sample.py: a tiny run folder -> ADM .npz; shards resume; output independent of rank count."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from irepa import codec
from irepa import generate as gen
from irepa.recipes import resolve
from irepa.recipes.sit import SiTRecipe
from irepa.train import checkpoint
from irepa.train.assemble import offline_parts
from irepa.errors import InputError, InputNotFound

ROOT = Path(__file__).resolve().parents[1]


def _load_launch(name):
    spec = importlib.util.spec_from_file_location(f"launch_{name}", ROOT / "launch" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder as the trainer writes it: config.json + checkpoints/step-N (digits, tiny SiT)."""
    run = tmp_path_factory.mktemp("run")
    cfg = resolve("digits-sit-irepa", {"model.name": "SiT-Tiny/2", "model.input_size": 8, "model.align_depth": 1,
                                       "align.encoders": []})
    (run / "config.json").write_text(cfg.to_json())
    torch.manual_seed(0)
    parts = offline_parts(cfg, encoder_dims=[])
    model, ema = parts["model"].module.model, parts["model"].ema
    with torch.no_grad():  # a non-zero output layer, so samples depend on noise and labels
        model.final_layer.linear.weight.normal_(0, 0.5)
        model.final_layer.adaLN_modulation[-1].weight.normal_(0, 0.5)
    ema.load_state_dicts([model.state_dict()])
    checkpoint.save(run, 5, parts, trainer_state={}, rng={"cpu": torch.get_rng_state()})
    return run


def test_sample_resumes_and_skips_finished_shards(run_dir, tmp_path, capsys):
    sample = _load_launch("sample")
    out = tmp_path / "samples"
    kw = dict(n=10, batch=3, method="euler", steps=2, shard_size=4, labels="balanced", keep_shards=True,
              device="cpu", seed=3)
    sample.main(str(run_dir), str(out), **kw)
    with np.load(out / "samples.npz") as z:
        first, labels = z["arr_0"], z["arr_1"]
    assert first.shape == (10, 8, 8, 3) and first.dtype == np.uint8
    assert sorted(labels.tolist()) == list(range(10))  # balanced: N / C per class
    assert (out / "grid.png").is_file() and first.std() > 0
    shards = sorted((out / "shards").glob("shard-*.npz"))
    assert [p.name for p in shards] == ["shard-000000.npz", "shard-000001.npz", "shard-000002.npz"]

    # kill-and-restart: the final file and one shard are gone, the others must be reused as they are
    (out / "samples.npz").unlink()
    shards[1].unlink()
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (shards[0], shards[2])}
    capsys.readouterr()
    sample.main(str(run_dir), str(out), **kw)
    assert "resuming: 2 of 3 shards already done" in capsys.readouterr().out
    for p in (shards[0], shards[2]):
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == before[p.name]
    with np.load(out / "samples.npz") as z:
        np.testing.assert_array_equal(z["arr_0"], first)  # the redone shard is bit-identical

    with pytest.raises(ValueError, match="steps"):
        sample.main(str(run_dir), str(out), **{**kw, "steps": 3})


def test_output_does_not_depend_on_rank_count(tmp_path):
    plan = gen.SamplePlan(num_samples=11, num_classes=10, shard_size=3, batch_size=2, latent_shape=(1, 4, 4))

    def sample_batch(noise, labels, g):
        return ((noise + labels.view(-1, 1, 1, 1) / 10 + torch.randn(noise.shape, generator=g)) / 4 + 0.5
                ).clamp(0, 1).expand(-1, 3, -1, -1)

    results = []
    for world in (1, 3):
        out = tmp_path / f"w{world}"
        for rank in range(world):
            gen.generate_shards(plan, out, sample_batch, rank, world, log=lambda m: None)
        final = gen.merge_shards(plan, out, grid=4)
        assert not (out / "shards").exists()
        with np.load(final) as z:
            results.append((z["arr_0"].copy(), z["arr_1"].copy()))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])
    with pytest.raises(FileNotFoundError, match="missing"):
        gen.merge_shards(plan, tmp_path / "empty")


def test_latent_scaling(tmp_path):
    z = torch.randn(2, 4, 3, 3)
    f = codec.LatentScaling.factor(0.18215)
    torch.testing.assert_close(f.unscale(z), z / 0.18215)
    (tmp_path / "m.json").write_text(json.dumps({"latent_stats": {"mean": [1, 2, 3, 4], "std": [2, 2, 2, 2]}}))
    s = codec.LatentScaling.from_file(tmp_path / "m.json")
    torch.testing.assert_close(s.unscale(z), z * 2 + torch.tensor([1.0, 2, 3, 4]).view(1, 4, 1, 1))
    with pytest.raises(FileNotFoundError, match="config.json"):
        codec.VAE(tmp_path)


def test_vae_decoder_from_local_folder(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                                  down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    vae.save_pretrained(tmp_path / "vae")
    dec = codec.LatentDecoder(codec.VAE(tmp_path / "vae"), codec.LatentScaling.factor(0.18215))
    z = torch.randn(2, 4, 6, 6)
    img = dec(z)
    assert img.shape == (2, 3, 6, 6) and img.min() >= 0 and img.max() <= 1
    with torch.no_grad():
        want = ((vae.decode(z / 0.18215).sample + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(img, want)


def test_cli_with_cfg_interval(run_dir, tmp_path):
    out = tmp_path / "cli"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "sample.py"), str(run_dir), "--out", str(out),
                        "--n", "4", "--batch", "4", "--method", "sde", "--steps", "3", "--cfg", "1.5",
                        "--interval", "0.2,0.9", "--device", "cpu"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    plan = json.loads((out / "plan.json").read_text())
    assert plan["interval"] == [0.2, 0.9] and plan["cfg"] == 1.5 and plan["extra"]["decoder"] == "pixel-codec"
    with np.load(out / "samples.npz") as z:
        assert z["arr_0"].shape == (4, 8, 8, 3)


def test_every_flag_passes_through_torchrun():
    """torchrun's parser takes any unambiguous prefix of its own options, so a script flag that
    is one (--n: --nnodes, --nproc_per_node, ...) never reaches the script."""
    import inspect

    from torch.distributed.run import get_args_parser

    def refused(script):
        out = set()
        for name in inspect.signature(_load_launch(script).main).parameters:
            try:
                args = get_args_parser().parse_args(["--nproc_per_node=2", f"launch/{script}.py", "A", "B",
                                                     f"--{name}", "1"])
                assert args.training_script_args[-2:] == [f"--{name}", "1"]
            except SystemExit:
                out.add(name)
        return out

    assert refused("sample") == {"n"}  # kept as an alias for python launch/sample.py; torchrun uses --num_samples
    assert refused("prepare") == set() and refused("evaluate") == set()
    sample = _load_launch("sample")
    with pytest.raises(ValueError, match="disagree"):
        sample.main("unused", "unused", num_samples=4, n=5)


def test_a_failed_start_leaves_the_folder_usable(run_dir, tmp_path):
    sample = _load_launch("sample")
    out = tmp_path / "s"
    kw = dict(batch=2, method="euler", steps=2, shard_size=2, device="cpu")
    # a typo that only the sampler noticed used to write plan.json first and lock the folder to it
    for bad, match in [({"method": "ode"}, "unknown sampling method"), ({"method": "sde", "steps": 1}, "at least 2"),
                       ({"cfg": 2.0, "interval": "0.7,0.2"}, "LOW <= HIGH"), ({"interval": "0.5"}, "LOW,HIGH")]:
        with pytest.raises(ValueError, match=match):
            sample.main(str(run_dir), str(out), n=3, **{**kw, **bad})
    assert sample.main(str(run_dir), str(out), n=3, **kw) == str(out / "samples.npz")
    with np.load(out / "samples.npz") as z:
        assert z["arr_0"].shape == (3, 8, 8, 3)
    # once samples exist the plan is binding again
    with pytest.raises(ValueError, match="other settings"):
        sample.main(str(run_dir), str(out), n=3, **{**kw, "steps": 3})


def test_latent_run_decodes_with_the_vae_its_data_manifest_names(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    sample = _load_launch("sample")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                                  down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    vae.save_pretrained(tmp_path / "vae")
    data = tmp_path / "ds"
    data.mkdir()
    latent = {"vae": str((tmp_path / "vae").resolve()), "channel_mean": [0.5] * 4, "channel_std": [2.0] * 4}
    (data / "manifest.json").write_text(json.dumps({"latent": latent}))
    info = {"data": str(data), "builtin": None, "num_classes": 3}
    decode, desc = sample.build_decoder(SiTRecipe(), info, 4, None, None, None, "cpu")
    assert desc == f"vae:{latent['vae']}:stats:{data / 'manifest.json'}"
    z = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        want = ((vae.decode(z * 2.0 + 0.5).sample + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(decode(z), want)
    # the manifest names a folder this machine lacks: say so, and which manifest said it
    (data / "manifest.json").write_text(json.dumps({"latent": {**latent, "vae": str(tmp_path / "gone")}}))
    with pytest.raises(ValueError, match=f"needs --vae DIR.*{tmp_path / 'gone'}, which is not on this machine"):
        sample.build_decoder(SiTRecipe(), info, 4, None, None, None, "cpu")
    (data / "manifest.json").unlink()
    with pytest.raises(ValueError, match=f"{data / 'manifest.json'} is not on this machine"):
        sample.build_decoder(SiTRecipe(), info, 4, str(tmp_path / "vae"), None, None, "cpu")


def test_each_model_kind_is_guided_by_its_release_rule(run_dir, tmp_path, monkeypatch):
    """SiT runs sample with the SiT release's CFG interval rule, JiT runs with the JiT
    release's (irepa.sampling.guidance_schedule, the recipe's interval_rule); the rule is
    recorded in plan.json when CFG acts."""
    import irepa.recipes.base as recipe_base
    sample = _load_launch("sample")
    rules = []
    real = recipe_base.integrate

    def recording(*a, **kw):
        rules.append(kw["interval_rule"])
        return real(*a, **kw)
    monkeypatch.setattr(recipe_base, "integrate", recording)  # the sampler every recipe's sample() calls

    jit_run = tmp_path / "jit-run"
    jit_run.mkdir()
    cfg = resolve("jit-b16-irepa", {"model.name": "JiT-Tiny/4", "model.input_size": 16, "model.align_depth": 1,
                                    "model.num_classes": 10, "align.encoders": [],
                                    "data.source": str(tmp_path / "pixels-not-here"), "data.resolution": 16})
    (jit_run / "config.json").write_text(cfg.to_json())
    checkpoint.save(jit_run, 1, offline_parts(cfg, encoder_dims=[]), trainer_state={},
                    rng={"cpu": torch.get_rng_state()})
    kw = dict(n=2, batch=2, method="heun", steps=2, cfg=2.0, interval="0,0.9", device="cpu")
    for run, rule in ((run_dir, "sit"), (jit_run, "jit")):
        out = tmp_path / f"out-{rule}"
        sample.main(str(run), str(out), **kw)
        assert rules[-1] == rule
        assert json.loads((out / "plan.json").read_text())["extra"]["cfg_rule"] == rule
    sample.main(str(run_dir), str(tmp_path / "no-cfg"), **{**kw, "cfg": 1.0})
    assert "cfg_rule" not in json.loads((tmp_path / "no-cfg" / "plan.json").read_text())["extra"]


def _official_stats(tmp_path):
    """The releases' latents-stats file as REPA-E's save_vae_weights.py writes it: a dict of
    [1, C, 1, 1] tensors, latents_scale = 1 / std and latents_bias = mean."""
    stats = {"latents_scale": torch.tensor([0.8, 1.25, 0.5, 2.0]).view(1, 4, 1, 1),
             "latents_bias": torch.tensor([0.1, -0.2, 0.3, 0.0]).view(1, 4, 1, 1)}
    torch.save(stats, tmp_path / "sdvae-ft-mse-f8d4-latents-stats.pt")
    return tmp_path / "sdvae-ft-mse-f8d4-latents-stats.pt", stats


def test_latent_stats_files_decode_as_the_release_does(tmp_path):
    """ldm/generate.py@99ad4ac decodes vae.decode(samples / latents_scale + latents_bias): the
    same operations, bit for bit, from the .pt (weights_only), .npz and .json forms."""
    path, st = _official_stats(tmp_path)
    z = torch.randn(3, 4, 5, 5)
    want = z / st["latents_scale"] + st["latents_bias"]
    assert torch.equal(codec.LatentScaling.from_file(path).unscale(z), want)
    np.savez(tmp_path / "s.npz", **{k: v.numpy() for k, v in st.items()})
    assert torch.equal(codec.LatentScaling.from_file(tmp_path / "s.npz").unscale(z), want)
    (tmp_path / "s.json").write_text(json.dumps({k: v.flatten().tolist() for k, v in st.items()}))
    assert torch.equal(codec.LatentScaling.from_file(tmp_path / "s.json").unscale(z), want)
    # a file holding pickled code is refused, never unpickled
    torch.save({"latents_scale": Code(), "latents_bias": torch.zeros(4)}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="weights_only"):
        codec.LatentScaling.from_file(tmp_path / "evil.pt")
    torch.save({"scale": torch.ones(4)}, tmp_path / "other.pt")
    with pytest.raises(KeyError, match="latents_scale and latents_bias"):
        codec.LatentScaling.from_file(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="4 channels"):
        codec.LatentScaling.from_file(path).unscale(torch.zeros(1, 3, 2, 2))


class Code:
    pass


def _released_pt(tmp_path, name, projectors: dict, args=None):
    """A released-layout SiT-Tiny/2 .pt (timm x_embedder.proj, pos_embed) with the given projector keys."""
    from irepa.models import build as build_sit
    model = build_sit("SiT-Tiny/2", input_size=8, num_classes=10)
    sd = {("x_embedder.proj." + k[len("x_embedder."):] if k.startswith("x_embedder.") else k): v
          for k, v in model.state_dict().items()}
    sd["pos_embed"] = model.pos_embed.clone()
    obj = {"ema": {**sd, **projectors}, **({"args": args} if args else {})}
    torch.save(obj, tmp_path / name)
    return str(tmp_path / name)


def test_released_checkpoints_decode_with_their_release_latent_scaling(tmp_path):
    """A released iREPA checkpoint (ldm/train.py@99ad4ac always scales latents with
    sdvae-ft-mse-f8d4-latents-stats.pt) is refused without that file; REPA's layout keeps 0.18215;
    a checkpoint that shows neither needs the user's choice."""
    import argparse

    diffusers = pytest.importorskip("diffusers")
    sample = _load_launch("sample")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                                  down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    vae.save_pretrained(tmp_path / "vae")
    stats_path, st = _official_stats(tmp_path)
    conv = {"projectors.0.projection_layer.weight": torch.zeros(8, 64, 1, 1),
            "projectors.0.projection_layer.bias": torch.zeros(8)}
    repa = {f"projectors.0.{i}.{p}": torch.zeros(*((16, 64) if i == 0 else (16, 16) if i == 2 else (8, 16))[:1 if p
            == "bias" else 2]) for i in (0, 2, 4) for p in ("weight", "bias")}
    irepa_pt = _released_pt(tmp_path, "irepa.pt", conv)
    irepa_args_pt = _released_pt(tmp_path, "irepa-args.pt", {}, argparse.Namespace(projection_layer_type="mlp"))
    repa_pt = _released_pt(tmp_path, "repa.pt", repa)
    bare_pt = _released_pt(tmp_path, "bare.pt", {})
    z = torch.randn(2, 4, 4, 4)

    def decoder(pt, stats=None, scale=None):
        _, recipe, info = sample.load_model(pt, "ema", None, "cpu")
        return sample.build_decoder(recipe, info, 4, str(tmp_path / "vae"), stats, scale, "cpu")

    for pt in (irepa_pt, irepa_args_pt):
        for scale in (None, 0.18215):
            with pytest.raises(ValueError, match="pass --latent_stats sdvae-ft-mse-f8d4-latents-stats.pt"):
                decoder(pt, scale=scale)
        decode, desc = decoder(pt, str(stats_path))
        assert desc.endswith(f"stats:{stats_path}")
        # the reference runs the decoder's own VAE module: diffusers 0.42's loading and .to() leave it a
        # few ulp apart from the module saved above, and what is compared here is the latent scaling
        with torch.no_grad():
            want = ((decode.codec.vae.decode(z / st["latents_scale"] + st["latents_bias"]).sample + 1) / 2).clamp(0, 1)
        torch.testing.assert_close(decode(z), want, rtol=0, atol=0)
    assert decoder(repa_pt)[1].endswith("scale:0.18215")
    with pytest.raises(ValueError, match="does not show which release.*--latent_stats .*--latent_scale 0.18215"):
        decoder(bare_pt)
    assert decoder(bare_pt, scale=0.18215)[1].endswith("scale:0.18215")


def test_samples_are_quantized_as_the_recipes_release_writes_them(run_dir, tmp_path):
    """A SiT run's ADM batch truncates (iREPA ldm/generate.py@99ad4ac: clamp(255 x).to(uint8)),
    recorded in plan.json; --quantize round gives the nearest value from the same decoded
    images (same seeds), so every pixel is equal or one above."""
    from irepa.recipes import get
    assert (get("sit").sample_quantize, get("repae").sample_quantize) == ("truncate", "truncate")
    assert (get("jit").sample_quantize, get("meanflow").sample_quantize) == ("round", "round")
    sample = _load_launch("sample")
    kw = dict(n=4, batch=4, method="euler", steps=2, device="cpu")
    got = {}
    for q in ("auto", "round"):
        out = tmp_path / q
        sample.main(str(run_dir), str(out), quantize=q, **kw)
        assert json.loads((out / "plan.json").read_text())["quantize"] == ("truncate" if q == "auto" else q)
        with np.load(out / "samples.npz") as z:
            got[q] = z["arr_0"].astype(int)
    d = got["round"] - got["auto"]
    assert d.min() == 0 and d.max() == 1 and (d == 1).any()


def _one_line_error(argv, capsys, monkeypatch):
    """sample.py's user-facing result of `argv`: exit status 1 and its one stderr line."""
    from irepa.cli import run
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run(_load_launch("sample").main, "sample.py", [str(a) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and err.startswith("sample.py: "), err
    return err


def test_bad_settings_and_files_are_one_line_before_anything_is_written(run_dir, tmp_path, capsys, monkeypatch):
    """Each was a traceback (or, for a PNG as the model, six lines of torch.load's weights_only text)."""
    from PIL import Image
    out = tmp_path / "out"
    kw = ["--n", "2", "--device", "cpu"]
    ckpt = next((run_dir / "checkpoints").iterdir())
    Image.new("RGB", (4, 4)).save(tmp_path / "x.png")
    (tmp_path / "afile").write_text("mine")
    cases = [
        ([run_dir, out, "--method", "rk4"], "--method: expected one of 'sde', 'euler', 'heun', got 'rk4'"),
        ([run_dir, out, "--steps", "0"], "the sde sampler needs at least 2 steps, got 0"),
        ([run_dir, out, "--method", "euler", "--steps", "0"], "the euler sampler needs at least 1 step, got 0"),
        ([run_dir, out, "--interval", "0.9,0.1"], "CFG interval 0.9,0.1: expected LOW,HIGH in SiT time"),
        ([run_dir, out, "--interval", "0,1.5", "--cfg", "2"], "CFG interval 0.0,1.5: expected"),
        ([run_dir, out, "--interval", "-0.1,0.5"], "0 <= LOW <= HIGH <= 1"),
        ([run_dir, tmp_path / "afile"], f"OUT {tmp_path / 'afile'}: a text file, not a folder"),
        ([tmp_path / "x.png", out], f"{tmp_path / 'x.png'}: a PNG image, not a model; MODEL is a run folder"),
        ([run_dir / "config.json", out], "config.json: a JSON text file, not a model"),
        ([ckpt / "ema.safetensors", out], f"is one file of the checkpoint {ckpt}: pass that folder"),
        ([tmp_path / "gone", out], f"MODEL {tmp_path / 'gone'}: not found"),
        ([run_dir, out, "--quantize", "floor"], "--quantize: expected one of 'auto', 'round', 'truncate'"),
    ]
    for argv, message in cases:
        assert message in _one_line_error([*argv, *kw], capsys, monkeypatch)
    assert not out.exists() and (tmp_path / "afile").read_text() == "mine"


@pytest.fixture(scope="module")
def meanflow_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("mf-run")
    cfg = resolve("digits-meanflow-irepa", {"model.name": "SiT-Tiny/2", "model.input_size": 8,
                                            "model.align_depth": 1, "align.encoders": []})
    (run / "config.json").write_text(cfg.to_json())
    checkpoint.save(run, 1, offline_parts(cfg, encoder_dims=[]), trainer_state={}, rng={"cpu": torch.get_rng_state()})
    return run


def test_options_that_do_not_apply_to_the_run_are_refused(meanflow_run, run_dir, tmp_path, capsys, monkeypatch):
    """--model_name on a MeanFlow run used to exit 0, sampling the run's own SiT-T/2 as if it were not given;
    decoding options a run does not decode with were ignored the same way."""
    from irepa.recipes.jit import JiTRecipe
    from irepa.recipes.repae import RepaERecipe
    sample = _load_launch("sample")
    out = tmp_path / "out"
    err = _one_line_error([meanflow_run, out, "--model_name", "SiT-B/2", "--n", "2", "--method", "euler", "--steps",
                           "1", "--device", "cpu"], capsys, monkeypatch)
    assert "--model_name SiT-B/2: " in err and "holds a SiT-Tiny/2 model" in err and not out.exists()
    model, recipe, _ = sample.load_model(str(meanflow_run), "ema", "SiT-Tiny/2", "cpu")  # its own name: a no-op
    assert recipe.name == "meanflow" and model.in_channels == 1
    (tmp_path / "vae").mkdir()
    pixels = {"data": None, "builtin": None}
    with pytest.raises(InputError, match="--vae and --latent_scale do not apply: a jit model generates pixels"):
        sample.check_decoder_options(JiTRecipe(), pixels, str(tmp_path / "vae"), None, 0.18215)
    with pytest.raises(InputError, match="--latent_stats does not apply: a repae model decodes with its own"):
        sample.check_decoder_options(RepaERecipe(), pixels, str(tmp_path / "vae"), "stats.pt", None)
    sample.check_decoder_options(RepaERecipe(), pixels, str(tmp_path / "vae"), None, None)  # an export of its VAE
    # a digits run decodes with the digits codec: a VAE folder there is a contradiction, a missing one a typo
    err = _one_line_error([run_dir, out, "--vae", tmp_path / "vae", "--n", "2", "--method", "euler", "--steps", "1",
                           "--device", "cpu"], capsys, monkeypatch)
    assert "does not apply: this run's latents are the digits codec's" in err
    with pytest.raises(InputNotFound, match=f"--vae {tmp_path / 'nope'}: no such folder"):
        sample.check_decoder_options(SiTRecipe(), {"data": None, "builtin": None}, str(tmp_path / "nope"), None, None)


def test_a_moved_dataset_names_its_manifest(tmp_path):
    """The run's data folder is not on this machine: its manifest (VAE and latent statistics) is what is
    missing, not only the VAE."""
    sample = _load_launch("sample")
    info = {"data": str(tmp_path / "moved"), "builtin": None, "num_classes": 3}
    with pytest.raises(InputError, match=f"data manifest {tmp_path / 'moved' / 'manifest.json'} is not on this "
                                         f"machine.*--vae DIR and --latent_stats FILE"):
        sample.build_decoder(SiTRecipe(), info, 4, None, None, None, "cpu")


def test_progress_bar_and_shard_lines(tmp_path, capsys):
    """A bar on rank 0 only, drawn when stderr is a terminal (or asked); each shard's line carries the
    images done, the rate and the time left."""
    import io

    class Tty(io.StringIO):
        def isatty(self):
            return True
    assert gen.show_bar("auto", 0, Tty()) and not gen.show_bar("auto", 0, io.StringIO())
    assert not gen.show_bar("auto", 1, Tty()) and not gen.show_bar("bar", 1) and gen.show_bar("bar", 0)
    assert not gen.show_bar("off", 0, Tty())
    plan = gen.SamplePlan(num_samples=7, num_classes=2, shard_size=3, batch_size=2, latent_shape=(1, 2, 2))
    lines = []
    gen.generate_shards(plan, tmp_path / "a", lambda z, y, g: z.expand(-1, 3, -1, -1).clamp(0, 1), log=lines.append)
    assert len(lines) == 3 and lines[0].startswith("[rank 0] shard 0 of 3 done (3 images; 3/7 images of this rank, ")
    assert all("img/s" in m and " left)" in m for m in lines) and "7/7 images" in lines[-1]
    assert "img/s" not in capsys.readouterr().err  # no bar unless asked
    gen.generate_shards(plan, tmp_path / "b", lambda z, y, g: z.expand(-1, 3, -1, -1).clamp(0, 1),
                        log=lines.append, bar=True)
    captured = capsys.readouterr()
    assert "sample rank 0/1" in captured.err and "7/7" in captured.err and "img/s" in captured.err
    assert "shard 2 of 3 done" in captured.out  # written above the bar, not into it
