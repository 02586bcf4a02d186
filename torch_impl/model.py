"""ResNet backbones with a CIFAR or ImageNet stem, the VICReg expander, and the two put together.

With width 64 the backbone's parameter names and shapes are torchvision's `resnet18/34/50` (minus
`fc`). The stem follows the image size (shared.archs.stem_for): "cifar", a 3x3 stride-1
convolution without max-pool, as is usual for 32x32 inputs, or "imagenet", torchvision's 7x7
stride-2 convolution and 3x3 stride-2 max-pool.
Initialisation is PyTorch's module default (kaiming-uniform for convs and linears, BN weight 1 and
bias 0); jax_impl.model reproduces the same distributions.
"""
from __future__ import annotations

import torch
from torch import nn

from shared.archs import BLOCKS, EXPANSION, check_arch, check_stem, stage_planes


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs; out = relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""

    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = _conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(_conv1x1(cin, planes, stride), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, as torchvision's v1.5), 1x1 expand by 4, plus the shortcut."""

    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        cout = planes * EXPANSION["bottleneck"]
        self.conv1 = _conv1x1(cin, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, cout)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(_conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + shortcut)


class ResNet(nn.Module):
    """ResNet: [N, 3, H, W] float -> pooled features [N, feature_dim] (512 or 2048 at width 64).
    stem: "cifar" or "imagenet" (the module docstring); last_width: the last stage's planes
    (0: 8 x width; shared.archs.stage_planes)."""

    def __init__(self, arch: str = "resnet18", width: int = 64, stem: str = "cifar",
                 last_width: int = 0):
        super().__init__()
        check_arch(arch)
        check_stem(stem)
        kind, depths = BLOCKS[arch]
        block = BasicBlock if kind == "basic" else Bottleneck
        if stem == "cifar":
            self.conv1 = _conv3x3(3, width)
        else:
            self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if stem == "imagenet" else nn.Identity()
        cin = width
        widths = stage_planes(arch, width, last_width)
        for stage, (depth, planes) in enumerate(zip(depths, widths)):
            blocks = []
            for i in range(depth):
                blocks.append(block(cin, planes, stride=2 if stage > 0 and i == 0 else 1))
                cin = planes * EXPANSION[kind]
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        self.feature_dim = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The input takes the weights' layout: given one tensor in channels_last, oneDNN runs a
        # convolution with its channels_last kernels, which corrupt memory or hang for fewer than
        # 8 channels on AVX2 CPUs (runtime.memory_format keeps narrow networks contiguous).
        x = x.contiguous(memory_format=layout_of(self.conv1.weight))
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(x.mean(dim=(2, 3)), 1)


def layout_of(weight: torch.Tensor) -> torch.memory_format:
    """The memory format a 4-d convolution weight is stored in."""
    channels_last = weight.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


class Expander(nn.Sequential):
    """[N, in_dim] -> [N, dims[-1]]: (Linear+BN+ReLU) for all but the last layer, the last Linear
    without bias (an nn.Sequential, so its parameters are named "0.weight", "1.weight", ...)."""

    def __init__(self, in_dim: int, dims: list[int]):
        layers: list[nn.Module] = []
        widths = [in_dim, *dims]
        for i in range(len(dims) - 1):
            layers += [nn.Linear(widths[i], widths[i + 1]), nn.BatchNorm1d(widths[i + 1]),
                       nn.ReLU(inplace=True)]
        layers.append(nn.Linear(widths[-2], widths[-1], bias=False))
        super().__init__(*layers)


class VICReg(nn.Module):
    """Backbone + expander: images [N, 3, H, W] -> embeddings [N, dims[-1]] (the loss's input)."""

    def __init__(self, arch: str, width: int, mlp_dims: list[int], stem: str = "cifar",
                 last_width: int = 0):
        super().__init__()
        self.backbone = ResNet(arch, width, stem, last_width)
        self.projector = Expander(self.backbone.feature_dim, mlp_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))


def backbone_of(model: VICReg) -> ResNet:
    """VICReg's backbone, a module of its own: images [N, 3, H, W] -> features [N, F] (its
    weights are the model's)."""
    return model.backbone


def build_model(arch: str, width: int, mlp_dims: list[int], stem: str = "cifar",
                last_width: int = 0) -> VICReg:
    """The VICReg network with `stem` ("cifar" or "imagenet") and the last stage `last_width`
    wide (0: 8 x width), float32 on the CPU (UserError for an unknown arch); its weights are drawn
    by init_variables. The global random generator is left as it was."""
    check_arch(arch)
    with torch.random.fork_rng(devices=[]):
        return VICReg(arch, width, mlp_dims, stem, last_width)


def init_variables(model: nn.Module, seed: int) -> nn.Module:
    """`model` with every parameter and BatchNorm statistic drawn afresh from torch's default
    initialisation (kaiming-uniform convs and linears, BN weight 1 and bias 0) with generator seed
    `seed`, in the order the modules were built; returns the model. The global generator's state
    is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return model
