"""JiT: sizes and parameter counts, RoPE, in-context tokens, the JiT recipe's x-prediction objective
and sampler adapter (irepa.recipes.jit), and a tiny JiT that learns the embedded digits."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from irepa.models import build, count_params, names
from irepa.models.jit import JIT_SIZES, apply_rope, rope_2d_angles
from irepa.recipes import presets, resolve
from irepa.recipes.jit import JiTRecipe
from irepa.sampling import sample


def jit_velocity_fn(model):
    return JiTRecipe().velocity_fn(model)


@pytest.fixture(autouse=True)
def _one_thread():
    # these are many tiny ops: intra-op threads only add spin-waits on a shared 2-core box
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny(**kw):
    """JiT-Tiny/4 on 16 px with 8 in-context tokens from block 2 and non-zero weights everywhere."""
    kw = {"input_size": 16, "num_classes": 10, "in_context_len": 8, "attn_backend": "sdpa", **kw}
    model = build("JiT-Tiny/4", **kw)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # adaLN-Zero and the zero head would hide every path
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


# ---------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("name,millions,gmacs", [
    ("JiT-B/16", 131, 25), ("JiT-L/16", 459, 88), ("JiT-H/16", 953, 182)])
def test_published_sizes_on_meta(name, millions, gmacs):
    # parameters as the JiT paper lists them; GMACs at 256 px from its table (1 MAC = 2 FLOPs)
    with torch.device("meta"):
        model = build(name)
    assert round(count_params(model) / 1e6) == millions
    assert model.forward_flops() / 2e9 == pytest.approx(gmacs, rel=0.02)
    x = torch.empty(2, 3, 256, 256, device="meta")
    out, hidden = model(x, torch.empty(2, device="meta"), torch.zeros(2, dtype=torch.long, device="meta"))
    assert out.shape == (2, 3, 256, 256)
    assert hidden.shape == (2, 256, JIT_SIZES[name].dim)


def test_registry_and_defaults():
    assert {"JiT-B/16", "JiT-L/16", "JiT-H/16", "JiT-T/4"} <= set(names())
    with torch.device("meta"):
        assert [build(n).align_depth for n in ("JiT-B/16", "JiT-L/16", "JiT-H/16")] == [4, 8, 8]
        assert [build(n).in_context_start for n in ("JiT-B/16", "JiT-L/16", "JiT-H/16")] == [4, 8, 10]
        assert build("JiT-B/16", align_depth=None).align_depth == 4  # None = the size's default
        assert build("JiT-B/16", align_depth=6).align_depth == 6
    with pytest.raises(ValueError, match="unknown JiT"):
        build("JiT-Q/16")
    with pytest.raises(ValueError, match="align_depth"):
        build("JiT-Tiny/4", input_size=16, align_depth=3)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        build("JiT-Tiny/4", input_size=18)


def test_shapes_tiny_and_bad_input():
    model = build("JiT-T/4", input_size=32, num_classes=10)
    x = torch.randn(3, 3, 32, 32)
    out, hidden = model(x, torch.rand(3), torch.tensor([0, 5, 9]))
    assert out.shape == x.shape and hidden.shape == (3, 64, 128)
    assert torch.all(out == 0)  # zero-initialized head
    with pytest.raises(ValueError, match="JiT expects inputs"):
        model(torch.randn(3, 1, 32, 32), torch.rand(3), torch.tensor([0, 5, 9]))
    with pytest.raises(TypeError, match="fused_kernels"):  # no fused JiT kernel: the flag is not silently taken
        build("JiT-T/4", input_size=32, fused_kernels=True)


def test_buffers_survive_meta_then_to_empty():
    ref = build("JiT-Tiny/4", input_size=16)
    with torch.device("meta"):
        model = build("JiT-Tiny/4", input_size=16)
    model.to_empty(device="cpu")
    model.initialize_weights()
    for name in ("pos_embed", "rope_cos", "rope_sin", "rope_cos_ctx", "rope_sin_ctx"):
        torch.testing.assert_close(getattr(model, name), getattr(ref, name))


# ---------------------------------------------------------------------------- RoPE


def test_rope_scores_depend_only_on_the_offset():
    head_dim, grid = 16, 5
    ang = rope_2d_angles(head_dim, grid)
    cos, sin = ang.cos().float(), ang.sin().float()
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, head_dim, generator=g, dtype=torch.float64).float()
    T = grid * grid
    qr = apply_rope(q.expand(1, 1, T, head_dim), cos, sin)[0, 0]
    kr = apply_rope(k.expand(1, 1, T, head_dim), cos, sin)[0, 0]
    scores = qr @ kr.T  # scores[a, b] = q at position a . k at position b
    by_offset: dict[tuple[int, int], list[float]] = {}
    for a, b in itertools.product(range(T), repeat=2):
        off = (b // grid - a // grid, b % grid - a % grid)
        by_offset.setdefault(off, []).append(scores[a, b].item())
    spread = max(max(v) - min(v) for v in by_offset.values())
    assert spread < 1e-4
    means = torch.tensor([sum(v) / len(v) for v in by_offset.values()])
    assert means.std() > 0.1  # and the offset does matter
    # the norm is kept, and zero offset gives the plain dot product
    torch.testing.assert_close(qr.norm(dim=-1), q.norm().expand(T), rtol=1e-5, atol=1e-5)
    assert by_offset[(0, 0)][0] == pytest.approx((q @ k).item(), abs=1e-4)


def test_rope_rows_then_columns_and_prefix_is_identity():
    ang = rope_2d_angles(8, 3, num_prefix=2)
    assert ang.shape == (2 + 9, 8)
    assert torch.all(ang[:2] == 0)  # in-context tokens: no rotation
    patch = ang[2:].view(3, 3, 8)
    assert torch.all(patch[:, :, :4] == patch[:, :1, :4])  # first half: row only
    assert torch.all(patch[:, :, 4:] == patch[:1, :, 4:])  # second half: column only
    assert torch.all(patch[..., 0::2] == patch[..., 1::2])  # channel pairs share an angle


# ---------------------------------------------------------------------------- in-context tokens


def test_in_context_tokens_are_class_tokens_and_removed_from_hidden():
    model = _tiny()
    k, L = model.in_context_start, model.in_context_len
    assert model.align_depth > k  # hidden comes from a block that sees the class tokens
    x, t, y = torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([3, 7])
    seen = {}

    def grab(module, args):
        seen["h"] = args[0]

    hook = model.blocks[k].register_forward_pre_hook(grab)
    out, hidden = model(x, t, y)
    hook.remove()
    assert hidden.shape == (2, model.num_tokens, model.dim)
    assert seen["h"].shape == (2, L + model.num_tokens, model.dim)
    expected = model.y_embedder(y).unsqueeze(1) + model.in_context_posemb
    torch.testing.assert_close(seen["h"][:, :L], expected)
    # the class tokens change the patch tokens from block k+1 on, and only from there
    with torch.no_grad():
        model.in_context_posemb.add_(1.0)
    out2, hidden2 = model(x, t, y)
    assert (out2 - out).abs().max() > 1e-4 and (hidden2 - hidden).abs().max() > 1e-4
    model.align_depth = k  # the last block before the tokens join
    h_a = model(x, t, y)[1]
    with torch.no_grad():
        model.in_context_posemb.sub_(1.0)
    torch.testing.assert_close(model(x, t, y)[1], h_a)


def test_drop_mask_selects_the_null_class_everywhere():
    model = _tiny()
    x, t, y = torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([3, 7])
    dropped = model(x, t, y, drop_mask=torch.tensor([True, False]))[0]
    null = model(x, t, torch.tensor([10, 7]))[0]
    torch.testing.assert_close(dropped, null)
    assert (dropped[0] - model(x, t, y)[0][0]).abs().max() > 1e-4


# ---------------------------------------------------------------------------- objective


def test_loss_matches_the_direct_formula():
    """The recipe's draw and loss against the formula written out, with the draws in their order:
    label dropout, then t, then the noise (irepa.recipes.base)."""
    model = _tiny()
    recipe = JiTRecipe(resolve("digits-jit-irepa", {"model.class_dropout_prob": 0.4}))
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    batch = {"x": x, "y": torch.tensor([1, 2, 3, 4])}
    draws = recipe.draw(batch, torch.Generator().manual_seed(5))
    out = recipe.loss(model, batch, draws)
    loss, hidden, y = out.denoise, out.hidden, batch["y"]
    g = torch.Generator().manual_seed(5)
    drop = torch.rand(4, generator=g) < 0.4
    assert torch.equal(draws["drop"], drop)
    t = torch.sigmoid(-0.8 + 0.8 * torch.randn(4, generator=g))
    e = torch.randn(x.shape, generator=g)
    tb = t.view(-1, 1, 1, 1)
    z = tb * x + (1 - tb) * e
    x_hat, h_ref = model(z, t, y, drop)
    w = (1 - tb).clamp_min(0.05)
    ref = (((x - z) / w - (x_hat - z) / w) ** 2).mean()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(hidden, h_ref)
    # the clamp: as t -> 1 the loss is the x-error over 0.05^2, not over (1-t)^2
    recipe.P_MEAN, recipe.P_STD = 12.0, 1e-3  # t = sigmoid(12) ~ 1 - 6e-6
    l_near = recipe.loss(model, batch, recipe.draw(batch, torch.Generator().manual_seed(0))).denoise
    assert math.isfinite(l_near.item()) and l_near.item() < 1e4


def test_presets_have_the_published_recipe():
    table = presets()
    for size in ("b16", "l16", "h16"):
        for kind in ("repa", "irepa"):
            p = table[f"jit-{size}-{kind}"]
            assert p["optim"]["betas"] == (0.9, 0.95) and p["optim"]["grad_clip"] is None
            assert p["optim"]["lr"] == 5e-5 and p["optim"]["scale_lr_with_batch"]
            assert p["optim"]["warmup_epochs"] == 5 and p["optim"].get("warmup_steps", 0) == 0
            assert p["train"]["ema_decays"] == [0.9999, 0.9996] and p["train"]["recipe"] == "jit"
            assert p["align"]["weight"] == 0.5
        assert table[f"jit-{size}-irepa"]["align"]["gamma"] == 0.8
        assert table[f"jit-{size}-repa"]["align"]["gamma"] is None


# ---------------------------------------------------------------------------- sampling


def _jit_heun_reference(model, z, y, steps, cfg, t_eps=0.05):
    """JiT's own sampler written in JiT time: Heun on linspace(0, 1), Euler last step, CFG on v."""
    def v(z, s):
        ss = torch.full((z.shape[0],), s)
        x_c = model(z, ss, y)[0]
        x_u = model(z, ss, torch.full_like(y, model.num_classes))[0]
        d = max(1 - s, t_eps)
        return (x_u - z) / d + cfg * ((x_c - z) / d - (x_u - z) / d)

    ts = torch.linspace(0, 1, steps + 1, dtype=torch.float64).tolist()
    for i, (s, s_next) in enumerate(zip(ts[:-1], ts[1:])):
        d = v(z, s)
        z_euler = z + (s_next - s) * d
        z = z_euler if i == steps - 1 else z + (s_next - s) * 0.5 * (d + v(z_euler, s_next))
    return z


