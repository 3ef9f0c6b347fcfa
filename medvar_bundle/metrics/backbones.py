"""The three feature networks, laid out so that their published weight files load as they are.

- :func:`fid_inception_v3`: torchvision's InceptionV3 with pytorch-fid's patches, the network of
  ``pt_inception-2015-12-05-6726825d.pth`` (the TF FID graph ported by pytorch-fid).
- :class:`KerasResNet50`: the Keras ResNet-50 layout (biased convolutions, stride in the first
  1×1 convolution of a block, BatchNorm eps 1.001e-5) of RadImageNet's weights as ported to
  PyTorch in ``RadImageNet-ResNet50_notop.pth`` (Warvito/radimagenet-models, used by MONAI).
- :class:`ClipVisionTransformer`: OpenAI CLIP's image tower (``visual.*`` of ``ViT-L-14-336px.pt``;
  open_clip's OpenAI checkpoints use the same names).

Each returns pooled features ``(B, D)`` from a preprocessed 3-channel batch; the preprocessing
lives in :mod:`medvar_bundle.metrics.extractors`.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.inception import InceptionA, InceptionC, InceptionE


def _tf_avg_pool(x: Tensor) -> Tensor:
    """TF's 3×3 average pool: padded zeros are not counted."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _max_pool(x: Tensor) -> Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


class _TFPoolBranch:
    """pytorch-fid's patch of an Inception block: the TF graph pools the last branch differently.

    torchvision's blocks return their branches as a list whose last entry is
    ``branch_pool(avg_pool(x))``; it is recomputed here with ``pool`` (one extra 1×1 convolution per
    block, in exchange for not copying the blocks).
    """

    pool = staticmethod(_tf_avg_pool)

    def _forward(self, x: Tensor) -> list[Tensor]:
        outputs = super()._forward(x)
        outputs[-1] = self.branch_pool(self.pool(x))
        return outputs


class FIDInceptionA(_TFPoolBranch, InceptionA):
    pass


class FIDInceptionC(_TFPoolBranch, InceptionC):
    pass


class FIDInceptionE1(_TFPoolBranch, InceptionE):
    pass


class FIDInceptionE2(_TFPoolBranch, InceptionE):
    """The last block of the TF FID graph max-pools (a quirk of that graph, kept for comparability)."""

    pool = staticmethod(_max_pool)


def fid_inception_v3() -> torchvision.models.Inception3:
    """InceptionV3 as pytorch-fid builds it for FID: 1008 classes, no aux head, patched blocks.

    In eval mode with ``fc`` replaced by ``nn.Identity`` it returns the 2048-d pool3 features of a
    299² input in [-1, 1].
    """
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008)
    net.Mixed_5b = FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = FIDInceptionE1(1280)
    net.Mixed_7c = FIDInceptionE2(2048)
    return net


def _keras_bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1.001e-5)


class KerasBottleneck(nn.Module):
    """Keras ResNet-50 v1 block: 1×1 (strided) → 3×3 → 1×1 ×4, biased convolutions."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(inplanes, planes, 1, stride=stride), _keras_bn(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, padding=1), _keras_bn(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, 4 * planes, 1), _keras_bn(4 * planes)
        self.downsample = None
        if stride != 1 or inplanes != 4 * planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, 4 * planes, 1, stride=stride), _keras_bn(4 * planes))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class KerasResNet50(nn.Module):
    """ResNet-50 without top in the Keras layout; ``(B, 3, H, W)`` → globally averaged ``(B, 2048)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3)
        self.bn1 = _keras_bn(64)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = 64
        for i, (planes, blocks, stride) in enumerate(((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)), start=1):
            rest = [KerasBottleneck(4 * planes, planes) for _ in range(blocks - 1)]
            setattr(self, f"layer{i}", nn.Sequential(KerasBottleneck(inplanes, planes, stride), *rest))
            inplanes = 4 * planes

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean(dim=(2, 3))


class QuickGELU(nn.Module):
    """CLIP's GELU approximation ``x · sigmoid(1.702 x)``."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block of CLIP (names as in OpenAI's state dict)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=QuickGELU(), c_proj=nn.Linear(4 * width, width))
        )
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class ClipVisionTransformer(nn.Module):
    """CLIP image encoder; ``(B, 3, image_size, image_size)`` normalised → embeddings ``(B, embed_dim)``.

    Defaults are ViT-L/14 at 336 px (width 1024, 24 layers, 16 heads, 768-d embedding). The
    state dict is OpenAI's ``visual.*`` without the prefix: ``conv1.weight``, ``class_embedding``,
    ``positional_embedding`` ``(grid² + 1, width)``, ``ln_pre``, ``transformer.resblocks.<i>.*``,
    ``ln_post``, ``proj`` ``(width, embed_dim)``.
    """

    def __init__(
        self,
        image_size: int = 336,
        patch_size: int = 14,
        width: int = 1024,
        layers: int = 24,
        heads: int = 16,
        embed_dim: int = 768,
    ) -> None:
        super().__init__()
        self.image_size = image_size
        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((image_size // patch_size) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        blocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])
        self.transformer = nn.ModuleDict({"resblocks": blocks})
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, embed_dim))

    @classmethod
    def from_state_dict_shapes(cls, state: dict[str, Tensor]) -> ClipVisionTransformer:
        """The architecture a CLIP ``visual`` state dict was saved from (as OpenAI's
        ``build_model`` infers it; heads = width / 64)."""
        width, _, patch, _ = state["conv1.weight"].shape
        grid = round((state["positional_embedding"].shape[0] - 1) ** 0.5)
        layers = len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")})
        return cls(grid * patch, patch, width, layers, max(1, width // 64), state["proj"].shape[1])

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x).flatten(2).transpose(1, 2)
        cls_token = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([cls_token, x], dim=1) + self.positional_embedding.to(x.dtype))
        x = self.transformer["resblocks"](x)
        return self.ln_post(x[:, 0]) @ self.proj
