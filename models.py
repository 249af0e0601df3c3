"""A compact residual 3D CNN (3D-ResNet style) with a projection head g and a linear classifier.

The paper uses 3D-ResNet-18/50 at 224 px; the CPU default here is width 16, one block per stage, at
8x32x32 (see README, Differences from the paper). A self-supervised encoder has the head and no
classifier; a teacher or student has the classifier and no head, so every parameter is used.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    """Basic 3D residual block: 3x3x3 conv-BN-ReLU, 3x3x3 conv-BN, plus a 1x1x1 shortcut on a shape change."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, stride, 1, bias=False)
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


class R3D(nn.Module):
    """Stem (3x5x5 conv, stride 1x2x2, then 1x2x2 max-pool) and four stages of `layers[i]` blocks at
    widths w, 2w, 4w, 8w; time is halved once (stage 2), space 32x in all: 8x64x64 -> 4x2x2.

    num_classes > 0 adds the classifier `fc`; proj_dim > 0 adds the projection head g of docs/method.md
    (fc -> BN -> ReLU -> fc -> BN, 128-d, L2-normalised)."""

    def __init__(self, width=16, layers=(1, 1, 1, 1), num_classes=0, proj_dim=0, dropout=0.0):
        super().__init__()
        self.arch = dict(width=width, layers=list(layers), num_classes=num_classes, proj_dim=proj_dim)
        w = width
        self.stem = nn.Sequential(
            nn.Conv3d(3, w, (3, 5, 5), (1, 2, 2), (1, 2, 2), bias=False), nn.BatchNorm3d(w),
            nn.ReLU(inplace=True), nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)))
        strides = [(1, 1, 1), (2, 2, 2), (1, 2, 2), (1, 2, 2)]
        widths = [w, 2 * w, 4 * w, 8 * w]
        stages, cin = [], w
        for cout, stride, n in zip(widths, strides, layers):
            blocks = [Block(cin if i == 0 else cout, cout, stride if i == 0 else (1, 1, 1)) for i in range(n)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.head = None
        if proj_dim:
            self.head = nn.Sequential(nn.Linear(cin, cin), nn.BatchNorm1d(cin), nn.ReLU(inplace=True),
                                      nn.Linear(cin, proj_dim), nn.BatchNorm1d(proj_dim))
        self.fc = None
        if num_classes:
            self.fc = nn.Sequential(nn.Dropout(dropout), nn.Linear(cin, num_classes))

    def features(self, x):
        """(B, 3, T, H, W) -> final feature map before pooling (B, C, T', H', W')."""
        return self.stages(self.stem(x))

    def project(self, h):
        """g(h), L2-normalised: (N, C) -> (N, proj_dim)."""
        return F.normalize(self.head(h), dim=-1)

    def forward(self, x, out="logits"):
        """out="logits": (B, num_classes). out="ssl": (g, L) with g = g(time-pooled features) (B, D) and
        L = g of each of 4 temporal slices of the feature map (B, 4, D) (docs/method.md "Clips")."""
        fmap = self.features(x)  # (B, C, T', H', W')
        if out == "logits":
            return self.fc(fmap.mean(dim=(2, 3, 4)))
        B, C = fmap.shape[:2]
        slices = F.adaptive_avg_pool3d(fmap, (4, 1, 1)).view(B, C, 4).transpose(1, 2)  # (B, 4, C)
        h = torch.cat([fmap.mean(dim=(2, 3, 4)), slices.reshape(B * 4, C)])  # (B + 4B, C): one head call
        z = self.project(h)
        return z[:B], z[B:].view(B, 4, -1)  # (B, D), (B, 4, D)


BACKBONE = ("stem.", "stages.")  # parameter-name prefixes of the backbone (what SSL pretraining hands on)


def load_backbone(model, state, source="checkpoint"):
    """Loads the backbone (stem + stages) of `state` into `model` strictly; returns the keys it skipped
    (head / classifier), which the caller reports. A width or depth mismatch raises with `source` named."""
    backbone = {k: v for k, v in state.items() if k.startswith(BACKBONE)}
    skipped = sorted(k for k in state if k not in backbone)
    own = {k: v for k, v in model.state_dict().items() if k.startswith(BACKBONE)}
    if set(own) != set(backbone) or any(own[k].shape != backbone[k].shape for k in own):
        raise ValueError(f"{source}: backbone does not match this model (different --width or --layers?)")
    missing, unexpected = model.load_state_dict(backbone, strict=False)
    assert not unexpected and all(k.startswith(("head.", "fc.")) for k in missing), (missing, unexpected)
    return skipped

