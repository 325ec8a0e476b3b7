"""
Every architecture of the reports (emotion; CelebA attributes; gender and age), and facenets' own (vgg,
resnet18), by name, in plain PyTorch.

    model = build_model("monterrey_baseline", in_channels=1, num_classes=7, image_size=48)
    logits = model(images)  # images [B, in_channels, image_size, image_size] float -> logits [B, num_classes]
    build_model("concepcion_classifier", in_channels=3, num_classes=2, image_size=(218, 178))  # (height, width)

GANs (generator and discriminator) have their own registry: build_gan("dcgan", image_size=64) (section "GANs" at
the end).

A network with several heads (gender, age group, age) is one model with num_classes = the heads' outputs side by
side; the training script slices them apart.

Models return raw logits. The Keras reports end their models with a softmax; here it lives in the loss
(nn.CrossEntropyLoss applies log-softmax itself, more stably), so call logits.softmax(-1) for probabilities.
Where a report was built in Keras (Monterrey, Trabajo final RNA) its defaults are kept, since they change shapes
and results: Conv2D padding "valid" unless the report says "same", MaxPool2D(2) flooring odd sizes (PyTorch's
does too), BatchNormalization eps 1e-3 and momentum 0.99, glorot-uniform weights. Flattened sizes are computed
at construction, so parameter counts are known before training. Each constructor's docstring names its report
and section and says what was reconstructed or assumed, since the reports' figures are partly lost.
"""

import copy
import inspect
from collections import OrderedDict

import torch
import torch.nn as nn
import torchvision

# Keras BatchNormalization defaults; PyTorch's momentum weighs the new batch, Keras' the running average
KERAS_BN = dict(eps=1e-3, momentum=0.01)


def keras_init_(module: nn.Module) -> nn.Module:
    """Keras' default initialization (glorot-uniform weights, zero biases), for the networks built in Keras.

    Transposed convolutions too: glorot's bound depends only on fan_in + fan_out, the same in Keras' kernel layout
    (kh, kw, out, in) as in PyTorch's (in, out, kh, kw).
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


class ImageTooSmallError(ValueError):
    """The network's convolutions and pools shrink an image of this size to nothing."""


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights that could not be downloaded (no network, no cached copy)."""


@torch.no_grad()
def flat_size(features: nn.Module, in_channels: int, image_size) -> int:
    """Number of features features(x).flatten(1) has per image, by a forward pass on zeros.

    image_size is one int for square images, or (height, width).
    """
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    was_training = features.training
    features.eval()  # BatchNorm in training mode refuses a batch of one 1x1 map
    try:
        out = features(torch.zeros(1, in_channels, height, width))
    except RuntimeError as e:  # a conv or pool met a map smaller than its window
        raise ImageTooSmallError(f"image_size {image_size} is too small for this network ({e})") from e
    features.train(was_training)
    return out[0].numel()


def sequential(**parts: nn.Module) -> nn.Sequential:
    """nn.Sequential with named parts, so model.features and model.classifier can be inspected alone."""
    return nn.Sequential(OrderedDict(parts))


def mlp(in_features: int, hidden, num_classes: int) -> nn.Sequential:
    """Flatten, then Linear + ReLU for each hidden width, then a Linear without activation (the logits)."""
    layers, width = [nn.Flatten()], in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


# Tec de Monterrey report (002), sections 5-8, Tables 3-6. Keras, 48x48x1, no padding given: "valid".


def monterrey(in_channels, num_classes, image_size, channels, hidden=(), batchnorm=False, dropout_after=()):
    """Conv3x3 'valid' (ReLU) [-> BatchNorm] -> MaxPool2 [-> Dropout 0.25] per entry of channels, then an MLP.

    Keras order Conv2D(activation='relu') -> BatchNormalization -> MaxPool2D is kept: BN after the ReLU.
    """
    layers, c_in = [], in_channels
    for i, c_out in enumerate(channels):
        layers += [nn.Conv2d(c_in, c_out, 3), nn.ReLU()]
        if batchnorm:
            layers.append(nn.BatchNorm2d(c_out, **KERAS_BN))
        layers.append(nn.MaxPool2d(2))
        if i in dropout_after:
            layers.append(nn.Dropout(0.25))
        c_in = c_out
    features = nn.Sequential(*layers)
    classifier = mlp(flat_size(features, in_channels, image_size), hidden, num_classes)
    return keras_init_(sequential(features=features, classifier=classifier))


def monterrey_baseline(in_channels=1, num_classes=7, image_size=48):
    """Report 002 §5, Table 3 (55.0%): conv 32/64/128/256 k3 + MaxPool2 each, flatten (256x1x1 at 48x48), dense."""
    return monterrey(in_channels, num_classes, image_size, (32, 64, 128, 256))


def monterrey_dense(in_channels=1, num_classes=7, image_size=48):
    """Report 002 §6, Table 4 (51.4%): the baseline with dense 64 and 32 (ReLU) before the output."""
    return monterrey(in_channels, num_classes, image_size, (32, 64, 128, 256), hidden=(64, 32))


def monterrey_batchnorm(in_channels=1, num_classes=7, image_size=48):
    """Report 002 §7, Table 5 (47.4%): conv 256/128/64/32, each Conv(ReLU) -> BN -> MaxPool2, dense."""
    return monterrey(in_channels, num_classes, image_size, (256, 128, 64, 32), batchnorm=True)


def monterrey_batchnorm_dropout(in_channels=1, num_classes=7, image_size=48):
    """Report 002 §8, Table 6 (43.0%): monterrey_batchnorm with Dropout 0.25 after the 1st and 3rd MaxPool."""
    return monterrey(in_channels, num_classes, image_size, (256, 128, 64, 32), batchnorm=True, dropout_after=(0, 2))


# Trabajo final RNA report (001), section 4 (table of experiments) and section 5. Keras.


def rna_cifar(in_channels=1, num_classes=7, image_size=48, downsample="maxpool"):
    """Report 001 §5, "Figura 1" (67.79%; downsample="stride": 67.8%, 68.5% with mixup).

    Figure 1 is lost; the text says it is the network "built for CIFAR", adapted. We reconstruct the classic
    Keras CIFAR-10 example (keras/examples/cifar10_cnn.py), the best-known CIFAR network in Keras:
    conv32 'same', conv32, MaxPool2, Dropout 0.25; conv64 'same', conv64, MaxPool2, Dropout 0.25;
    flatten (64x10x10 at 48x48), dense 512 ReLU, Dropout 0.5, dense.
    downsample="stride" replaces each MaxPool by a learned 3x3 stride-2 conv with the same channels, 'same'
    padding and ReLU (the All-Convolutional-Net recipe; the report gives only "stride=2").
    """
    if downsample not in ("maxpool", "stride"):
        raise ValueError(f"downsample must be 'maxpool' or 'stride', got {downsample!r}")

    def down(channels):
        if downsample == "maxpool":
            return nn.MaxPool2d(2)
        return nn.Sequential(nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.ReLU())

    features = nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3),
        nn.ReLU(),
        down(32),
        nn.Dropout(0.25),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3),
        nn.ReLU(),
        down(64),
        nn.Dropout(0.25),
    )
    classifier = nn.Sequential(
        nn.Flatten(),
        nn.Linear(flat_size(features, in_channels, image_size), 512),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(512, num_classes),
    )
    return keras_init_(sequential(features=features, classifier=classifier))


class ToRGB(nn.Module):
    """Repeat one gray channel three times, what Keras' generator does when told to load images in 'rgb'."""

    def forward(self, x):
        return x.expand(-1, 3, -1, -1)


