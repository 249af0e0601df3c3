"""The networks by name (`build`): each a 3D CNN backbone (stem + stages) with the projection head g of the
self-supervised encoders and/or a linear classifier, behind one interface (`features`, `forward`).

  compact  the CPU default: residual blocks at widths w, 2w, 4w, 8w (--width, --layers), 8x32x32 clips
  r3d18    the release's R3D-18: torchvision's r3d_18 with layer4's first conv dilated in time (models/model.py)
  r3d50    the release's R3D-50: pytorchvideo's slow_r50 (what every released config names)

An encoder has the head and no classifier; a teacher or student has the classifier and no head.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    """Basic 3D residual block: 3x3x3 conv-BN-ReLU (dilated `dilation` in time), 3x3x3 conv-BN, plus a
    1x1x1 conv-BN shortcut on a shape change; ReLU after the sum (torchvision's BasicBlock)."""

    def __init__(self, cin, cout, stride, dilation=1):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, stride, (dilation, 1, 1), (dilation, 1, 1), bias=False)
        self.bn1 = nn.BatchNorm3d(cout)
        self.conv2 = nn.Conv3d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm3d(cout)
        self.short = None
        if stride != (1, 1, 1) or cin != cout:
            self.short = nn.Sequential(nn.Conv3d(cin, cout, 1, stride, bias=False), nn.BatchNorm3d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.short is None else self.short(x)))


