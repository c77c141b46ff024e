"""A reference-layout SiT + REPA/iREPA checkpoint loads into our SiT and computes the same thing.

The reference model below is written from the reference architecture's description
(timm PatchEmbed, fused-qkv attention, adaLN-Zero, DiT sin-cos table, REPA projectors, and
the iREPA release's ProjectionLayer of ldm/models/sit.py@99ad4ac: `projection_layer` holding
build_mlp's Sequential or a Conv2d of --proj-kwargs-kernel-size, default 1 in ldm/train.py)
with the reference key names; it shares no code with irepa.models.
"""
import argparse
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from irepa.models.convert import load_reference_checkpoint, reference_head, unwrap_state_dict


def dit_pos_embed(dim, grid):
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], 1)
    g = np.stack(np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32)), 0)
    return np.concatenate([one_d(dim // 2, g[0]), one_d(dim // 2, g[1])], 1)


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    def __init__(self, c, d, p):
        super().__init__()
        self.proj = nn.Conv2d(c, d, p, p)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class RefAttention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-2, -1) / math.sqrt(C // self.heads)).softmax(-1)
        return self.proj((a @ v).transpose(1, 2).reshape(B, N, C))


class RefMlp(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x), approximate="tanh"))


class RefBlock(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = RefAttention(d, heads)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = RefMlp(d)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x, c):
        s1, sc1, g1, s2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g1.unsqueeze(1) * self.attn(modulate(self.norm1(x), s1, sc1))
        return x + g2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), s2, sc2))


class RefFinal(nn.Module):
    def __init__(self, d, p, c):
        super().__init__()
        self.norm_final = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(d, p * p * c)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class RefTimestep(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(256, d), nn.SiLU(), nn.Linear(d, d))

    def forward(self, t):
        freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
        args = t[:, None].float() * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], -1).to(self.mlp[0].weight.dtype))


class RefLabel(nn.Module):
    def __init__(self, n, d):
        super().__init__()
        self.embedding_table = nn.Embedding(n + 1, d)

    def forward(self, y):
        return self.embedding_table(y)


def ref_mlp(d, hidden, z_dim):
    return nn.Sequential(nn.Linear(d, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, z_dim))