def dense_bn(in_features, out_features):
    """Keras Dense(activation='relu') followed by BatchNormalization."""
    return [nn.Linear(in_features, out_features), nn.ReLU(), nn.BatchNorm1d(out_features, **KERAS_BN)]


def rna_resnet(name, in_channels, stem, pretrained, head):
    """A torchvision ResNet between an input stem that makes 3 channels and the report's dense head.

    stem="rgb": the gray image replicated to 3 channels ("cargadas directamente en rgb");
    stem="conv": a learned 3x3 'same' conv to 3 channels ("convolución inicial para conseguir 3 dimensiones";
    its kernel is not given). torchvision's global average pooling is kept and its ImageNet classifier dropped.
    """
    if stem == "rgb":
        if in_channels not in (1, 3):
            raise ValueError(f"stem='rgb' needs 1 or 3 input channels, got {in_channels}; use stem='conv'")
        first = ToRGB() if in_channels == 1 else nn.Identity()
    elif stem == "conv":
        first = keras_init_(nn.Conv2d(in_channels, 3, 3, padding=1))
    else:
        raise ValueError(f"stem must be 'rgb' or 'conv', got {stem!r}")
    backbone = getattr(torchvision.models, name)(weights=None)
    if pretrained:
        # IMAGENET1K_V1: trained with the original recipe, like Keras' weights (V2 uses a modern one)
        weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1
        try:
            state = weights.get_state_dict(progress=False)
        except OSError as e:  # URLError and socket errors are OSErrors
            raise WeightsUnavailableError(
                f"ImageNet weights for {name} could not be downloaded ({e}); run with network access once "
                "so torchvision caches them, or drop --pretrained"
            ) from e
        backbone.load_state_dict(state)
    backbone.fc = nn.Identity()
    return sequential(stem=first, backbone=backbone, head=keras_init_(head))


def rna_resnet50(in_channels=1, num_classes=7, image_size=48, stem="rgb", pretrained=False):
    """Report 001 §4, row "ResNet50 + GlAvgPool + Drop(0.3) + Dense(512) + BN + Drop(0.2) + Dense(7)" (25%, SGD).

    torchvision's resnet50 is v1.5 (stride on the 3x3 conv), Keras' ResNet50 is v1. Hidden dense layers are
    taken as ReLU: the table omits all activations (its Dense(7) must have had a softmax). image_size is
    not needed: global average pooling takes any size.
    """
    head = nn.Sequential(nn.Dropout(0.3), *dense_bn(2048, 512), nn.Dropout(0.2), nn.Linear(512, num_classes))
    return rna_resnet("resnet50", in_channels, stem, pretrained, head)


