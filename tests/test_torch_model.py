"""The CIFAR ResNets and the expander: names and shapes against torchvision, structure by hand."""
import pytest
import torch
import torchvision

from shared.errors import UserError
from torch_impl.model import Expander, ResNet, VICReg


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
def test_width64_matches_torchvision_except_stem_and_fc(arch):
    ours = {k: tuple(v.shape) for k, v in ResNet(arch, 64).state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in getattr(torchvision.models, arch)().state_dict().items()
              if not k.startswith("fc.")}
    assert ours.keys() == theirs.keys()
    for name, shape in theirs.items():
        expected = (64, 3, 3, 3) if name == "conv1.weight" else shape
        assert ours[name] == expected, name


@pytest.mark.parametrize("arch,width,dim", [("resnet18", 64, 512), ("resnet18", 16, 128),
                                            ("resnet34", 8, 64), ("resnet50", 8, 256)])
def test_backbone_output_dim(arch, width, dim):
    model = ResNet(arch, width)
    assert model.feature_dim == dim
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, dim)


@pytest.mark.parametrize("arch,expansion", [("resnet18", 1), ("resnet50", 4)])
def test_last_width_widens_only_the_last_stage(arch, expansion):
    model, standard = ResNet(arch, 8, last_width=40), ResNet(arch, 8)
    assert model.feature_dim == 40 * expansion
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 40 * expansion)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    before = {k: tuple(v.shape) for k, v in standard.state_dict().items()}
    assert shapes.keys() == before.keys()
    assert all(shapes[k] == before[k] for k in shapes if not k.startswith("layer4."))
    # the first block takes layer 3's 32 x expansion channels to 40 planes at stride 2
    first_conv = "layer4.0.conv1.weight" if expansion == 1 else "layer4.0.conv2.weight"
    assert shapes[first_conv][0] == 40
    assert shapes["layer4.0.downsample.0.weight"] == (40 * expansion, 32 * expansion, 1, 1)


def test_resnet18_parameter_count_is_torchvisions_minus_fc_and_stem():
    tv = torchvision.models.resnet18()
    tv_count = sum(p.numel() for n, p in tv.named_parameters() if not n.startswith("fc."))
    ours = sum(p.numel() for p in ResNet("resnet18", 64).parameters())
    assert ours == tv_count - 64 * 3 * 7 * 7 + 64 * 3 * 3 * 3


def test_cifar_stem_keeps_resolution():
    model = ResNet("resnet18", 8)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert model.conv1.padding == (1, 1) and model.conv1.bias is None
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    stem = model.relu(model.bn1(model.conv1(torch.zeros(1, 3, 32, 32))))
    assert model.layer4(model.layer3(model.layer2(model.layer1(stem)))).shape[-2:] == (4, 4)


def test_expander_structure():
    net = Expander(512, [2048, 2048, 1024])
    kinds = [type(m).__name__ for m in net]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert net[0].bias is not None and net[-1].bias is None
    assert net[-1].weight.shape == (1024, 2048)


def test_vicreg_embeds_to_last_expander_width():
    model = VICReg("resnet18", 4, [16, 8])
    assert model(torch.zeros(3, 3, 32, 32)).shape == (3, 8)


def test_unknown_arch_is_an_error():
    with pytest.raises(UserError, match="unknown architecture"):
        ResNet("resnet19", 8)
