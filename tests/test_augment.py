import pytest
import torch

from facenets import augment


def batch(b=6, c=1, h=48, w=40, seed=0):
    return torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(seed))


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


RANDOM = {
    "affine": lambda x, g: augment.random_affine(x, 30, 0.2, 0.2, 0.1, generator=g),
    "hflip": lambda x, g: augment.random_hflip(x, generator=g),
    "cutout": lambda x, g: augment.cutout(x, 8, generator=g),
    "erasing": lambda x, g: augment.random_erasing(x, p=1.0, generator=g),
    "mixup": lambda x, g: augment.mixup(x, torch.arange(len(x)), generator=g)[0],
    "cutmix": lambda x, g: augment.cutmix(x, torch.arange(len(x)), generator=g)[0],
}


@pytest.mark.parametrize("name", RANDOM)
def test_shape_dtype_device_kept_and_seed_repeats(name):
    x = batch(c=3)
    out = RANDOM[name](x, gen(1))
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert torch.equal(out, RANDOM[name](x, gen(1)))
    assert not torch.equal(out, RANDOM[name](x, gen(2)))


def test_affine_zero_parameters_is_identity():
    x = batch()
    assert augment.random_affine(x, generator=gen()) is x


def test_affine_rotates_about_the_centre_without_distortion():
    # A dot 10 pixels right of the centre of a non-square image stays 10 pixels from the
    # centre at any angle; a wrong aspect correction would turn its circle into an ellipse.
    x = torch.zeros(32, 1, 33, 49)
    x[:, 0, 16, 34] = 1
    out = augment.random_affine(x, degrees=90, generator=gen())
    ys, xs = torch.meshgrid(torch.arange(33.0), torch.arange(49.0), indexing="ij")
    mass = out.sum((1, 2, 3))
    cy = (out[:, 0] * ys).sum((1, 2)) / mass
    cx = (out[:, 0] * xs).sum((1, 2)) / mass
    radius = torch.sqrt((cy - 16) ** 2 + (cx - 24) ** 2)
    assert torch.allclose(radius, torch.full_like(radius, 10.0), atol=0.3)
    assert (cy - 16).abs().max() > 7  # some dots really did turn by a lot


def test_affine_translate_only_moves_the_mass():
    x = torch.zeros(16, 1, 40, 40)
    x[:, 0, 18:22, 18:22] = 1
    out = augment.random_affine(x, translate=0.2, generator=gen())
    assert torch.allclose(out.sum((1, 2, 3)), x.sum((1, 2, 3)), atol=1e-3)  # nothing is lost
    ys = torch.arange(40.0)[:, None]
    cy = (out[:, 0] * ys).sum((1, 2)) / out.sum((1, 2, 3))
    assert (cy - 19.5).abs().max() > 2 and (cy - 19.5).abs().max() <= 8 + 1e-3


def test_hflip_always_and_never():
    x = batch()
    assert torch.equal(augment.random_hflip(x, p=1.0, generator=gen()), x.flip(-1))
    assert torch.equal(augment.random_hflip(x, p=0.0, generator=gen()), x)
    out = augment.random_hflip(x, generator=gen())
    flipped = [torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)]
    kept = [torch.equal(o, xi) for o, xi in zip(out, x)]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)


def test_random_crop_is_a_window_of_the_padded_image():
    x = batch(b=8, c=2, h=12, w=12)
    out = augment.random_crop(x, 10, padding=2, generator=gen())
    assert out.shape == (8, 2, 10, 10)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    for b in range(8):
        windows = [
            (t, left)
            for t in range(7)
            for left in range(7)
            if torch.equal(padded[b, :, t : t + 10, left : left + 10], out[b])
        ]
        assert windows, f"sample {b} is not a window"


def test_center_crop():
    x = batch(h=10, w=12)
    assert torch.equal(augment.center_crop(x, 6), x[:, :, 2:8, 3:9])


def test_cutout_zeroes_one_square_clipped_at_borders():
    x = torch.ones(64, 1, 40, 40)
    out = augment.cutout(x, 8, generator=gen())
    for o in out[:, 0]:
        rows, cols = (o == 0).nonzero(as_tuple=True)
        height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert len(rows) == height * width  # one filled rectangle
        inner = rows.min() > 0 and cols.min() > 0 and rows.max() < 39 and cols.max() < 39
        assert (height == 8 and width == 8) if inner else (height <= 8 and width <= 8)
    assert ((out == 0).sum((1, 2, 3)) == 64).sum() > 32  # most squares fall inside


def test_random_erasing_p0_identity_p1_changes_every_sample():
    x = batch(b=16)
    assert torch.equal(augment.random_erasing(x, p=0.0, generator=gen()), x)
    out = augment.random_erasing(x, p=1.0, generator=gen())
    changed = (out != x).flatten(1).sum(1)
    assert (changed > 0).all() and (changed <= 0.33 * 48 * 40 * 1.2).all()
    assert out.min() >= 0 and out.max() <= 1