def rna_resnet152(in_channels=1, num_classes=7, image_size=48, stem="rgb", pretrained=False):
    """Report 001 §4, rows "Resnet152v2 + GlAvgPool + Drop(0.3) + Dense(512) + BN + Drop(0.2) + Dense(256) + BN
    + Drop(0.3) + Dense(7)": 38.5% with stem="rgb", 33.4% with stem="conv".

    torchvision has no ResNet152V2 (pre-activation); its resnet152 (v1.5) stands in. Hidden dense layers are
    taken as ReLU, as in rna_resnet50; image_size is not needed.
    """
    head = nn.Sequential(
        nn.Dropout(0.3),
        *dense_bn(2048, 512),
        nn.Dropout(0.2),
        *dense_bn(512, 256),
        nn.Dropout(0.3),
        nn.Linear(256, num_classes),
    )
    return rna_resnet("resnet152", in_channels, stem, pretrained, head)


# Udine report (003), chapter 2 (Fig. 2.1-2.5) and chapter 3. PyTorch; 3 input channels there:
# gray + sobel + contrast. Defaults are our reading of "fat" nets: few layers (3-8), wide channels
# (e.g. 50, 100, 250, 500), repeats decreasing with depth (the conclusion), 4-5 linear layers halving.


def udine_features(in_channels, channels, repeats, block_dropout):
    """Fig. 2.3: per stage, repeats[i] blocks of Conv3x3 'same' [-> Dropout2d] -> ReLU, then MaxPool2."""
    if len(channels) != len(repeats):
        raise ValueError(f"channels {channels} and repeats {repeats} must have the same length")
    layers, c_in = [], in_channels
    for c_out, n in zip(channels, repeats):
        for _ in range(n):
            layers.append(nn.Conv2d(c_in, c_out, 3, padding=1))  # 'same': only the MaxPool halves the size
            if block_dropout:
                layers.append(nn.Dropout2d(block_dropout))
            layers.append(nn.ReLU())
            c_in = c_out
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


def halving_widths(hidden, head_layers):
    """§2.1.2, Fig. 2.5: head_layers Linear layers, the hidden ones hidden, hidden/2, hidden/4, ..."""
    return [hidden // 2**i for i in range(head_layers - 1)]


def udine_r1(
    in_channels=1,
    num_classes=7,
    image_size=48,
    channels=(50, 100, 250, 500),
    repeats=(2, 2, 1, 1),
    dropout=0.35,
    hidden=1000,
    head_layers=5,
):
    """Report 003 §2 network 1 and §3.1, "R1" (60.9%, mean per-class 57.9%).

    ConvDrop blocks (Conv, Dropout2d 0.35, ReLU, Fig. 2.1) and MaxPools, a Dropout, then the halving linear
    head. The report gives Dropout2d 0.35 only; the Dropout after the conv part reuses it (assumed), and the
    head's activations are taken as ReLU. Defaults: 6 conv layers, 1000-500-250-125 hidden (our reading of "the
    first with 500-1000 values in input": its width; it is fed the flattened 3x3x500 map, 4,500 values).
    """
    features = nn.Sequential(udine_features(in_channels, channels, repeats, dropout), nn.Dropout(dropout))
    widths = halving_widths(hidden, head_layers)
    classifier = mlp(flat_size(features, in_channels, image_size), widths, num_classes)
    return sequential(features=features, classifier=classifier)


class Inception(nn.Module):
    """GoogLeNet inception module ("inception (3a)", Szegedy et al. 2015) with every width times multiplier.

    Four branches concatenated on channels, all keeping the spatial size: 1x1 64; 1x1 96 -> 3x3 128;
    1x1 16 -> 5x5 32; 3x3 max-pool -> 1x1 32. So 256 * multiplier channels out (report 003 §2.1.1).
    """

    def __init__(self, in_channels, multiplier=1):
        super().__init__()
        m = multiplier

        def conv(c_in, c_out, kernel):
            return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2), nn.ReLU())

        self.branch1 = conv(in_channels, 64 * m, 1)
        self.branch3 = nn.Sequential(conv(in_channels, 96 * m, 1), conv(96 * m, 128 * m, 3))
        self.branch5 = nn.Sequential(conv(in_channels, 16 * m, 1), conv(16 * m, 32 * m, 5))
        self.branch_pool = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), conv(in_channels, 32 * m, 1))

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch3(x), self.branch5(x), self.branch_pool(x)], dim=1)


def udine_r2(
    in_channels=1,
    num_classes=7,
    image_size=48,
    channels=(50, 100, 250, 500),
    repeats=(2, 2, 1, 1),
    inceptions=15,
    multiplier=3,
    dropout=0.62,
    hidden=1000,
    head_layers=5,
):
    """Report 003 §2 network 2 and §3.2, "R2" (56.7%): Conv blocks (Conv, ReLU, Fig. 2.2) and MaxPools,
    Dropout, `inceptions` inception modules of 256*multiplier channels, Dropout, then the halving linear head
    on the flattened map (the report lists no pooling before the Linear layers). The report uses 15-30
    modules and its best R2 used 30: pass inceptions=30 for it. Both Dropouts use the report's 0.62;
    conv part and head defaults as in udine_r1 (assumed).
    """
    features = nn.Sequential(udine_features(in_channels, channels, repeats, 0.0), nn.Dropout(dropout))
    blocks = [Inception(channels[-1] if i == 0 else 256 * multiplier, multiplier) for i in range(inceptions)]
    inception_part = nn.Sequential(*blocks, nn.Dropout(dropout))
    n = flat_size(nn.Sequential(features, inception_part), in_channels, image_size)
    classifier = mlp(n, halving_widths(hidden, head_layers), num_classes)
    return sequential(features=features, inceptions=inception_part, classifier=classifier)


