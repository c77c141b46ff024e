import pytest
import torch

from irepa import models
from irepa.transport import interpolate, score_from_velocity, velocity_target


@pytest.mark.parametrize("name,millions", [("SiT-B/2", 130), ("SiT-L/2", 458), ("SiT-XL/2", 675), ("SiT-S/2", 33)])
def test_published_parameter_counts(name, millions):
    with torch.device("meta"):
        m = models.build(name, input_size=32, in_channels=4, num_classes=1000)
    assert round(models.count_params(m) / 1e6) == millions
    assert m.num_tokens == 256


def test_default_alignment_depths():
    with torch.device("meta"):
        assert models.build("SiT-B/2").align_depth == 4
        assert models.build("SiT-XL/2").align_depth == 8


def test_forward_shapes_hidden_and_zero_init():
    m = models.build("SiT-Tiny/2", input_size=8, in_channels=4, num_classes=10, align_depth=1)
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.randint(0, 10, (3,))
    out, hidden = m(x, t, y)
    assert out.shape == x.shape and hidden.shape == (3, 16, 64)
    assert torch.count_nonzero(out) == 0  # adaLN-Zero + zero final layer
    with pytest.raises(ValueError, match="expects inputs"):
        m(torch.randn(3, 4, 9, 9), t, y)


def test_hidden_is_output_of_align_depth_block():
    m = models.build("SiT-Tiny/2", input_size=8, in_channels=4, num_classes=10, align_depth=1)
    for p in m.parameters():  # break the zero init so blocks act
        torch.nn.init.normal_(p, std=0.05)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.randint(0, 10, (2,))
    _, hidden = m(x, t, y)
    h0 = m.x_embedder(x).flatten(2).transpose(1, 2) + m.pos_embed
    c = m.t_embedder(t) + m.y_embedder(y)
    assert torch.allclose(hidden, m.blocks[0](h0, c), atol=1e-6)


def test_label_dropout_uses_null_class():
    m = models.build("SiT-Tiny/2", input_size=8, in_channels=4, num_classes=10)
    y = torch.tensor([1, 2])
    emb = m.y_embedder(y, drop_mask=torch.tensor([True, False]))
    assert torch.equal(emb[0], m.y_embedder.embedding_table.weight[10])
    assert torch.equal(emb[1], m.y_embedder.embedding_table.weight[2])


def test_sdpa_backend_matches_naive_attention():
    from irepa.models.attention import attention
    q, k, v = (torch.randn(2, 3, 10, 8, dtype=torch.float64) for _ in range(3))
    ref = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, -1) @ v
    assert torch.allclose(attention(q, k, v, "sdpa"), ref, atol=1e-10)
    with pytest.raises(ValueError, match="unknown attention backend"):
        models.build("SiT-Tiny/2", input_size=8, attn_backend="nope")


def test_transport_path_and_score():
    x, e, t = torch.randn(4, 2), torch.randn(4, 2), torch.rand(4)
    xt = interpolate(x, e, t)
    assert torch.allclose(xt, (1 - t[:, None]) * x + t[:, None] * e)
    v = velocity_target(x, e)
    # for the exact velocity, the score of the Gaussian-noise path is -e / t
    assert torch.allclose(score_from_velocity(v, xt, t), -e / t[:, None], atol=1e-5)


@pytest.mark.parametrize("name,size", [("SiT-Tiny/2", 8), ("JiT-Tiny/4", 16)])
def test_null_class_and_out_of_range_labels_are_named(name, size):
    # a model trained without label dropout has no null row: CFG on it must say so, not
    # fail inside nn.Embedding with "index out of range in self"
    from irepa import recipes
    from irepa.sampling import sample

    ch = 4 if name.startswith("SiT") else 3
    x, t = torch.randn(2, ch, size, size), torch.rand(2)
    with_null = models.build(name, input_size=size, in_channels=ch, num_classes=3)
    no_null = models.build(name, input_size=size, in_channels=ch, num_classes=3, class_dropout_prob=0.0)
    assert with_null.null_class == 3 and no_null.null_class is None
    with_null(x, t, torch.tensor([0, 3]))  # the null class is a valid label
    with pytest.raises(ValueError, match=r"class label 3 is out of range: .*classes 0\.\.2 \(no null class"):
        no_null(x, t, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"class label 4 is out of range: .*\(3 is the null class\)"):
        with_null(x, t, torch.tensor([4, 0]))
    with pytest.raises(ValueError, match="class label -1"):
        with_null(x, t, torch.tensor([-1, 0]))
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True):  # the micro-batch planner's forward reads no values
        out, _ = with_null(torch.empty(2, ch, size, size), torch.empty(2), torch.zeros(2, dtype=torch.long))
    assert out.shape == x.shape
    vfn = recipes.get("jit" if name.startswith("JiT") else "sit")().velocity_fn(no_null)
    with pytest.raises(ValueError, match="cfg != 1 needs null_class"):
        sample(vfn, x, torch.tensor([0, 1]), "heun", 2, cfg=2.0, null_class=no_null.null_class)