def test_sampler_adapter_reproduces_jit_heun():
    model = _tiny().double()
    noise = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([2, 6])
    ours = sample(jit_velocity_fn(model), noise, y, method="heun", steps=6, cfg=1.5, null_class=10)
    ref = _jit_heun_reference(model, noise.clone(), y, steps=6, cfg=1.5)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)  # t reaches the model as float32


def test_velocity_fn_calls_the_model_at_jit_time_with_the_clamp():
    calls = []

    def fake(z, s, y):
        calls.append(s.clone())
        return torch.zeros_like(z), None

    vel = jit_velocity_fn(fake)
    x = torch.ones(2, 1, 2, 2)
    v = vel(x, torch.tensor([0.5, 0.01]), None)
    torch.testing.assert_close(calls[0], torch.tensor([0.5, 0.99]))
    torch.testing.assert_close(v[:, 0, 0, 0], torch.tensor([1 / 0.5, 1 / 0.05]))


# ---------------------------------------------------------------------------- training


def test_tiny_jit_learns_digits():
    from irepa.data.digits import load_digits_images

    torch.manual_seed(0)
    images, labels = load_digits_images(16)
    x_all = images * 2 - 1
    model = build("JiT-Tiny/4", input_size=16, num_classes=10, in_context_len=8, attn_backend="sdpa")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.0)
    recipe = JiTRecipe(resolve("digits-jit-irepa"))
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        idx = torch.randint(0, x_all.shape[0], (32,), generator=g)
        batch = {"x": x_all[idx], "y": labels[idx]}
        out = recipe.loss(model, batch, recipe.draw(batch, g))
        loss, hidden = out.denoise, out.hidden
        assert hidden.shape == (32, 16, 64)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:6]) / 6, sum(losses[-6:]) / 6
    assert last < 0.6 * first, losses