# UTEC report (000), section II.A. PyTorch. Both networks: "convolución, activación y maxpooling" per layer.


def utec_features(in_channels, image_size, layers, dropout=0.0, dropout_at=()):
    """Conv [-> Dropout] -> ReLU -> MaxPool2 per layer; layers are (out_channels, kernel, stride, padding).

    The pool is skipped once the map is 1x1: five pools assume the report's large MTCNN crops
    (facenet-pytorch crops 160x160 by default); at 48x48 the fifth would leave 0x0.
    """
    modules, c_in, size = [], in_channels, image_size
    for i, (c_out, kernel, stride, padding) in enumerate(layers):
        modules.append(nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding))
        size = (size + 2 * padding - kernel) // stride + 1
        if i in dropout_at:
            modules.append(nn.Dropout(dropout))
        modules.append(nn.ReLU())
        if size >= 2:
            modules.append(nn.MaxPool2d(2))
            size //= 2
        c_in = c_out
    return nn.Sequential(*modules)


def utec_arch1(in_channels=1, num_classes=7, image_size=48, dropout=0.5, hidden=(256, 128)):
    """Report 000 §II.A.1, "Arquitectura 1", emotion (77-81%).

    Five convs of 32 channels, kernels 11/7/5/5/3, paddings 5/3/2/2/1, stride 2 on the first; dropout just
    before the activation in convs 3 and 4; an MLP of two hidden layers + a linear output without activation.
    Assumed: stride 2 (the report says only that the first conv's stride was raised), ReLU activations, p=0.5
    (PyTorch's default; the report gives none) and hidden widths 256, 128.
    """
    layers = [(32, 11, 2, 5), (32, 7, 1, 3), (32, 5, 1, 2), (32, 5, 1, 2), (32, 3, 1, 1)]
    features = utec_features(in_channels, image_size, layers, dropout, dropout_at=(2, 3))
    classifier = mlp(flat_size(features, in_channels, image_size), hidden, num_classes)
    return sequential(features=features, classifier=classifier)


def utec_arch2(in_channels=1, num_classes=7, image_size=48, channels=(32, 64, 128, 128, 256), hidden=256):
    """Report 000 §II.A.2, "Arquitectura 2", gender and age group together (81-95%), meant for 64 or 128 pixels.

    Five convs k3 padding 1, an MLP of one hidden layer + a linear output. Assumed: channels
    32/64/128/128/256 and 256 hidden (the report gives neither); num_classes is the joint label count.
    """
    layers = [(c, 3, 1, 1) for c in channels]
    features = utec_features(in_channels, image_size, layers)
    classifier = mlp(flat_size(features, in_channels, image_size), (hidden,), num_classes)
    return sequential(features=features, classifier=classifier)


# Concepción report (004), section 3.1. Keras, CelebA at 218x178x3, one model per attribute.


def concepcion_classifier(in_channels=3, num_classes=2, image_size=(218, 178)):
    """Report 004 §3.1, the attribute classifier (Male 94.6%, Eyeglasses 98.0%, Smiling 88.3%): 623,490 parameters.

    Four Conv2D of 32, 32, 64, 64 filters, kernel 2, 'same' padding (Keras pads the extra row and column at the
    bottom and right), ReLU, each followed by MaxPool 2: 218x178 -> 13x11x64; flatten; three dense 64 with sigmoid;
    dense num_classes (the report's softmax lives in the loss). Keras' glorot-uniform weights.
    """
    layers, c_in = [], in_channels
    for c_out in (32, 32, 64, 64):
        layers += [nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(c_in, c_out, 2), nn.ReLU(), nn.MaxPool2d(2)]
        c_in = c_out
    features = nn.Sequential(*layers)
    head, width = [nn.Flatten()], flat_size(features, in_channels, image_size)
    for _ in range(3):
        head += [nn.Linear(width, 64), nn.Sigmoid()]
        width = 64
    classifier = nn.Sequential(*head, nn.Linear(width, num_classes))
    return keras_init_(sequential(features=features, classifier=classifier))


# Not from a report: the strong default.


