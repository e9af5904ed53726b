"""Weak/strong augmentations: hand-checked ops, shapes, ranges, determinism."""

import torch

from fedctx.adamatch import augment as G


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_random_shift_is_a_crop_of_the_padded_image():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float).reshape(2, 1, 4, 4)
    assert torch.equal(G.random_shift(x, 0, _gen()), x)
    out = G.random_shift(x, 1, _gen())
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    for n in range(2):
        crops = [padded[n, :, dy:dy + 4, dx:dx + 4] for dy in range(3) for dx in range(3)]
        assert any(torch.equal(out[n], c) for c in crops)
    # exactly the window at the offsets drawn (rows, then columns): runs recorded before any
    # change of its implementation draw and crop the same
    x = torch.rand(64, 3, 9, 7)
    gen = _gen(5)
    dy, dx = (torch.randint(0, 7, (64,), generator=gen) for _ in range(2))
    padded = torch.nn.functional.pad(x, (3, 3, 3, 3), mode="reflect")
    want = torch.stack([padded[n, :, dy[n]:dy[n] + 9, dx[n]:dx[n] + 7] for n in range(64)])
    assert torch.equal(G.random_shift(x, 3, _gen(5)), want)


def test_weak_augment_flips_only_when_asked():
    x = torch.rand(64, 3, 8, 8)
    assert torch.equal(G.weak_augment(x, _gen(), pad=0, flip=False), x)
    flipped = G.weak_augment(x, _gen(), pad=0, flip=True)
    is_flip = [torch.equal(flipped[i], x[i].flip(-1)) for i in range(64)]
    is_same = [torch.equal(flipped[i], x[i]) for i in range(64)]
    assert all(a or b for a, b in zip(is_flip, is_same, strict=True))
    assert 10 < sum(is_flip) < 54


def test_pixel_ops_hand_examples():
    x = torch.tensor([0.25, 0.75, 0.5, 0.5]).reshape(1, 1, 2, 2)
    m = torch.tensor([0.5])
    assert torch.allclose(G.op_autocontrast(x, m, _gen()).flatten(),
                          torch.tensor([0.0, 1.0, 0.5, 0.5]))
    # threshold 1 - 0.5: pixels >= 0.5 are inverted
    assert torch.allclose(G.op_solarize(x, m, _gen()).flatten(),
                          torch.tensor([0.25, 0.25, 0.5, 0.5]))
    # m = 1 keeps 4 bits: floor(0.5 * 255 / 16) * 16 / 255 = 112 / 255
    post = G.op_posterize(torch.full((1, 1, 1, 1), 0.5), torch.tensor([1.0]), _gen())
    assert torch.allclose(post, torch.full((1, 1, 1, 1), 112 / 255))
    two_levels = torch.tensor([0.2, 0.2, 0.4, 0.4]).reshape(1, 1, 2, 2)
    assert torch.allclose(G.op_equalize(two_levels, m, _gen()).flatten(),
                          torch.tensor([0.0, 0.0, 1.0, 1.0]))
    assert torch.allclose(G.op_rotate(x, torch.tensor([0.0]), _gen()), x, atol=1e-6)


def test_cutout_fills_one_square():
    x = torch.zeros(16, 1, 10, 10)
    out = G.cutout(x, 4, _gen(), fill=1.0)
    filled = out.sum(dim=(1, 2, 3))
    assert (filled <= 16).all() and (filled >= 4).all()  # clipped at most to a 2x2 corner


def test_strong_augment_shape_range_determinism():
    x = torch.rand(32, 3, 28, 28)
    a = G.strong_augment(x, _gen(1))
    b = G.strong_augment(x, _gen(1))
    assert a.shape == x.shape and torch.equal(a, b)
    assert a.min() >= 0.0 and a.max() <= 1.0
    assert not torch.allclose(a, x)


def test_every_randaugment_op_keeps_shape_and_range():
    x = torch.rand(5, 3, 12, 12)
    m = torch.rand(5)
    for op in G.RANDAUGMENT_OPS:
        y = op(x, m, _gen())
        assert y.shape == x.shape, op.__name__
        assert y.min() >= -1e-6 and y.max() <= 1 + 1e-6, op.__name__
