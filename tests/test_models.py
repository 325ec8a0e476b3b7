import urllib.error

import pytest
import torch
import torch.nn as nn
import torchvision

from facenets.models import MODELS, build_model, check_options, count_parameters

RESNETS = ["rna_resnet50", "rna_resnet152"]
SMALL = [name for name in MODELS if name not in RESNETS]
# (name, image_size, num_classes): every small model at 48, plus the sizes vgg and utec_arch2 are meant for
CASES = [(name, 48, 7) for name in SMALL] + [("vgg", 40, 7), ("utec_arch2", 64, 2)]


def in_channels_for(name):
    return 3 if name.startswith("udine") else 1  # Udine feeds gray + sobel + contrast


@pytest.mark.parametrize("name, image_size, num_classes", CASES)
def test_small_models_give_logits_and_gradients(name, image_size, num_classes):
    c = in_channels_for(name)
    model = build_model(name, in_channels=c, num_classes=num_classes, image_size=image_size)
    logits = model(torch.randn(2, c, image_size, image_size))
    assert logits.shape == (2, num_classes)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_resnets_forward_with_both_stems():
    torch.manual_seed(0)
    for name, stem in [("rna_resnet50", "conv"), ("rna_resnet152", "rgb")]:
        model = build_model(name, stem=stem).eval()
        with torch.no_grad():
            assert model(torch.randn(2, 1, 48, 48)).shape == (2, 7)


def test_count_parameters_by_hand():
    # conv k3: 3*3*in*out weights + out biases; 48 -> 46 -> 23 -> 21 -> 10 -> 8 -> 4 -> 2 -> 1, so flatten is 256
    convs = (9 * 1 * 32 + 32) + (9 * 32 * 64 + 64) + (9 * 64 * 128 + 128) + (9 * 128 * 256 + 256)
    dense = 256 * 7 + 7
    model = build_model("monterrey_baseline")
    assert count_parameters(model) == convs + dense == 389_639
    model.features[0].requires_grad_(False)  # frozen parameters are not trainable ones
    assert count_parameters(model) == 389_639 - 320


def test_count_parameters_excludes_batchnorm_statistics():
    # monterrey_batchnorm: BN has gamma and beta trainable, running mean and variance not (as in Keras)
    convs = (9 * 1 * 256 + 256) + (9 * 256 * 128 + 128) + (9 * 128 * 64 + 64) + (9 * 64 * 32 + 32)
    batchnorm = 2 * (256 + 128 + 64 + 32)
    assert count_parameters(build_model("monterrey_batchnorm")) == convs + batchnorm + (32 * 7 + 7)


@pytest.mark.parametrize(
    "name, options, shape",
    [
        ("monterrey_baseline", {}, (256, 1, 1)),
        ("monterrey_batchnorm_dropout", {}, (32, 1, 1)),
        ("rna_cifar", {}, (64, 10, 10)),  # 48 'same' 48, 'valid' 46, pool 23, 'same' 23, 'valid' 21, pool 10
        ("rna_cifar", {"downsample": "stride"}, (64, 11, 11)),  # 3x3 stride-2 'same' rounds up: 46 -> 23, 21 -> 11
        ("utec_arch1", {}, (32, 1, 1)),  # 48 -> 24 (stride 2) -> 12 -> 6 -> 3 -> 1, fifth pool skipped
        ("udine_r1", {}, (500, 3, 3)),
    ],
)
def test_keras_feature_map_sizes_at_48(name, options, shape):
    model = build_model(name, image_size=48, **options)
    with torch.no_grad():
        assert model.features(torch.zeros(1, 1, 48, 48)).shape[1:] == shape


def test_utec_arch1_pools_five_times_on_large_crops():
    model = build_model("utec_arch1", image_size=160)  # facenet-pytorch's MTCNN crop size
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 5
    assert sum(isinstance(m, nn.MaxPool2d) for m in build_model("utec_arch1").modules()) == 4


def test_models_end_in_a_linear_layer_not_softmax():
    for name in SMALL:
        last = list(build_model(name, in_channels=in_channels_for(name)).modules())[-1]
        assert isinstance(last, nn.Linear), name


def test_unknown_name_lists_the_choices():
    with pytest.raises(ValueError, match="unknown model 'lenet'; choose from: monterrey_baseline, .*vgg"):
        build_model("lenet")


def test_unknown_option_and_bad_values_are_clear():
    with pytest.raises(ValueError, match="no option 'depth'; its options: width, dropout"):
        build_model("vgg", depth=19)
    with pytest.raises(ValueError, match="downsample"):
        build_model("rna_cifar", downsample="avgpool")
    with pytest.raises(ValueError, match="image_size 16 is too small"):
        build_model("monterrey_baseline", image_size=16)


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("vgg", {"width": -5}, "width=-5 must be a whole number of at least 1"),  # torch: negative dimension
        ("vgg", {"width": 0}, "width=0 must be a whole number"),  # torch: a 0-channel map, read as "image too small"
        ("vgg", {"width": "abc"}, "width='abc' must be a whole number"),  # was "not all arguments converted"
        ("vgg", {"width": True}, "width=True must be a whole number"),
        ("vgg", {"dropout": "x"}, "dropout='x' must be a number"),
        ("utec_arch2", {"hidden": -1}, "hidden=-1 must be a whole number"),
        ("udine_r1", {"channels": (50, -1)}, r"channels=\(50, -1\) must be whole numbers"),
        ("rna_cifar", {"downsample": 3}, "downsample=3 must be a word"),
        ("rna_resnet50", {"pretrained": 1}, "pretrained=1 must be True or False"),
        ("vgg", {"in_channels": 3}, "in_channels is not a model option"),  # was "got multiple values"
    ],
)
def test_options_of_the_wrong_kind_are_refused_before_building(name, options, message):
    with pytest.raises(ValueError, match=message):
        check_options(name, options)


