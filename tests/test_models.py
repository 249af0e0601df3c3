import pytest
import torch
import torch.nn as nn

from tools.diagnostics.bench import count_flops
import torch.nn.functional as F

import models
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


# The released networks pinned against the implementations they reproduce. Numbers taken once, outside this
# project (a scratch venv: torch 2.14.1, torchvision 0.29.1, pytorchvideo 0.1.5, on the CPU), from
#   r3d18: torchvision.models.video.r3d_18(weights=None) with the release's two edits of layer4[0]
#          (models/model.py, build_r3d_backbone): conv1 stride 1x2x2, padding 2x1x1, dilation 2x1x1;
#          downsample stride 1x2x2; backbone = stem + layer1..4; head = models/mlp.py `mlp`
#   r3d50: pytorchvideo.models.hub.slow_r50(pretrained=False), backbone = blocks[0..4]; head = mlp.py `mlp_r50`
# classifier: Linear(C, 101); FLOPs: torch.utils.flop_counter of the backbone at batch 1 (2 per multiply-add).
REFERENCE = {
    "r3d18": dict(backbone=33_166_272, head=329_472, classifier=51_813, maps={(16, 112): (512, 4, 7, 7),
                  (8, 224): (512, 2, 14, 14)}, flops={(16, 112): 86_273_818_624, (8, 224): 172_547_637_248}),
    "r3d50": dict(backbone=31_634_496, head=279_168, classifier=206_949, maps={(16, 112): (2048, 16, 4, 4),
                  (8, 224): (2048, 8, 7, 7)}, flops={(16, 112): 43_973_476_352, (8, 224): 83_480_018_944}),
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_released_networks_against_the_libraries(name):
    """Parameter counts of backbone, head and classifier, the final map's shape and the FLOPs at 16x112x112 and
    8x224x224, as torchvision's / pytorchvideo's builds give them (on the meta device: shapes, no arithmetic)."""
    from torch.utils.flop_counter import FlopCounterMode

    want = REFERENCE[name]
    with torch.device("meta"):
        net = models.build(name, num_classes=101, proj_dim=128)
    count = lambda prefix: sum(p.numel() for k, p in net.named_parameters() if k.startswith(prefix))  # noqa: E731
    assert count(models.BACKBONE) == want["backbone"]
    assert count("head.") == want["head"] and count("fc.") == want["classifier"]
    for (T, S), shape in want["maps"].items():
        with FlopCounterMode(display=False) as counter:
            fmap = net.features(torch.empty(1, 3, T, S, S, device="meta"))
        assert tuple(fmap.shape[1:]) == shape and counter.get_total_flops() == want["flops"][(T, S)]


def test_released_head_per_call_against_a_by_hand_forward():
    """r3d18 and r3d50 put the global vector and each of the 4 slices through g in calls of their own
    (BatchNorm in training mode: each call's own statistics), as models/mlp.py does; the compact network's one
    call over all 5B vectors gives other numbers."""
    torch.manual_seed(0)
    x = torch.randn(3, 3, 16, 32, 32)
    for name in ("r3d18", "r3d50"):
        net = models.build(name, proj_dim=128).train()
        g, L = net(x, out="ssl")
        with torch.no_grad():
            fmap = net.features(x)  # (3, C, T', H', W')
            T = fmap.shape[2]
            h = [fmap.mean(dim=(2, 3, 4))] + [fmap[:, :, i * T // 4 : (i + 1) * T // 4].mean(dim=(2, 3, 4))
                                               for i in range(4)]  # 5 x (3, C): global, slices 1..4
            z = [F.normalize(net.head(v), dim=-1) for v in h]  # one call each: its own BN statistics
            joint = F.normalize(net.head(torch.cat(h)), dim=-1)[:3]  # one call over all 15 vectors
        assert torch.allclose(g, z[0], atol=1e-5) and torch.allclose(L, torch.stack(z[1:], dim=1), atol=1e-5)
        assert not torch.allclose(g, joint, atol=1e-3)
    assert not compact(8, proj_dim=16).head_per_call


def test_released_dense_clips_take_their_global_vector_alone():
    """forward(x, out="ssl", groups=10, local=2), r3d18 as pretraining.py runs it: the 2 sparse parts through g as
    global then 4 slices, the 8 dense parts their global vector alone (L zeros): the head's BatchNorm running
    statistics equal a by-hand replay of those 18 calls."""
    import copy

    torch.manual_seed(0)
    net = models.build("r3d18", proj_dim=16).train()
    ref = copy.deepcopy(net)
    x = torch.randn(10 * 2, 3, 4, 16, 16)
    g, L = net(x, out="ssl", groups=10, local=2)
    for i, part in enumerate(x.split(2)):
        fmap = ref.features(part)  # (2, 512, T', H', W')
        want_g = ref.project(fmap.mean(dim=(2, 3, 4)))
        assert torch.allclose(g[2 * i : 2 * i + 2], want_g, atol=1e-5)
        if i < 2:  # sparse: its 4 slices, each a call
            T = fmap.shape[2]
            for k in range(4):
                ref.project(fmap[:, :, k * T // 4 : (k + 1) * T // 4].mean(dim=(2, 3, 4)) if T >= 4 else fmap.mean(dim=(2, 3, 4)))
        else:
            assert not L[2 * i : 2 * i + 2].any()
    for a, b in zip(net.head.modules(), ref.head.modules()):
        if isinstance(a, torch.nn.BatchNorm1d):
            assert torch.allclose(a.running_mean, b.running_mean, atol=1e-6) and a.num_batches_tracked == 18


def test_groups_put_each_part_through_alone():
    """forward(x, out="ssl", groups=k): each of k equal parts of the batch through the network on its own
    (BatchNorm's statistics each part's), against a by-hand loop; one forward of all gives other numbers."""
    torch.manual_seed(0)
    net = compact(8, proj_dim=16).train()
    x = torch.randn(10 * 3, 3, 4, 32, 32) + torch.arange(10).repeat_interleave(3).view(-1, 1, 1, 1, 1)  # parts differ
    g, L = net(x, out="ssl", groups=10)
    with torch.no_grad():
        want = [net(part, out="ssl") for part in x.split(3)]  # one part a call
        joint_g, _ = net(x, out="ssl")
    assert torch.allclose(g, torch.cat([w[0] for w in want]), atol=1e-5)
    assert torch.allclose(L, torch.cat([w[1] for w in want]), atol=1e-5)
    assert not torch.allclose(g, joint_g, atol=1e-3)


def test_another_network_is_refused_naming_both():
    """A backbone of one network loaded into another: one line naming this network and the flags."""
    ssl = models.build("r3d18", proj_dim=128)
    with pytest.raises(ValueError, match=r"x.pt: backbone does not match this model \(compact; another --arch"):
        load_backbone(compact(8, num_classes=4), ssl.state_dict(), source="x.pt")
    assert models.build("compact", num_classes=3).arch == dict(name="compact", width=16, layers=[1, 1, 1, 1],
                                                               num_classes=3, proj_dim=0)
    assert models.build("r3d50", num_classes=3, dropout=0.5).fc[0].p == 0.5


def test_a_checkpoint_of_another_network_is_refused_naming_both():
    """train.load_into: a checkpoint of one network into another stops with one line naming both."""
    import train

    saved = compact(8, num_classes=3)
    ckpt = {"arch": saved.arch, "model": saved.state_dict()}
    with pytest.raises(train.StageError, match=r"^x.pt: saved model \{'name': 'compact'.*differs from this run's "
                                               r"\{'name': 'r3d18'.*\(--arch, --width, --layers\)$"):
        train.load_into(models.build("r3d18", num_classes=3), ckpt, "x.pt")