class Bottleneck(nn.Module):
    """pytorchvideo's bottleneck: conv a (kt x 1 x 1, to `inner` channels), conv b (1x3x3, the spatial stride),
    conv c (1x1x1, to `cout`), each with BN (ReLU after a and b); a 1x1x1 conv-BN shortcut on a shape change;
    ReLU after the sum. c's BN starts at 0, so each block starts as its shortcut (pytorchvideo's init)."""

    def __init__(self, cin, inner, cout, kt, s):
        super().__init__()
        self.a = nn.Sequential(nn.Conv3d(cin, inner, (kt, 1, 1), 1, (kt // 2, 0, 0), bias=False),
                               nn.BatchNorm3d(inner), nn.ReLU(inplace=True))
        self.b = nn.Sequential(nn.Conv3d(inner, inner, (1, 3, 3), (1, s, s), (0, 1, 1), bias=False),
                               nn.BatchNorm3d(inner), nn.ReLU(inplace=True))
        self.c = nn.Sequential(nn.Conv3d(inner, cout, 1, bias=False), nn.BatchNorm3d(cout))
        nn.init.zeros_(self.c[1].weight)
        self.short = None
        if s != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv3d(cin, cout, 1, (1, s, s), bias=False), nn.BatchNorm3d(cout))

    def forward(self, x):
        return F.relu(self.c(self.b(self.a(x))) + (x if self.short is None else self.short(x)))


class VideoNet(nn.Module):
    """A backbone (`stem`, `stages`: C channels out) with, where asked, the projection head g (proj_dim > 0:
    C -> hidden (bias), BN, ReLU, hidden -> proj_dim, BN, L2-normalised) and the classifier (num_classes > 0:
    dropout, then a linear layer on the pooled features). `arch` names it in checkpoints; `head_per_call`: the
    global vector and each slice through g in calls of their own (BatchNorm statistics each call's, as released)."""

    def __init__(self, arch, stem, stages, C, num_classes=0, proj_dim=0, dropout=0.0, hidden=None,
                 head_bias=True, head_per_call=False):
        super().__init__()
        self.arch = dict(arch, num_classes=num_classes, proj_dim=proj_dim)
        self.stem, self.stages, self.head_per_call = stem, stages, head_per_call
        self.head = None
        if proj_dim:
            hidden = hidden or C
            self.head = nn.Sequential(nn.Linear(C, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                      nn.Linear(hidden, proj_dim, bias=head_bias), nn.BatchNorm1d(proj_dim))
        self.fc = None
        if num_classes:
            self.fc = nn.Sequential(nn.Dropout(dropout), nn.Linear(C, num_classes))

    def features(self, x):
        """(B, 3, T, H, W) -> final feature map before pooling (B, C, T', H', W')."""
        return self.stages(self.stem(x))

    def project(self, h):
        """g(h), L2-normalised: (N, C) -> (N, proj_dim)."""
        return F.normalize(self.head(h), dim=-1)

    def forward(self, x, out="logits", groups=1, local=None):
        """out="logits": (B, num_classes). out="ssl": (g, L) with g = g(time-pooled features) (B, D) and
        L = g of each of 4 temporal slices of the feature map (B, 4, D) (docs/method.md "Clips"); with `groups`
        > 1, each of `groups` equal parts of the batch through the network alone (BatchNorm statistics each
        part's: one clip type a part, as the release's SSL forward). `local`: how many leading parts need L; a
        released network puts the other parts' global vectors alone through g (mlp.py's dense clips: L zeros)."""
        if out == "logits":
            return self.fc(self.features(x).mean(dim=(2, 3, 4)))
        local = groups if local is None else local
        parts = [self.embed(part, slices=i < local) for i, part in enumerate(x.chunk(groups))]
        return torch.cat([g for g, _ in parts]), torch.cat([L for _, L in parts])

    def embed(self, x, slices=True):
        """(B, 3, T, H, W) -> g (B, D), L (B, 4, D); without `slices`, a released network's L is zeros."""
        fmap = self.features(x)  # (B, C, T', H', W')
        B, C = fmap.shape[:2]
        if self.head_per_call and not slices:  # a dense clip's global vector alone (mlp.py, clip type 'd')
            g = self.project(fmap.mean(dim=(2, 3, 4)))  # (B, D)
            return g, g.new_zeros(B, 4, g.shape[1])
        slices = F.adaptive_avg_pool3d(fmap, (4, 1, 1)).view(B, C, 4).transpose(1, 2)  # (B, 4, C)
        if self.head_per_call:  # g of the global vector, then of each slice: 5 calls of B vectors
            g = self.project(fmap.mean(dim=(2, 3, 4)))  # (B, D)
            return g, torch.stack([self.project(h) for h in slices.unbind(1)], dim=1)  # (B, D), (B, 4, D)
        h = torch.cat([fmap.mean(dim=(2, 3, 4)), slices.reshape(B * 4, C)])  # (B + 4B, C): one head call
        z = self.project(h)
        return z[:B], z[B:].view(B, 4, -1)  # (B, D), (B, 4, D)


def compact(width=16, layers=(1, 1, 1, 1), **kw):
    """The CPU default: stem 3x5x5 conv (stride 1x2x2) and a 1x3x3 max-pool (stride 1x2x2), four stages of
    `layers[i]` basic blocks at widths w, 2w, 4w, 8w; time halved once (stage 2), space 32x in all: 8x32x32 ->
    4x1x1. Head: 8w -> 8w, BN, ReLU, 8w -> 128 (bias), BN; one call over the global and slice vectors."""
    w = width
    stem = nn.Sequential(nn.Conv3d(3, w, (3, 5, 5), (1, 2, 2), (1, 2, 2), bias=False), nn.BatchNorm3d(w),
                         nn.ReLU(inplace=True), nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)))
    strides, stages, cin = [(1, 1, 1), (2, 2, 2), (1, 2, 2), (1, 2, 2)], [], w
    for cout, stride, n in zip([w, 2 * w, 4 * w, 8 * w], strides, layers):
        stages.append(nn.Sequential(*[Block(cin if i == 0 else cout, cout, stride if i == 0 else (1, 1, 1))
                                      for i in range(n)]))
        cin = cout
    arch = dict(name="compact", width=width, layers=list(layers))
    return VideoNet(arch, stem, nn.Sequential(*stages), cin, **kw)


