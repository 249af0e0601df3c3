import pytest
import torch
import torch.nn as nn

from tools.bench import count_flops
from models import compact, load_backbone


def test_shapes_and_normalised_projection():
    m = compact(8, (1, 1, 1, 1), proj_dim=128).eval()
    x = torch.randn(3, 3, 8, 64, 64)
    assert m.features(x).shape == (3, 64, 4, 2, 2)  # (B, 8w, T/2, H/32, W/32)
    g, L = m(x, out="ssl")
    assert g.shape == (3, 128) and L.shape == (3, 4, 128)
    assert torch.allclose(g.norm(dim=-1), torch.ones(3)) and torch.allclose(L.norm(dim=-1), torch.ones(3, 4))
    # slice p of L is the head applied to time step p of the feature map
    fmap = m.features(x)
    assert torch.allclose(L[:, 2], m.project(fmap[:, :, 2].mean(dim=(2, 3))), atol=1e-6)
    c = compact(8, (2, 1, 1, 1), num_classes=5).eval()
    assert c(x).shape == (3, 5)


def test_load_backbone_strict_and_reports_skipped_keys():
    ssl = compact(8, proj_dim=32)
    clf = compact(8, num_classes=4)
    skipped = load_backbone(clf, ssl.state_dict())
    assert skipped and all(k.startswith("head.") for k in skipped)
    for k, v in ssl.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(clf.state_dict()[k], v)
    with pytest.raises(ValueError, match="--width"):
        load_backbone(compact(16, num_classes=4), ssl.state_dict(), source="x.pt")


def test_count_flops_by_hand():
    conv = nn.Conv3d(3, 4, 3, padding=1, bias=False)
    conv.out_channels  # noqa: B018
    assert count_flops(conv, torch.zeros(1, 3, 2, 5, 5)) == 2 * (3 * 27) * (4 * 2 * 5 * 5)
