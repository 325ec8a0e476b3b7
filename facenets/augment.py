"""Batched augmentations for image tensors, on whatever device the batch lives.

Every function takes a float batch x of shape [B, C, H, W] with values in [0, 1]
and works on the whole batch at once: random parameters are drawn per sample as
tensors, never in a Python loop over images, so the same code is fast on a GPU
(the cifar10-airbench way). Random functions take an optional torch.Generator
(on x's device) so that a test or a run can repeat the exact same draw.

    function                 what                            used by
    random_affine            rotation, shear, zoom, shift    Trabajo final RNA (its Keras
                                                             rotation 30, shear 0.2, zoom 0.2)
    random_hflip             horizontal flip                 Trabajo final RNA
    random_crop, center_crop crops, optionally padded        none; the classic CIFAR recipe
    cutout                   one zeroed square per image     Trabajo final RNA ("cut-off 8x8")
    random_erasing           one noise rectangle per image   none; a common extra
    mixup                    blend of two images and labels  Trabajo final RNA (70% / 30%)
    cutmix                   box of another image pasted in  none; a common extra
    brightness_contrast      fixed boost, train and test     UTEC report (Arch 1)
    sobel_contrast_channels  gray -> [gray, sobel, contrast] Udine lab report
    ten_crop_flip            test-time augmentation          none; a common extra
    diff_augment             colour, translation, cutout     train_gan.py: what its discriminator
                             (differentiable)                sees, real and fake (Zhao et al. 2020)
"""

import math

import torch
import torch.nn.functional as F


def _uniform(n, low, high, x, generator):
    """n numbers uniform in [low, high), drawn on x's device."""
    return torch.rand(n, device=x.device, generator=generator) * (high - low) + low


def _gamma(shape, n, x, generator, tries=16):
    """n draws from Gamma(shape, 1) on x's device, with no host sync.

    torch's own Gamma and Beta samplers take no generator. This is Marsaglia & Tsang's method (2000) with
    `tries` candidates per draw, keeping the first accepted one: each is accepted with probability > 0.95,
    so all 16 fail about once in 1e20 draws (the last one is then used anyway). Shapes below 1 draw
    Gamma(shape + 1) and multiply by U ** (1 / shape), as the paper shows.
    """
    k = shape + 1 if shape < 1 else shape
    d = k - 1 / 3
    c = 1 / math.sqrt(9 * d)
    z = torch.randn(n, tries, device=x.device, generator=generator)
    u = torch.rand(n, tries, device=x.device, generator=generator)
    v = (1 + c * z) ** 3
    accepted = (v > 0) & (torch.log(u) < 0.5 * z**2 + d - d * v + d * torch.log(v.clamp_min(1e-30)))
    first = torch.where(accepted.any(1), accepted.float().argmax(1), tries - 1)
    g = d * v.gather(1, first[:, None]).squeeze(1)
    if shape < 1:
        g = g * torch.rand(n, device=x.device, generator=generator) ** (1 / shape)
    return g