def r3d18(**kw):
    """The release's R3D-18 (models/model.py, build_r3d_backbone): torchvision's r3d_18 layout, stem 3x7x7 conv
    (stride 1x2x2, no pool), stages of 2 basic blocks at 64, 128, 256, 512; time and space halved in stages 2
    and 3; stage 4 halves space only, its first conv dilated 2 in time: 16x112x112 -> 4x7x7. Head as models/mlp.py
    `mlp`: 512 -> 512, BN, ReLU, 512 -> 128 (no bias), BN, each vector in its own call. Convs start from
    kaiming-normal (fan out), as torchvision's."""
    stem = nn.Sequential(nn.Conv3d(3, 64, (3, 7, 7), (1, 2, 2), (1, 3, 3), bias=False), nn.BatchNorm3d(64),
                         nn.ReLU(inplace=True))
    strides, stages, cin = [(1, 1, 1), (2, 2, 2), (2, 2, 2), (1, 2, 2)], [], 64
    for k, (cout, stride) in enumerate(zip([64, 128, 256, 512], strides)):
        stages.append(nn.Sequential(Block(cin, cout, stride, dilation=2 if k == 3 else 1), Block(cout, cout, (1, 1, 1))))
        cin = cout
    net = VideoNet(dict(name="r3d18", width=64, layers=[2, 2, 2, 2]), stem, nn.Sequential(*stages), 512,
                   hidden=512, head_bias=False, head_per_call=True, **kw)
    return kaiming(net)


def r3d50(**kw):
    """The release's R3D-50 (models/model.py: slow_r50 without its head): pytorchvideo's slow_r50, stem 1x7x7
    conv (stride 1x2x2) and a 1x3x3 max-pool (stride 1x2x2); bottleneck stages of 3, 4, 6, 3 blocks (inner
    64, 128, 256, 512 channels, out 4x that), conv a 1x1x1 in stages 1-2 and 3x1x1 in 3-4, space halved in
    stages 2-4, time never: 16x112x112 -> 16x4x4, 8x224x224 -> 8x7x7. Head as models/mlp.py `mlp_r50`: 2048 ->
    128, BN, ReLU, 128 -> 128 (no bias), BN, each vector in its own call."""
    stem = nn.Sequential(nn.Conv3d(3, 64, (1, 7, 7), (1, 2, 2), (0, 3, 3), bias=False), nn.BatchNorm3d(64),
                         nn.ReLU(inplace=True), nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)))
    stages, cin = [], 64
    for inner, n, kt, s in zip([64, 128, 256, 512], [3, 4, 6, 3], [1, 1, 3, 3], [1, 2, 2, 2]):
        stages.append(nn.Sequential(*[Bottleneck(cin if i == 0 else 4 * inner, inner, 4 * inner, kt, s if i == 0 else 1)
                                      for i in range(n)]))
        cin = 4 * inner
    net = VideoNet(dict(name="r3d50", width=64, layers=[3, 4, 6, 3]), stem, nn.Sequential(*stages), 2048,
                   hidden=128, head_bias=False, head_per_call=True, **kw)
    return kaiming(net)


def kaiming(net):
    """Every conv from kaiming-normal (fan out, ReLU gain), as torchvision and pytorchvideo start theirs."""
    for m in net.modules():
        if isinstance(m, nn.Conv3d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return net


NETWORKS = {"compact": compact, "r3d18": r3d18, "r3d50": r3d50}


def build(name, num_classes=0, proj_dim=0, dropout=0.0, width=16, layers=(1, 1, 1, 1)):
    """The network `name` (a key of NETWORKS); `width` and `layers` size the compact one only."""
    kw = dict(num_classes=num_classes, proj_dim=proj_dim, dropout=dropout)
    return compact(width, layers, **kw) if name == "compact" else NETWORKS[name](**kw)


BACKBONE = ("stem.", "stages.")  # parameter-name prefixes of the backbone (what SSL pretraining hands on)


def load_backbone(model, state, source="checkpoint"):
    """Loads the backbone (stem + stages) of `state` into `model` strictly; returns the keys it skipped
    (head / classifier), which the caller reports. Another network's backbone raises with `source` named."""
    backbone = {k: v for k, v in state.items() if k.startswith(BACKBONE)}
    skipped = sorted(k for k in state if k not in backbone)
    own = {k: v for k, v in model.state_dict().items() if k.startswith(BACKBONE)}
    if set(own) != set(backbone) or any(own[k].shape != backbone[k].shape for k in own):
        raise ValueError(f"{source}: backbone does not match this model ({model.arch['name']}; another --arch, "
                         "--width or --layers?)")
    missing, unexpected = model.load_state_dict(backbone, strict=False)
    assert not unexpected and all(k.startswith(("head.", "fc.")) for k in missing), (missing, unexpected)
    return skipped