def test_mixup_fixed_lambda_blends_with_a_consistent_permutation():
    x, y = batch(b=8, c=3), torch.arange(8) * 10
    mixed, y_a, y_b, lam = augment.mixup(x, y, lam=0.7, generator=gen())
    perm = y_b // 10
    assert lam == 0.7 and torch.equal(y_a, y)
    assert sorted(perm.tolist()) == list(range(8))
    assert torch.allclose(mixed, 0.7 * x + 0.3 * x[perm])
    same, *_ = augment.mixup(x, y, lam=1.0, generator=gen())
    assert torch.equal(same, x)


def test_mixup_beta_lambda_in_range_and_repeatable():
    x, y = batch(), torch.arange(6)
    lams = [augment.mixup(x, y, alpha=0.4, generator=gen(s))[3] for s in range(20)]
    assert (
        all(0 <= lam <= 1 for lam in lams) and len({float(lam) for lam in lams}) > 10
    )  # tensors would hash by identity
    assert augment.mixup(x, y, generator=gen(3))[3] == augment.mixup(x, y, generator=gen(3))[3]


@pytest.mark.parametrize("alpha", [0.2, 1.0, 2.0])
def test_mixup_lambda_has_the_beta_mean_and_variance(alpha):
    x, y, g = batch(), torch.arange(6), gen(0)
    lams = torch.stack([augment.mixup(x, y, alpha=alpha, generator=g)[3] for _ in range(4000)])
    # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)); 4000 draws put the sample variance within ~3% of it
    assert abs(lams.mean() - 0.5) < 0.02
    assert abs(lams.var() / (1 / (4 * (2 * alpha + 1))) - 1) < 0.1


def test_cutmix_pastes_one_box_from_the_partner_and_lambda_is_its_own_share():
    x, y = batch(b=64, h=48, w=48), torch.arange(64)
    mixed, y_a, y_b, lam = augment.cutmix(x, y, alpha=1.0, generator=gen())
    assert torch.equal(y_a, y) and sorted(y_b.tolist()) == list(range(64))
    for i in range(64):
        own = mixed[i] == x[i]
        partner = mixed[i] == x[y_b[i]]
        assert (own | partner).all()  # every pixel is one image's or the other's
        if y_b[i] == i:  # pasted from itself: nothing changes, lam is whatever the box was
            continue
        box = (~own)[0].nonzero()
        if len(box):  # the changed pixels form one axis-aligned rectangle
            (top, left), (bottom, right) = box.min(0).values, box.max(0).values
            assert (~own)[0, top : bottom + 1, left : right + 1].all()
        assert lam[i].item() == pytest.approx(own.float().mean().item())
    assert lam.shape == (64,) and (lam >= 0).all() and (lam <= 1).all()
    assert 0.3 < lam.mean() < 0.8  # 1 - Beta(1, 1) areas, larger where a box is clipped at a border


def test_brightness_contrast():
    x = batch()
    assert torch.equal(augment.brightness_contrast(x, 0.0, 1.0), x)
    # Images of different mean brightness: each is stretched around its own mean.
    dim_to_bright = x * 0.3 + torch.linspace(0.1, 0.45, len(x))[:, None, None, None]
    out = augment.brightness_contrast(dim_to_bright, brightness=0.1, contrast=1.5)
    assert out.min() > 0 and out.max() < 1  # chosen so that nothing is clipped
    assert torch.allclose(out.std((1, 2, 3)), 1.5 * dim_to_bright.std((1, 2, 3)))
    assert torch.allclose(out.mean((1, 2, 3)), dim_to_bright.mean((1, 2, 3)) + 0.1)


def test_sobel_contrast_channels():
    flat = torch.full((2, 1, 16, 16), 0.4)
    out = augment.sobel_contrast_channels(flat)
    assert out.shape == (2, 3, 16, 16)
    assert torch.equal(out[:, 0], flat[:, 0]) and (out[:, 1] == 0).all()

    edge = torch.zeros(1, 1, 16, 16)
    edge[..., 8:] = 0.8
    gradient = augment.sobel_contrast_channels(edge)[0, 1]
    assert gradient.max() == 1.0
    assert (gradient[:, 7:9] == 1).all()  # the two columns either side of the step
    assert (gradient[:, :7] == 0).all() and (gradient[:, 9:] == 0).all()

    ramp = torch.linspace(0.4, 0.6, 100).view(1, 1, 10, 10)  # low contrast in, full range out
    equalised = augment.sobel_contrast_channels(ramp)[0, 2]
    assert equalised.min() == 0 and equalised.max() == 1
    assert (equalised.flatten().diff() > 0).all()  # order of brightness is kept


def test_ten_crop_flip():
    x = batch(b=3, c=2, h=12, w=10)
    crops = augment.ten_crop_flip(x, 8)
    assert crops.shape == (10, 3, 2, 8, 8)
    assert torch.equal(crops[0], x[:, :, :8, :8])
    assert torch.equal(crops[3], x[:, :, 4:, 2:])
    assert torch.equal(crops[4], x[:, :, 2:10, 1:9])
    assert torch.equal(crops[5:], crops[:5].flip(-1))