class RefProjectionLayer(nn.Module):
    """The iREPA release's projector: [B, T, D] -> [B, T, E] through `projection_layer`."""

    def __init__(self, kind, d, hidden, z_dim, kernel_size):
        super().__init__()
        self.kind = kind
        self.projection_layer = (ref_mlp(d, hidden, z_dim) if kind == "mlp" else
                                 nn.Conv2d(d, z_dim, kernel_size, stride=1, padding=kernel_size // 2))

    def forward(self, x):
        B, T, D = x.shape
        if self.kind == "mlp":
            return self.projection_layer(x.reshape(B * T, D)).reshape(B, T, -1)
        g = math.isqrt(T)
        y = self.projection_layer(x.reshape(B, g, g, D).permute(0, 3, 1, 2))
        return y.permute(0, 2, 3, 1).reshape(B, T, -1)


class RefSiT(nn.Module):
    """projector: "mlp" / "conv" (REPA-style bare modules, projectors.K.{0,2,4} / projectors.K.weight)
    or "irepa-mlp" / "irepa-conv" (ProjectionLayer, projectors.K.projection_layer.*)."""

    def __init__(self, size=8, p=2, c=4, d=64, depth=2, heads=2, classes=10, learn_sigma=False,
                 encoder_depth=1, z_dim=24, projector="mlp", kernel_size=3, z_dims=None):
        super().__init__()
        self.p, self.out_c, self.encoder_depth = p, 2 * c if learn_sigma else c, encoder_depth
        self.x_embedder = PatchEmbed(c, d, p)
        self.t_embedder = RefTimestep(d)
        self.y_embedder = RefLabel(classes, d)
        grid = size // p
        self.pos_embed = nn.Parameter(torch.from_numpy(dit_pos_embed(d, grid)).float()[None], requires_grad=False)
        self.blocks = nn.ModuleList(RefBlock(d, heads) for _ in range(depth))
        z_dims = z_dims or [z_dim]
        if projector == "mlp":
            self.projectors = nn.ModuleList([ref_mlp(d, 32, z) for z in z_dims])
        elif projector == "conv":
            self.projectors = nn.ModuleList([nn.Conv2d(d, z, 3, padding=1) for z in z_dims])
        else:
            self.projectors = nn.ModuleList(RefProjectionLayer(projector[len("irepa-"):], d, 32, z, kernel_size)
                                            for z in z_dims)
        self.projector = projector
        self.final_layer = RefFinal(d, p, self.out_c)

    def forward(self, x, t, y):
        x = self.x_embedder(x) + self.pos_embed
        N, T, D = x.shape
        c = self.t_embedder(t) + self.y_embedder(y)
        zs = None
        for i, blk in enumerate(self.blocks):
            x = blk(x, c)
            if i + 1 == self.encoder_depth:
                if self.projector == "mlp":
                    zs = [pr(x.reshape(-1, D)).reshape(N, T, -1) for pr in self.projectors]
                elif self.projector.startswith("irepa-"):
                    zs = [pr(x) for pr in self.projectors]
                else:
                    g = int(T ** 0.5)
                    grid_x = x.transpose(1, 2).reshape(N, D, g, g)
                    zs = [pr(grid_x).flatten(2).transpose(1, 2) for pr in self.projectors]
        x = self.final_layer(x, c)
        h = int(T ** 0.5)
        x = x.reshape(N, h, h, self.p, self.p, self.out_c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(N, self.out_c, h * self.p, h * self.p), zs


@pytest.mark.parametrize("projector,kernel_size,learn_sigma,release", [
    ("mlp", 3, False, "repa"), ("conv", 3, True, "irepa"),
    # the iREPA release's layouts: an MLP head (its REPA runs), and conv heads of the LDM
    # trainer's default kernel 1 and of the paper's 3
    ("irepa-mlp", 1, False, "irepa"), ("irepa-conv", 1, False, "irepa"), ("irepa-conv", 3, True, "irepa")])
def test_reference_checkpoint_matches_reference_math(tmp_path, projector, kernel_size, learn_sigma, release):
    """Converted model and head compute what the reference-layout model computed: the same
    output and the same projected tokens, per projector (two encoders of different dims)."""
    torch.manual_seed(0)
    ref = RefSiT(learn_sigma=learn_sigma, projector=projector, kernel_size=kernel_size, z_dims=[24, 40]).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name != "pos_embed":
                p.normal_(0, 0.2)
    ckpt = {"ema": ref.state_dict(), "model": {k: v + 1 for k, v in ref.state_dict().items()},
            "args": argparse.Namespace(lr=1e-4), "steps": 4}
    torch.save(ckpt, tmp_path / "ref.pt")

    model, head_sd, info = load_reference_checkpoint(tmp_path / "ref.pt", which="ema")
    assert info["name"] == "SiT-Tiny/2" and info["input_size"] == 8 and info["num_classes"] == 10
    assert info["learn_sigma"] == learn_sigma
    assert model.align_depth == 1  # SiT-Tiny/2's default, as the reference's encoder_depth here
    kind = projector.split("-")[-1]
    assert info["head"] == {"projector": kind, "encoder_dims": [24, 40], "hidden_dim": 32 if kind == "mlp" else 2048,
                            "kernel_size": kernel_size if kind == "conv" else 3}
    assert info["release"] == release
    head = reference_head(head_sd, info["head"], info["dim"])

    x, t, y = torch.randn(3, 4, 8, 8, dtype=torch.float64), torch.rand(3), torch.tensor([0, 9, 10])  # 10: null
    ref, model, head = ref.double(), model.double(), head.double()  # float64: compare the math, not rounding
    with torch.no_grad():
        want, zs = ref(x, t, y)
        got, hidden = model(x, t, y)
        z = [p(hidden) for p in head.projectors]
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    for a, b in zip(z, zs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_release_kind_and_head_errors(tmp_path):
    """The release is read off the keys or the training args (ldm/train.py@99ad4ac's own flags
    mark the iREPA code); a head we cannot build is a clear error unless head=False."""
    from irepa.models.convert import release_kind
    sd = RefSiT(projector="irepa-mlp").state_dict()
    bare = {k: v for k, v in sd.items() if not k.startswith("projectors.")}
    assert release_kind(bare) is None
    assert release_kind(bare, {"projection_layer_type": "mlp"}) == "irepa"
    assert release_kind(bare, {"enc_type": "dinov2-vit-b", "proj_coeff": 0.5}) == "repa"
    _, head_sd, info = load_reference_checkpoint(_save(tmp_path / "bare.pt", {"ema": bare}))
    assert head_sd == {} and info["head"] is None and info["release"] is None

    linear = {**bare, "projectors.0.projection_layer.weight": torch.zeros(24, 64),
              "projectors.0.projection_layer.bias": torch.zeros(24)}  # the release's 'linear' projector
    path = _save(tmp_path / "linear.pt", {"ema": linear})
    with pytest.raises(ValueError, match="projectors.0.projection_layer.weight: projector layout not recognised"):
        load_reference_checkpoint(path)
    _, head_sd, info = load_reference_checkpoint(path, head=False)
    assert head_sd == {} and info["head"] is None and info["release"] == "irepa"


def _save(path, obj):
    torch.save(obj, path)
    return path


class Code:
    pass


def test_unwrap_and_errors(tmp_path):
    sd = {"module.a": torch.zeros(1), "module.b": torch.ones(1)}
    assert set(unwrap_state_dict(sd)) == {"a", "b"}
    with pytest.raises(KeyError, match="no 'ema' entry"):
        unwrap_state_dict({"model": sd, "opt": {"x": 1}})
    with pytest.raises(FileNotFoundError):
        load_reference_checkpoint(tmp_path / "missing.pt")
    # a pickled object that is not plain data is refused, never unpickled
    torch.save({"ema": Code()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="weights_only"):
        load_reference_checkpoint(tmp_path / "evil.pt")