def vgg(in_channels=1, num_classes=7, image_size=48, width=64, dropout=0.2, hidden=(), upsample=1):
    """VGG-style network, our strong default for FER2013 (VGG variants are reported at ~73% there).

    4 stages of 2x (Conv3x3 -> BN -> ReLU), widths width, 2*width, 4*width, 8*width, MaxPool2 after each.
    Without hidden: global average pooling, so any image_size >= 16 works (e.g. 40x40 crops for ten-crop
    testing), Dropout and Linear. With hidden=(4096, 4096): the last feature map flattened into Linear + ReLU +
    Dropout per hidden width, then Linear, the head of Khaireddin & Chen's 73.3% VGG (2021). With upsample=2 the
    input is first enlarged bilinearly, so every stage works at twice the resolution for 4x the compute: a 40x40
    crop ends in a 5x5 map instead of 2x2. Convs have no bias since the BatchNorm right after has its own shift.
    """
    hidden = (hidden,) if isinstance(hidden, int) else hidden  # build_model has checked both: positive whole numbers
    layers = [nn.Upsample(scale_factor=upsample, mode="bilinear")] if upsample > 1 else []
    c_in = in_channels
    for stage in range(4):
        c_out = width * 2**stage
        for _ in range(2):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
            c_in = c_out
        layers.append(nn.MaxPool2d(2))
    features = nn.Sequential(*layers)
    fan_in = flat_size(features, in_channels, image_size)  # also refuses images the four pools would shrink to nothing
    if not hidden:
        classifier = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(c_in, num_classes)
        )
        return sequential(features=features, classifier=classifier)
    head = [nn.Flatten()]
    for h in hidden:
        head += [nn.Linear(fan_in, h), nn.ReLU(), nn.Dropout(dropout)]
        fan_in = h
    return sequential(features=features, classifier=nn.Sequential(*head, nn.Linear(fan_in, num_classes)))


def resnet18(in_channels=1, num_classes=7, image_size=48):
    """torchvision's ResNet-18 (11.2M parameters) with the usual stem for small images: a 3x3 stride-1 first conv
    and no max-pool, so a 48x48 face keeps 48x48 maps in the first stage instead of 12x12 (CIFAR practice; ResNet-18
    is reported at 72-74% on FER2013). image_size is not needed: global average pooling takes any size.
    """
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, 3, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


MODELS = {
    "monterrey_baseline": monterrey_baseline,
    "monterrey_dense": monterrey_dense,
    "monterrey_batchnorm": monterrey_batchnorm,
    "monterrey_batchnorm_dropout": monterrey_batchnorm_dropout,
    "rna_cifar": rna_cifar,
    "rna_resnet50": rna_resnet50,
    "rna_resnet152": rna_resnet152,
    "udine_r1": udine_r1,
    "udine_r2": udine_r2,
    "utec_arch1": utec_arch1,
    "utec_arch2": utec_arch2,
    "concepcion_classifier": concepcion_classifier,
    "vgg": vgg,
    "resnet18": resnet18,
}

# every constructor takes these; anything else it takes is one of its options
COMMON_ARGUMENTS = ("in_channels", "num_classes", "image_size")


def _checked_option(name: str, option: str, value, default):
    """value, if it has the kind of its default (positive whole numbers where the default is one); else ValueError."""

    def refuse(kind):
        return ValueError(f"model {name!r}: option {option}={value!r} must be {kind} (default {default!r})")

    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise refuse("True or False")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise refuse("a whole number of at least 1")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise refuse("a number")
    elif isinstance(default, tuple):
        value = (value,) if isinstance(value, int) and not isinstance(value, bool) else value
        if not isinstance(value, (tuple, list)) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value
        ):
            raise refuse("whole numbers of at least 1, such as (64, 32)")
        value = tuple(value)
    elif isinstance(default, str) and not isinstance(value, str):
        raise refuse("a word")
    return value


