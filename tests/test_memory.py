"""The micro-batch planner: saved-bytes counting on fake tensors, the linear fit, the choice, the trainer's use."""
import pytest
import torch
import torch.nn as nn

from irepa.train import memory


def test_saved_bytes_counts_each_storage_once():
    with torch._subclasses.fake_tensor.FakeTensorMode():
        a = torch.randn(64, 32, requires_grad=True)
        b = torch.randn(64, 32, requires_grad=True)
        # a * b saves a and b; (a * b) * b saves the product and b again (same storage: counted once)
        n = memory.saved_bytes(lambda: (a * b) * b)
    assert n == 3 * 64 * 32 * 4


def test_linear_fit_separates_weights_from_activations():
    """fp32 Linear stack: per sample the inputs of both Linears and the ReLU output; fixed: the weights."""
    net = nn.Sequential(nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 8))

    def make(n):
        return (torch.randn(n, 16, requires_grad=True),)

    fixed, per = memory.measure_activations(lambda x: net(x), make, sizes=(2, 5))
    assert per == (16 + 48) * 4  # x (for W1's grad) and the ReLU output (for W2's grad and ReLU's)
    assert fixed == (16 * 48 + 48 * 8) * 4  # weights saved for the input gradients
    assert all(p.device.type == "cpu" and not isinstance(p, torch._subclasses.FakeTensor) for p in net.parameters())


def test_choose_micro_batch():
    assert memory.choose_micro_batch(256, 100, 0, 0, None) == 256  # no limit known
    assert memory.choose_micro_batch(256, 100, 50, 1000, 1000 + 50 + 256 * 100) == 256
    assert memory.choose_micro_batch(256, 100, 50, 1000, 1000 + 50 + 255 * 100) == 128
    assert memory.choose_micro_batch(96, 100, 0, 0, 100 * 40) == 32  # divisors of 96 only
    with pytest.raises(MemoryError, match="activation_checkpointing"):
        memory.choose_micro_batch(256, 100, 0, 1000, 1050)


def test_sit_xl_at_batch_256_needs_two_micro_batches_on_an_80gb_card():
    """The case that motivated the planner, on fake tensors (no memory used): eager saved bytes of
    SiT-XL/2 + iREPA at 256 px under bf16 autocast exceed an H100's 80 GB."""
    from irepa import models
    from irepa.align import AlignmentHead, alignment_loss
    from irepa.recipes import resolve
    from irepa.recipes.sit import SiTRecipe
    from irepa.train.build import AlignedDiffusion
    recipe = SiTRecipe(resolve("sit-xl2-irepa"))
    with torch._subclasses.fake_tensor.FakeTensorMode():
        m = models.build("SiT-XL/2", input_size=32, in_channels=4, num_classes=1000)
        net = AlignedDiffusion(m, AlignmentHead(m.dim, [768], "conv", 0.6, 2048, alignment_loss), recipe)

        def forward(batch, f):
            with torch.autocast("cpu", torch.bfloat16):
                net(batch, recipe.draw(batch, None), f)

        def make(n):
            return ({"x": torch.randn(n, 4, 32, 32), "y": torch.zeros(n, dtype=torch.long)},
                    [torch.randn(n, 256, 768, dtype=torch.bfloat16)])

        fixed, per = memory.measure_activations(forward, make)
    assert 80 * 2**30 < 256 * per < 110 * 2**30  # ~96 GiB
    params = sum(p.numel() for p in net.parameters())
    assert fixed == pytest.approx(2 * params, rel=0.05)  # the bf16 weight copies autocast keeps
    static = params * 4 * (1 + 1 + 2 + 1)  # weights, grads, AdamW moments, one EMA
    assert memory.choose_micro_batch(256, per, fixed, static, int(0.9 * 79.1 * 2**30)) == 128