def test_a_network_too_big_for_memory_is_a_value_error():
    with pytest.raises(ValueError, match="too big for this machine's memory"):  # 36 GB in the first conv alone
        build_model("vgg", width=1_000_000_000)


def test_pretrained_offline_raises_a_clear_error(monkeypatch):
    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models.ResNet50_Weights, "get_state_dict", offline)
    with pytest.raises(RuntimeError, match="ImageNet weights for resnet50 could not be downloaded .*drop --pretrained"):
        build_model("rna_resnet50", pretrained=True)


def test_vgg_accepts_channels_last():
    model = build_model("vgg", image_size=40).eval()
    x = torch.randn(2, 1, 40, 40)
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.to(memory_format=torch.channels_last))
    assert torch.allclose(out, expected, atol=1e-5)


def test_vgg_fc_head_flattens_the_last_map():
    # 40x40 crops pool to 2x2 after 4 stages: 512 * 2 * 2 = 2048 features into the first hidden layer
    gap = build_model("vgg", image_size=40)
    fc = build_model("vgg", image_size=40, hidden=(4096, 4096))
    linear_gap = 512 * 7 + 7
    linear_fc = (2048 * 4096 + 4096) + (4096 * 4096 + 4096) + (4096 * 7 + 7)
    assert count_parameters(fc) - count_parameters(gap) == linear_fc - linear_gap
    assert fc(torch.randn(2, 1, 40, 40)).shape == (2, 7)
    for head in ((), (64,)):  # four 2x2 pools leave nothing of an 8x8 image, whatever the head
        with pytest.raises(ValueError, match="too small"):
            build_model("vgg", image_size=8, hidden=head)
    assert count_parameters(build_model("vgg", image_size=40, hidden=64)) == count_parameters(
        build_model("vgg", image_size=40, hidden=[64])
    )
    for bad in ("abc", (64, 0), 4096.0):
        with pytest.raises(ValueError, match="option hidden=.* must be whole numbers of at least 1"):
            build_model("vgg", image_size=40, hidden=bad)


def test_vgg_upsample_doubles_every_stage_and_adds_no_weights():
    plain, doubled = build_model("vgg", image_size=40), build_model("vgg", image_size=40, upsample=2)
    assert count_parameters(doubled) == count_parameters(plain)
    with torch.no_grad():
        assert doubled.features(torch.randn(2, 1, 40, 40)).shape == (2, 512, 5, 5)  # 80 -> 40 -> 20 -> 10 -> 5
        assert doubled(torch.randn(2, 1, 40, 40)).shape == (2, 7)
    # the fc head sizes its first layer from the upsampled map: 512 * 5 * 5 inputs
    assert build_model("vgg", image_size=40, upsample=2, hidden=64).classifier[1].in_features == 512 * 5 * 5
    for bad in (0, 1.5, "2"):
        with pytest.raises(ValueError, match="option upsample=.* must be a whole number of at least 1"):
            build_model("vgg", image_size=40, upsample=bad)


def test_resnet18_keeps_full_resolution_in_its_first_stage():
    model = build_model("resnet18").eval()
    seen = []
    model.layer1.register_forward_hook(lambda module, inputs, out: seen.append(out.shape))  # returns None: output kept
    with torch.no_grad():
        assert model(torch.randn(2, 1, 48, 48)).shape == (2, 7)
    assert seen == [(2, 64, 48, 48)]
    # torchvision's resnet18 less its 7x7 RGB stem and 1000-way fc, plus a 3x3 gray stem and a 7-way fc
    reference = torchvision.models.resnet18(weights=None)
    expected = count_parameters(reference) - 7 * 7 * 3 * 64 - (512 * 1000 + 1000) + 3 * 3 * 64 + (512 * 7 + 7)
    assert count_parameters(model) == expected


def test_the_concepcion_classifier_has_the_reports_623490_parameters_and_keras_same_padding():
    model = build_model("concepcion_classifier", in_channels=3, num_classes=2, image_size=(218, 178))
    assert count_parameters(model) == 623_490  # convs 29,248 + dense 585,792 + 4,160 + 4,160 + 130
    assert model.classifier[1].in_features == 13 * 11 * 64
    assert model(torch.zeros(2, 3, 218, 178)).shape == (2, 2)
    first = model.features[:2].eval()  # Keras 'same' with kernel 2 pads one row and column at the bottom and right
    with torch.no_grad():
        first[1].weight.fill_(1)
        first[1].bias.zero_()
        x = torch.zeros(1, 3, 4, 4)
        x[0, :, 3, 3] = 1
        assert first(x)[0, 0, 3, 3] == 3 and first(x)[0, 0, 2, 2] == 3 and first(x)[0, 0, 0, 0] == 0