def check_options(name: str, options: dict) -> dict:
    """options for model name, each checked against the kind of its default (tuples from a single int); else ValueError.

    So a mistyped or negative value is one line naming it, never a failure deep inside torch.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from: {', '.join(MODELS)}")
    parameters = inspect.signature(MODELS[name]).parameters
    allowed = [p for p in parameters if p not in COMMON_ARGUMENTS]
    checked = {}
    for option, value in options.items():
        if option in COMMON_ARGUMENTS:
            raise ValueError(f"{option} is not a model option: it is set by the data and the task")
        if option not in allowed:
            raise ValueError(f"model {name!r} has no option {option!r}; its options: {', '.join(allowed) or 'none'}")
        checked[option] = _checked_option(name, option, value, parameters[option].default)
    return checked


def build_model(name: str, in_channels: int = 1, num_classes: int = 7, image_size: int = 48, **options) -> nn.Module:
    """The model registered as name, for images [B, in_channels, image_size, image_size], giving logits."""
    options = check_options(name, options)
    try:
        return MODELS[name](in_channels=in_channels, num_classes=num_classes, image_size=image_size, **options)
    except (RuntimeError, MemoryError) as e:
        if "alloc" not in str(e) and not isinstance(e, MemoryError):
            raise  # a bug, not a size: let it show its traceback
        raise ValueError(
            f"model {name!r} with {options} is too big for this machine's memory: choose smaller widths"
        ) from None


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (Keras' "Trainable params": BatchNorm running statistics excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- GANs
#
# A generator maps latent vectors [B, latent] to images [B, 3, S, S] and knows its latent size (.latent) and the
# low end of its output range (.low: 0.0 for a sigmoid output, images in [0, 1]; -1.0 for tanh, [-1, 1]); real
# images are scaled to the same range before the discriminator sees them. Discriminators return one raw logit per
# image: where a source ends in a sigmoid, it lives in the loss (BCE on the logit), as the classifiers' softmax does.


def _generator(latent: int, low: float, **parts: nn.Module) -> nn.Sequential:
    net = sequential(**parts)
    net.latent, net.low = latent, low
    return net


def _spectral_norm_(module: nn.Module) -> nn.Module:
    """Spectral normalisation (Miyato et al. 2018) of every conv and linear weight: each layer 1-Lipschitz."""
    for name, child in module.named_children():
        if isinstance(child, (nn.Conv2d, nn.Linear)):
            setattr(module, name, nn.utils.parametrizations.spectral_norm(child))
        else:
            _spectral_norm_(child)
    return module


def _check_gan_size(image_size, multiple: int, power_of_two: bool, name: str, paper: str) -> int:
    if isinstance(image_size, (tuple, list)):
        if len(set(image_size)) != 1:
            raise ValueError(f"the {name} draws square images: give one image size, not {tuple(image_size)}")
        image_size = image_size[0]
    fits = image_size >= 16 and image_size % multiple == 0 and (not power_of_two or image_size & (image_size - 1) == 0)
    if not fits:
        kind = "a power of two" if power_of_two else f"a multiple of {multiple}"
        raise ValueError(f"the {name} needs an image size that is {kind} of at least 16 ({paper}), not {image_size}")
    return image_size


def concepcion_generator(latent=64, image_size=64):
    """Report 004 §3.2.3, the generator of its DCGAN (Keras, after keras.io's "DCGAN to generate face images"):
    1,006,787 parameters at 64x64.

    Dense latent -> 8x8x64 (no activation), reshape, three Conv2DTranspose of 64, 128 and 256 filters (kernel 4,
    stride 2, 'same': each doubles the size, which is padding 1 in PyTorch), each with LeakyReLU 0.2, then Conv2D
    of 3 filters, kernel 5, 'same', sigmoid: images in [0, 1]. Keras' glorot-uniform weights. Other image sizes
    (multiples of 16) start from (size / 8)^2 instead of 8x8.
    """
    side = _check_gan_size(image_size, 16, False, "Concepción DCGAN", "64 in the report") // 8
    up, c_in = [], 64
    for c_out in (64, 128, 256):
        up += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        c_in = c_out
    return keras_init_(
        _generator(
            latent,
            0.0,
            dense=nn.Linear(latent, 64 * side * side),
            reshape=nn.Unflatten(1, (64, side, side)),
            up=nn.Sequential(*up),
            out=nn.Sequential(nn.Conv2d(c_in, 3, 5, padding=2), nn.Sigmoid()),
        )
    )


def concepcion_discriminator(image_size=64, spectral_norm=False):
    """Report 004 §3.2.3, the discriminator of its DCGAN (Keras): 794,241 parameters at 64x64.

    Conv2D of 64, 128, 128 and 128 filters (kernel 4, stride 2, 'same': padding 1 here), each with LeakyReLU 0.2:
    64x64 -> 4x4x128; Flatten, Dropout 0.2, Dense 64 and Dense 64 with ReLU, Dense 1 (the report's sigmoid is in
    the loss). Keras' glorot-uniform weights. spectral_norm (not in the report) normalises every weight.
    """
    _check_gan_size(image_size, 16, False, "Concepción DCGAN", "64 in the report")
    layers, c_in = [], 3
    for c_out in (64, 128, 128, 128):
        layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        c_in = c_out
    features = nn.Sequential(*layers)
    classifier = nn.Sequential(
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(flat_size(features, 3, image_size), 64),
        nn.ReLU(),
        nn.Linear(64, 64),
        nn.ReLU(),
        nn.Linear(64, 1),
    )
    net = keras_init_(sequential(features=features, classifier=classifier))
    return _spectral_norm_(net) if spectral_norm else net


def _radford_init_(module: nn.Module) -> nn.Module:
    """DCGAN's initialization (Radford et al. 2016): conv weights N(0, 0.02), BatchNorm weights N(1, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d)) and m.bias is not None:
            nn.init.zeros_(m.bias)
    return module


def dcgan_generator(latent=100, width=64, image_size=64):
    """The DCGAN generator of Radford et al. (2016) as pytorch/examples' dcgan/main.py builds it: 3,576,704
    parameters at 64x64 (latent nz = 100, ngf = width = 64).

    ConvTranspose 4x4 from the latent vector to a 4x4 map of 8 * width channels, then stride-2 ConvTranspose 4x4
    (padding 1) halving the channels and doubling the size up to 32x32 x width, each with BatchNorm and ReLU, and
    a last one to 3 channels with tanh: images in [-1, 1]. No biases (BatchNorm follows); N(0, 0.02) weights.
    Other sizes (powers of two from 16) add or drop a stage: 4x4 has width * size / 8 channels.
    """
    stages = _check_gan_size(image_size, 16, True, "DCGAN", "64 in Radford et al.").bit_length() - 3  # 64: 4
    c = width * 2 ** (stages - 1)
    layers = [nn.ConvTranspose2d(latent, c, 4, 1, 0, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
    for _ in range(stages - 1):
        layers += [nn.ConvTranspose2d(c, c // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(c // 2), nn.ReLU()]
        c //= 2
    return _radford_init_(
        _generator(
            latent,
            -1.0,
            reshape=nn.Unflatten(1, (latent, 1, 1)),
            up=nn.Sequential(*layers),
            out=nn.Sequential(nn.ConvTranspose2d(c, 3, 4, 2, 1, bias=False), nn.Tanh()),
        )
    )


def dcgan_discriminator(width=64, image_size=64, spectral_norm=False):
    """The DCGAN discriminator of Radford et al. (2016) as pytorch/examples' dcgan/main.py builds it: 2,765,568
    parameters at 64x64 (ndf = width = 64).

    Stride-2 Conv 4x4 (padding 1) from 3 channels to width, then doubling the channels and halving the size down
    to 4x4 x 8 * width, LeakyReLU 0.2 after each and BatchNorm on all but the first; a 4x4 Conv to one logit (the
    example's sigmoid is in the loss). No biases, N(0, 0.02) weights. spectral_norm=True is the SN-GAN form of
    this network (Miyato et al. 2018): spectral normalisation on every conv in place of BatchNorm, with biases.
    """
    stages = _check_gan_size(image_size, 16, True, "DCGAN", "64 in Radford et al.").bit_length() - 3
    bias, layers, c = spectral_norm, [nn.Conv2d(3, width, 4, 2, 1, bias=spectral_norm), nn.LeakyReLU(0.2)], width
    for _ in range(stages - 1):
        layers.append(nn.Conv2d(c, 2 * c, 4, 2, 1, bias=bias))
        layers += [nn.LeakyReLU(0.2)] if spectral_norm else [nn.BatchNorm2d(2 * c), nn.LeakyReLU(0.2)]
        c *= 2
    net = _radford_init_(
        sequential(
            features=nn.Sequential(*layers), classifier=nn.Sequential(nn.Conv2d(c, 1, 4, 1, 0, bias=bias), nn.Flatten())
        )
    )
    return _spectral_norm_(net) if spectral_norm else net


GANS = {
    "dcgan": (dcgan_generator, dcgan_discriminator),
    "concepcion": (concepcion_generator, concepcion_discriminator),
}


def gan_options(name: str) -> dict:
    """{option: default} of the GAN name's generator and discriminator together (image_size aside)."""
    if name not in GANS:
        raise ValueError(f"unknown GAN {name!r}; choose from: {', '.join(GANS)}")
    return {
        option: parameter.default
        for part in GANS[name]
        for option, parameter in inspect.signature(part).parameters.items()
        if option != "image_size"
    }


def check_gan_options(name: str, options: dict) -> dict:
    """options for the GAN name, each checked against the kind of its default; else ValueError (one line)."""
    defaults = gan_options(name)
    for option in options:
        if option not in defaults:
            raise ValueError(f"GAN {name!r} has no option {option}; its options: {', '.join(defaults)}")
    return {option: _checked_option(name, option, value, defaults[option]) for option, value in options.items()}


def build_gan(name: str, image_size: int = 64, **options) -> tuple[nn.Module, nn.Module]:
    """(generator, discriminator) of the GAN registered as name, for image_size x image_size images.

    Each option goes to the part(s) that take it (width to both halves of dcgan, latent to the generator,
    spectral_norm to the discriminator), checked by check_gan_options; a wrong one or size is a ValueError.
    """
    options = check_gan_options(name, options)
    parts = []
    for part in GANS[name]:
        taken = inspect.signature(part).parameters
        parts.append(part(image_size=image_size, **{k: v for k, v in options.items() if k in taken}))
    return tuple(parts)


# ----------------------------------------------------------------------------- ensembles
#
# N networks of one architecture trained at once as ONE network of grouped layers: a convolution of N times the
# channels in N groups is N convolutions side by side, a BatchNorm of N times the channels keeps each member's
# statistics apart, and every other layer of these networks works per channel or per element anyway. One forward,
# one backward and one optimizer step then train all N, with torch.compile, channels_last and BatchNorm as usual
# (torch.func.vmap stumbles on BatchNorm's in-place running statistics).

# Whose layers all work per channel, so that stacked they keep the members apart (a torch.cat of branches, as in
# udine_r2's inception modules, or a channel-mixing step would not)
STACKABLE = ("vgg", "resnet18")
# Layers that act on each channel (or element) alone: shared by all members as they are
PER_CHANNEL = (nn.ReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Dropout, nn.Flatten, nn.Upsample, nn.Identity)


class GroupedLinear(nn.Module):
    """N Linear layers side by side: [B, N*in] -> [B, N*out], member i reading features i*in:(i+1)*in.

    A flattened map of N*C channels holds member i's features in exactly that block, so no reordering is needed.
    The bias is kept flat, [N*out]: one dimension like a Linear's bias, so the optimizer leaves it undecayed too.
    """

    def __init__(self, linears: list[nn.Linear]):
        super().__init__()
        self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in linears]))  # [N, out, in]
        self.bias = nn.Parameter(torch.cat([m.bias.detach() for m in linears]))

    def forward(self, x):
        members, _, in_features = self.weight.shape
        return torch.einsum("bni,noi->bno", x.reshape(-1, members, in_features), self.weight).flatten(1) + self.bias

    def member(self, i: int) -> nn.Linear:
        out_features, in_features = self.weight.shape[1:]
        linear = nn.Linear(in_features, out_features)
        linear.weight = nn.Parameter(self.weight[i].detach().clone())
        linear.bias = nn.Parameter(self.bias.view(len(self.weight), -1)[i].detach().clone())
        return linear


class StackedNetworks(nn.Module):
    """N networks as one (stack_networks): images [B, N*C, H, W], member i's in channels i*C:(i+1)*C -> logits
    [B, N, classes], member i's at [:, i]."""

    def __init__(self, net: nn.Module, members: int):
        super().__init__()
        self.net, self.members = net, members

    def forward(self, x):
        return self.net(x).unflatten(1, (self.members, -1))


def _stacked_layer(layers: list[nn.Module]) -> nn.Module:
    """One layer doing the work of `layers` (the same layer of each member) on their channels side by side."""
    first, n = layers[0], len(layers)
    if isinstance(first, nn.Conv2d):
        conv = nn.Conv2d(
            n * first.in_channels,
            n * first.out_channels,
            first.kernel_size,
            first.stride,
            first.padding,
            first.dilation,
            n * first.groups,
            first.bias is not None,
            first.padding_mode,
        )
        for name in ("weight", "bias") if first.bias is not None else ("weight",):
            setattr(conv, name, nn.Parameter(torch.cat([getattr(m, name).detach() for m in layers])))
        return conv
    if isinstance(first, nn.BatchNorm2d):
        norm = nn.BatchNorm2d(n * first.num_features, first.eps, first.momentum)
        norm.weight = nn.Parameter(torch.cat([m.weight.detach() for m in layers]))
        norm.bias = nn.Parameter(torch.cat([m.bias.detach() for m in layers]))
        norm.running_mean = torch.cat([m.running_mean for m in layers])
        norm.running_var = torch.cat([m.running_var for m in layers])
        norm.num_batches_tracked = first.num_batches_tracked.clone()  # the same count for all: they train together
        return norm
    if isinstance(first, nn.Linear):
        return GroupedLinear(layers)
    if isinstance(first, PER_CHANNEL):
        return copy.deepcopy(first)
    raise ValueError(f"stack_networks cannot stack a {type(first).__name__} layer: it may mix the members' channels")


def _member_layer(layer: nn.Module, i: int, n: int) -> nn.Module:
    """Member i's own layer out of a stacked one (of n members)."""
    if isinstance(layer, nn.Conv2d):
        conv = nn.Conv2d(
            layer.in_channels // n,
            layer.out_channels // n,
            layer.kernel_size,
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.groups // n,
            layer.bias is not None,
            layer.padding_mode,
        )
        for name in ("weight", "bias") if layer.bias is not None else ("weight",):
            setattr(conv, name, nn.Parameter(getattr(layer, name).detach().chunk(n)[i].clone()))
        return conv
    if isinstance(layer, nn.BatchNorm2d):
        norm = nn.BatchNorm2d(layer.num_features // n, layer.eps, layer.momentum)
        norm.weight = nn.Parameter(layer.weight.detach().chunk(n)[i].clone())
        norm.bias = nn.Parameter(layer.bias.detach().chunk(n)[i].clone())
        norm.running_mean, norm.running_var = (
            layer.running_mean.chunk(n)[i].clone(),
            layer.running_var.chunk(n)[i].clone(),
        )
        norm.num_batches_tracked = layer.num_batches_tracked.clone()
        return norm
    if isinstance(layer, GroupedLinear):
        return layer.member(i)
    return copy.deepcopy(layer)


def _with_layers_replaced(template: nn.Module, replace) -> nn.Module:
    """A copy of template (its structure and forward) with every leaf layer swapped for replace(its name)."""
    net = copy.deepcopy(template)
    for name, layer in list(net.named_modules()):
        if name and not list(layer.children()):
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent), child, replace(name))
    return net


def stack_networks(networks: list[nn.Module]) -> StackedNetworks:
    """N networks of one architecture (e.g. STACKABLE models, each with its own weights) as one StackedNetworks of
    grouped layers, holding a copy of their weights and BatchNorm statistics; unstack gives them back.

    Each member computes in the stack exactly what it computes alone, forward and backward. So one optimizer over
    the stacked parameters is N optimizers whenever its update is elementwise (SGD, momentum, Adam, weight decay, a
    moving average of the weights), provided the loss is the sum of the members' losses.
    """
    shapes = [[tuple(t.shape) for t in net.state_dict().values()] for net in networks]
    if len(networks) < 2 or any(s != shapes[0] for s in shapes):
        raise ValueError("stack_networks needs two or more networks of one architecture")
    return StackedNetworks(
        _with_layers_replaced(networks[0], lambda name: _stacked_layer([net.get_submodule(name) for net in networks])),
        len(networks),
    )


def unstack(stacked: StackedNetworks) -> list[nn.Module]:
    """The members of a StackedNetworks, each as a plain network of its own (copies: training one changes neither)."""
    n = stacked.members
    return [
        _with_layers_replaced(stacked.net, lambda name, i=i: _member_layer(stacked.net.get_submodule(name), i, n))
        for i in range(n)
    ]