def random_affine(x, degrees=0.0, shear=0.0, zoom=0.0, translate=0.0, generator=None):
    """Per-sample rotation, shear, zoom and shift, with the meaning of Keras' ImageDataGenerator.

    degrees:   rotation uniform in [-degrees, degrees].
    shear:     shear angle in degrees, uniform in [-shear, shear]. Keras calls shear_range an
               "intensity", but the Keras of the report's time (keras-preprocessing 1.1, TF 2.x)
               passes it through deg2rad, so shear_range=0.2 is a 0.2 degree shear, next to
               nothing. Very old Keras read it as radians: that is shear=math.degrees(0.2) here.
    zoom:      x and y scale factors each uniform in [1 - zoom, 1 + zoom], drawn separately as
               Keras does; a factor above 1 shows more of the image (the face gets smaller).
    translate: shift uniform in [-translate, translate] times the width (or height).
    """
    if degrees == 0 and shear == 0 and zoom == 0 and translate == 0:
        return x
    B, _, H, W = x.shape
    angle = torch.deg2rad(_uniform(B, -degrees, degrees, x, generator))
    slant = torch.deg2rad(_uniform(B, -shear, shear, x, generator))
    zx, zy = _uniform((2, B), 1 - zoom, 1 + zoom, x, generator)
    tx, ty = _uniform((2, B), -translate, translate, x, generator)

    # The matrix maps each output pixel to where it reads from in the input, in pixel units
    # around the centre: rotation @ shear @ zoom as in Keras, then the shift.
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.stack([cos, -sin, sin, cos], 1).view(B, 2, 2)
    shearing = torch.stack(
        [torch.ones_like(slant), -torch.sin(slant), torch.zeros_like(slant), torch.cos(slant)], 1
    ).view(B, 2, 2)
    zooming = torch.diag_embed(torch.stack([zx, zy], 1))
    A = rotation @ shearing @ zooming

    # affine_grid works in [-1, 1] on each axis; rescale the cross terms so that a rotation
    # stays a rotation on a non-square image. A shift of a fraction f of the size is 2f there.
    A[:, 0, 1] *= H / W
    A[:, 1, 0] *= W / H
    theta = torch.cat([A, 2 * torch.stack([tx, ty], 1)[:, :, None]], 2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # "border" repeats the edge pixels, which is Keras' default fill_mode="nearest"; black
    # corners ("zeros") would be a cue that exists only in training images.
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_hflip(x, p=0.5, generator=None):
    """Mirror each image left-right with probability p."""
    flip = torch.rand(x.shape[0], device=x.device, generator=generator) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def random_crop(x, size, padding=0, generator=None):
    """A random size x size window of each image, after reflect-padding every side by `padding`."""
    if padding > 0:
        x = F.pad(x, (padding,) * 4, mode="reflect")
    B, C, H, W = x.shape
    top = torch.randint(0, H - size + 1, (B,), device=x.device, generator=generator)
    left = torch.randint(0, W - size + 1, (B,), device=x.device, generator=generator)
    offsets = torch.arange(size, device=x.device)
    rows = (top[:, None] + offsets)[:, None, :, None].expand(B, C, size, W)
    cols = (left[:, None] + offsets)[:, None, None, :].expand(B, C, size, size)
    # Two gathers pick each sample's own rows, then its own columns.
    return x.gather(2, rows).gather(3, cols)


def center_crop(x, size):
    """The central size x size window (rounding towards the top-left when the margin is odd)."""
    top, left = (x.shape[2] - size) // 2, (x.shape[3] - size) // 2
    return x[:, :, top : top + size, left : left + size]


def _box_mask(top, left, height, width, H, W):
    """Boolean [B, 1, H, W], True inside each sample's box; boxes may stick out of the image."""
    ys = torch.arange(H, device=top.device)
    xs = torch.arange(W, device=top.device)
    inside_y = (ys >= top[:, None]) & (ys < (top + height)[:, None])
    inside_x = (xs >= left[:, None]) & (xs < (left + width)[:, None])
    return (inside_y[:, :, None] & inside_x[:, None, :])[:, None]


def cutout(x, size, generator=None):
    """Zero one size x size square per image (DeVries & Taylor 2017).

    The centre can be any pixel, so squares near a border are clipped: the network also learns
    from images where only part of the face is hidden, as in the original paper.
    """
    B, _, H, W = x.shape
    cy = torch.randint(0, H, (B,), device=x.device, generator=generator)
    cx = torch.randint(0, W, (B,), device=x.device, generator=generator)
    side = torch.full_like(cy, size)
    return x.masked_fill(_box_mask(cy - size // 2, cx - size // 2, side, side, H, W), 0.0)


def random_erasing(x, p=0.5, scale=(0.02, 0.33), ratio=(0.3, 3.3), generator=None):
    """With probability p, fill one random rectangle per image with uniform noise in [0, 1].

    Noise, not zeros, as in the Random Erasing paper (Zhong et al. 2017): zeros would make it
    cutout again. The area is a `scale` fraction of the image and the aspect ratio is
    log-uniform in `ratio`, like torchvision; where torchvision retries a box that does not
    fit, we clip its sides to the image, which keeps the whole batch in one pass.
    """
    B, C, H, W = x.shape
    area = _uniform(B, scale[0], scale[1], x, generator) * H * W
    aspect = torch.exp(_uniform(B, math.log(ratio[0]), math.log(ratio[1]), x, generator))
    height = torch.sqrt(area * aspect).round().long().clamp(1, H)
    width = torch.sqrt(area / aspect).round().long().clamp(1, W)
    top = (_uniform(B, 0, 1, x, generator) * (H - height + 1)).long()
    left = (_uniform(B, 0, 1, x, generator) * (W - width + 1)).long()
    chosen = _uniform(B, 0, 1, x, generator) < p
    mask = _box_mask(top, left, height, width, H, W) & chosen[:, None, None, None]
    noise = torch.rand(x.shape, device=x.device, generator=generator, dtype=x.dtype)
    return torch.where(mask, noise, x)


def mixup(x, y, alpha=0.2, lam=None, generator=None):
    """Blend each image with another from the same batch (Zhang et al. 2018).

    Returns (x_mixed, y_a, y_b, lam) with x_mixed = lam * x + (1 - lam) * x[perm]. lam is
    either fixed (lam=0.7 is the report's "70% of one image and 30% of the other") or drawn
    once per batch from Beta(alpha, alpha), then a 0-dim tensor on x's device. Train with the same blend of the two
    losses:

        loss = lam * F.cross_entropy(out, y_a) + (1 - lam) * F.cross_entropy(out, y_b)
    """
    if lam is None:
        g = _gamma(alpha, 2, x, generator)
        lam = g[0] / g.sum()  # Beta(alpha, alpha); a tensor on x's device, so the GPU never waits for the CPU
    perm = torch.randperm(x.shape[0], device=x.device, generator=generator)
    return lam * x + (1 - lam) * x[perm], y, y[perm], lam


def cutmix(x, y, alpha=1.0, generator=None):
    """Paste a box of another image of the batch into each image (Yun et al. 2019).

    Returns (x_mixed, y_a, y_b, lam) as mixup does, but with lam [B]: per image, the share of its own pixels
    left after the box is clipped at the border. Each image draws its own box, of area (1 - Beta(alpha, alpha))
    of the image and centred on any pixel. Train with the per-image blend of the two losses:

        loss = (lam * F.cross_entropy(out, y_a, reduction="none")
                + (1 - lam) * F.cross_entropy(out, y_b, reduction="none")).mean()
    """
    B, _, H, W = x.shape
    g = _gamma(alpha, 2 * B, x, generator).view(2, B)
    side = (g[1] / g.sum(0)).sqrt()  # sqrt of 1 - lam, lam ~ Beta(alpha, alpha)
    height, width = (side * H).round().long(), (side * W).round().long()
    cy = torch.randint(0, H, (B,), device=x.device, generator=generator)
    cx = torch.randint(0, W, (B,), device=x.device, generator=generator)
    box = _box_mask(cy - height // 2, cx - width // 2, height, width, H, W)
    perm = torch.randperm(B, device=x.device, generator=generator)
    lam = 1 - box.flatten(1).float().mean(1)
    return torch.where(box, x[perm], x), y, y[perm], lam


def brightness_contrast(x, brightness=0.0, contrast=1.0):
    """Stretch each image around its own mean by `contrast`, then add `brightness`; clip to [0, 1].

    Deterministic, so it belongs in the preprocessing of train and test images alike, as in the
    UTEC report ("so that the facial features look more prominent").
    """
    if brightness == 0 and contrast == 1:
        return x
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * contrast + mean + brightness).clamp(0, 1)


def sobel_contrast_channels(x):
    """Turn gray images [B, 1, H, W] into [B, 3, H, W]: gray, Sobel edges, equalised gray.

    Edges are the Sobel gradient magnitude divided by its per-image maximum. The contrast
    channel is histogram equalisation (each pixel becomes the fraction of darker-or-equal
    pixels), chosen over min-max stretching because FER-2013 faces already span almost the
    whole [0, 1] range, where min-max would change nothing. Constant images give zeros.
    """
    if x.shape[1] != 1:
        raise ValueError(f"expected one gray channel, got {x.shape[1]}")
    B, _, H, W = x.shape
    # Replicate the border so that the edge of the picture is not mistaken for an edge.
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")[:, 0]
    # Sobel = a central difference along one axis smoothed by [1, 2, 1] along the other.
    # Written with slices rather than conv2d, a flat area gives exactly 0, not rounding noise
    # that the per-image normalisation below would blow up to 1.
    dx, dy = p[:, :, 2:] - p[:, :, :-2], p[:, 2:] - p[:, :-2]
    gx = dx[:, :-2] + 2 * dx[:, 1:-1] + dx[:, 2:]
    gy = dy[:, :, :-2] + 2 * dy[:, :, 1:-1] + dy[:, :, 2:]
    edges = torch.sqrt(gx**2 + gy**2)
    edges = edges / edges.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)

    flat = x.reshape(B, H * W)
    ordered = flat.sort(dim=1).values
    rank = torch.searchsorted(ordered, flat, right=True)  # pixels <= this one
    darkest = (flat == ordered[:, :1]).sum(1, keepdim=True)  # so the darkest pixels map to 0
    equalised = (rank - darkest) / (H * W - darkest).clamp_min(1)
    return torch.cat([x, edges[:, None], equalised.view(B, 1, H, W).to(x.dtype)], 1)


def ten_crop_flip(x, size):
    """The four corner crops, the centre crop and the mirror of each: [10, B, C, size, size].

    For test-time augmentation: run the model on each of the 10 views and average the softmax
    over the first dimension.
    """
    H, W = x.shape[2:]
    crops = [
        x[:, :, :size, :size],
        x[:, :, :size, W - size :],
        x[:, :, H - size :, :size],
        x[:, :, H - size :, W - size :],
        center_crop(x, size),
    ]
    return torch.stack(crops + [c.flip(-1) for c in crops])


DIFF_AUGMENT = ("color", "translation", "cutout")


def diff_augment(x, policy="color,translation,cutout", generator=None):
    """Differentiable Augmentation (Zhao et al. 2020) of a batch x in [-1, 1], as in the paper's code.

    A GAN's discriminator overfits a small data set (a few thousand images) within epochs; augmenting only the
    real images would teach the generator the augmentations. DiffAugment applies the same kind of random
    transformation to every image the discriminator sees, real and generated, in both the discriminator's and
    the generator's step, and keeps it differentiable so the generator's gradient passes through it. policy is
    comma-separated, applied in this order:

        color        per image: brightness + U(-0.5, 0.5), saturation x U(0, 2), contrast x U(0.5, 1.5)
        translation  per image: a shift of up to 1/8 of the size in whole pixels each way, zeros coming in
        cutout       per image: a zeroed square of half the size, centred anywhere (so clipped at the borders)

    The constants are the paper's, for images in [-1, 1] (0 is mid-grey there): pass x * 2 - 1 for images in
    [0, 1]. Draws come from generator, on x's device; "" or "none" returns x.
    """
    names = [name.strip() for name in policy.split(",") if name.strip() and name.strip() != "none"]
    unknown = sorted(set(names) - set(DIFF_AUGMENT))
    if unknown:
        raise ValueError(
            f"unknown DiffAugment {unknown[0]!r}: the policy is a comma-separated choice of {', '.join(DIFF_AUGMENT)}"
        )
    B, C, H, W = x.shape
    if "color" in names:

        def factor(low, high):
            return _uniform(B, low, high, x, generator).view(B, 1, 1, 1)

        x = x + factor(-0.5, 0.5)
        x = (x - x.mean(1, keepdim=True)) * factor(0.0, 2.0) + x.mean(1, keepdim=True)
        x = (x - x.mean((1, 2, 3), keepdim=True)) * factor(0.5, 1.5) + x.mean((1, 2, 3), keepdim=True)
    if "translation" in names:
        # Each output pixel reads the pixel shift away, from the image framed by one row and column of zeros on
        # every side; reads beyond the image land on that frame. Gathers: the gradient flows to the pixels read.
        padded = F.pad(x, (1, 1, 1, 1))
        index = []
        for size in (H, W):
            limit = int(size / 8 + 0.5)
            shift = torch.randint(-limit, limit + 1, (B, 1), device=x.device, generator=generator)
            index.append((torch.arange(size, device=x.device) + shift + 1).clamp(0, size + 1))
        rows = index[0][:, None, :, None].expand(B, C, H, W + 2)
        x = padded.gather(2, rows).gather(3, index[1][:, None, None, :].expand(B, C, H, W))
    if "cutout" in names:
        side_h, side_w = int(H / 2 + 0.5), int(W / 2 + 0.5)
        cy = torch.randint(0, H + 1 - side_h % 2, (B,), device=x.device, generator=generator)
        cx = torch.randint(0, W + 1 - side_w % 2, (B,), device=x.device, generator=generator)
        box = _box_mask(
            cy - side_h // 2, cx - side_w // 2, torch.full_like(cy, side_h), torch.full_like(cx, side_w), H, W
        )
        x = x.masked_fill(box, 0.0)
    return x
