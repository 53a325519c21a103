"""
Tests for model.py: python -m pytest -q _tests_model.py  (merged into test_all.py later)
"""
import os
from dataclasses import asdict

import pytest
import torch

import model

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, '..', 'shared')
VECTORS = os.path.join(SHARED, 'reference', 'vectors.pt')
needs_shared = pytest.mark.skipif(not os.path.exists(VECTORS), reason='needs ../shared')


@pytest.fixture(scope='session')
def vectors():
    return torch.load(VECTORS, weights_only=True)


TINY = model.SwinIRConfig(embed_dim=12, depths=[2, 1], num_heads=[2, 3], window_size=4)


def n_params(net):
    return sum(p.numel() for p in net.parameters())


# ---------------------------------------------------------------- model: SwinIR, discriminator, VGG, loading

@needs_shared
def test_swinir_matches_reference_and_loads_official_forms(vectors):
    ref = vectors['swinir']
    official = ref['state_dict']  # official names, with relative_position_index / attn_mask buffers
    assert any(k.endswith('attn_mask') for k in official)
    derived = ('relative_position_index', 'attn_mask')
    forms = [official, {'params_ema': official, 'params': {}}, {'params': official},
             {'module.' + k: t for k, t in official.items()},
             {'_orig_mod.' + k: t for k, t in official.items() if not k.endswith(derived)}]
    for obj in forms:
        net, cfg = model.load_generator(obj)  # config inferred from the key shapes
        assert cfg == model.SwinIRConfig(**dict(ref['config'], img_size=64))
        with torch.no_grad():
            out = net(ref['input'])  # 18x22: not a multiple of the window
        assert out.shape == ref['output'].shape
        assert (out - ref['output']).abs().max() <= 1e-5
    # the other attention paths: one image (inner windows unmasked), and with autograd on (explicit softmax)
    with torch.no_grad():
        assert (net(ref['input'][1:]) - ref['output'][1:]).abs().max() <= 1e-5
    assert (net(ref['input']) - ref['output']).abs().max() <= 1e-5
    saved = net.state_dict()
    assert not any(k.endswith(derived) for k in saved) and set(saved) == {k for k in official if not k.endswith(derived)}


@needs_shared
def test_seed_parameter_counts(vectors):
    assert model.SwinIRConfig() == model.SwinIRConfig(**vectors['swinir_seed_config'])
    assert n_params(model.SwinIR()) == vectors['swinir_seed_params'] == 2_251_758
    assert n_params(model.UNetDiscriminatorSN(model.UNetConfig(num_feat=24))) == vectors['unetd_seed_params'] == 616_057


@needs_shared
def test_unet_discriminator_matches_reference(vectors):
    ref = vectors['unetd']
    net = model.UNetDiscriminatorSN(model.UNetConfig(**ref['config']))
    net.load_state_dict(ref['state_dict'])
    assert set(net.state_dict()) == set(ref['state_dict'])  # weight_orig / weight_u / weight_v
    with torch.no_grad():
        out = net.eval()(ref['input'])
    assert (out - ref['output']).abs().max() <= 1e-5


@pytest.mark.parametrize('upsampler,resi,scale', [('pixelshuffledirect', '1conv', 4), ('pixelshuffle', '3conv', 4),
                                                  ('pixelshuffle', '1conv', 3), ('nearest+conv', '3conv', 4)])
def test_swinir_variants_odd_sizes_roundtrip_and_inference(tmp_path, upsampler, resi, scale):
    cfg = model.SwinIRConfig(**dict(asdict(TINY), upsampler=upsampler, resi_connection=resi, upscale=scale))
    torch.manual_seed(0)
    net = model.SwinIR(cfg)
    assert model.infer_config(net.state_dict()) == cfg
    x = torch.rand(2, 3, 9, 13)
    y = net(x)
    assert y.shape == (2, 3, 9 * scale, 13 * scale) and torch.isfinite(y).all()
    y.mean().backward()
    assert all(p.grad is not None for p in net.parameters())
    # padding is per image: the crop of a batch equals the images alone
    with torch.no_grad():
        assert torch.allclose(net(x[1:]), y[1:], atol=1e-5)
        assert net(torch.rand(1, 3, 3, 5)).shape == (1, 3, 3 * scale, 5 * scale)  # smaller than the window
    path = str(tmp_path / 'ckpt.pt')
    torch.save({'model': net.state_dict(), 'ema': net.state_dict(), 'model_args': asdict(cfg)}, path)
    net2, cfg2 = model.load_generator(path)
    assert cfg2 == cfg and not net2.training
    for k, t in net.state_dict().items():
        assert torch.equal(net2.state_dict()[k], t)


def test_window_plan_cached_and_matches_roll():
    torch.manual_seed(0)
    net = model.SwinIR(TINY).eval()
    with torch.no_grad():
        net(torch.rand(1, 3, 8, 12))
        net(torch.rand(2, 3, 7, 11))  # pads to the same 8x12
        assert len(net._plans) == 1
        net(torch.rand(1, 3, 16, 8))
        assert len(net._plans) == 2
    plan, (H, W) = net.plan(8, 12, 'cpu'), (8, 12)
    img = torch.arange(H * W).view(1, H, W)
    shifted = torch.roll(img, (-2, -2), (1, 2)).view(2, 4, 3, 4).permute(0, 2, 1, 3).reshape(-1)  # official partition
    assert torch.equal(plan.perm[2], shifted)
    in_p0 = img.view(1, -1, 1).index_select(1, plan.idx[None, 0])
    assert torch.equal(in_p0.index_select(1, plan.idx[0, 2]).view(-1), shifted)
    assert torch.equal(in_p0.index_select(1, plan.idx[0, None]).view(-1), img.view(-1))
    assert plan.mask.shape == (6, 1, 16, 16) and set(plan.mask.unique().tolist()) == {0.0, -100.0}


def test_load_generator_mismatch_and_bad_files(tmp_path):
    net = model.SwinIR(TINY)
    sd = net.state_dict()
    path = str(tmp_path / 'g.pt')
    bad = dict(sd, extra=torch.zeros(1))
    del bad['conv_first.bias']
    torch.save({'model': bad, 'model_args': dict(asdict(TINY), embed_dim=16)}, path)
    with pytest.raises(ValueError) as e:
        model.load_generator(path)
    msg = str(e.value)
    assert msg.startswith(path) and 'missing (1): conv_first.bias' in msg and 'unexpected (1): extra' in msg
    assert 'wrong shape' in msg and 'conv_first.weight (12, 3, 3, 3) vs (16, 3, 3, 3)' in msg
    assert "a config that would fit: {'upscale': 4" in msg and "'embed_dim': 12" in msg
    with pytest.raises(ValueError, match="window_size': 4"):  # config given, weights from another
        model.load_generator({'params': sd}, model.SwinIRConfig(embed_dim=12, depths=[2, 1], num_heads=[2, 3]))
    (tmp_path / 'junk.pt').write_bytes(b'junk')
    for obj, what in ((str(tmp_path / 'junk.pt'), 'junk.pt: cannot read'), (str(tmp_path / 'none.pt'), 'none.pt'),
                      ({'config': {}}, 'no state dict found'), ({'model': sd, 'model_args': {'bad_key': 1}}, 'bad SwinIR config'),
                      ({'a.weight': torch.zeros(1)}, 'not a SwinIR state dict')):
        with pytest.raises(ValueError, match=what):
            model.load_generator(obj)


def test_extract_state_dict_prefers_ema_and_strips_prefixes():
    a, b = {'module._orig_mod.w': torch.ones(1)}, {'w': torch.zeros(1)}
    sd, args = model.extract_state_dict({'model': b, 'ema': a, 'model_args': {'x': 1}})
    assert list(sd) == ['w'] and sd['w'].item() == 1 and args == {'x': 1}
    assert model.extract_state_dict({'model': b, 'ema': None})[0]['w'].item() == 0
    assert model.extract_state_dict({'params': b, 'params_ema': a})[0]['w'].item() == 1
    assert model.extract_state_dict(b) == (b, None)


def _fake_vgg(path):
    torch.manual_seed(0)
    shapes, c_in, idx = {}, 3, 0
    for block, (n, c) in enumerate([(2, 64), (2, 128), (4, 256), (4, 512), (4, 512)]):
        idx += 1 if block else 0
        for _ in range(n):
            shapes[idx] = (c, c_in)
            c_in, idx = c, idx + 2
    sd = {}
    for i, (c, ci) in shapes.items():
        sd[f'features.{i}.weight'] = torch.randn(c, ci, 3, 3) * (2 / (9 * ci)) ** 0.5
        sd[f'features.{i}.bias'] = torch.zeros(c)
    sd['classifier.0.weight'] = torch.zeros(2, 2)  # torchvision files have it; ignored
    torch.save(sd, path)
    return sd


def test_vgg_features_loading_shapes_and_errors(tmp_path, monkeypatch):
    path = str(tmp_path / 'vgg.pth')
    sd = _fake_vgg(path)
    vgg = model.VGGFeatures(path)
    assert torch.equal(vgg.features[34].weight, sd['features.34.weight'])
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    feats = vgg.train()(x)
    assert not vgg.training and not any(p.requires_grad for p in vgg.parameters())
    assert [tuple(f.shape) for f in feats] == [(1, 64, 32, 32), (1, 128, 16, 16), (1, 256, 8, 8), (1, 512, 4, 4), (1, 512, 2, 2)]
    assert (feats[0] < 0).any()  # taken before the ReLU
    ref = vgg.features[2](torch.relu(vgg.features[0]((x - vgg.mean) / vgg.std)))
    assert torch.allclose(feats[0], ref, atol=1e-5)
    feats[-1].sum().backward()
    assert x.grad is not None  # gradients flow to the input, not the weights
    # no path: torch hub's cache, then its download, then one clear error
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path / 'hub'))

    def offline(*a, **k):
        raise OSError('offline')
    monkeypatch.setattr(torch.hub, 'load_state_dict_from_url', offline)
    with pytest.raises(FileNotFoundError, match='perceptual_weight=0') as e:
        model.VGGFeatures()
    assert str(tmp_path / 'hub' / 'checkpoints' / model.VGG_FILE) in str(e.value)
    os.makedirs(tmp_path / 'hub' / 'checkpoints')
    os.replace(path, tmp_path / 'hub' / 'checkpoints' / model.VGG_FILE)
    assert torch.equal(model.VGGFeatures().features[0].weight, sd['features.0.weight'])
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        model.VGGFeatures(str(tmp_path / 'nope.pth'))
    torch.save({'features.0.weight': torch.zeros(1)}, tmp_path / 'bad.pth')
    with pytest.raises(ValueError, match='bad.pth: not torchvision vgg19'):
        model.VGGFeatures(str(tmp_path / 'bad.pth'))


def test_swinir_low_precision_runs():
    torch.manual_seed(0)
    net = model.SwinIR(TINY)
    x = torch.rand(2, 3, 9, 13)
    ref = net(x)
    with torch.autocast('cpu', dtype=torch.bfloat16):  # what train.py uses on a GPU, here on the CPU
        y = net(x)
        y.float().mean().backward()
        with torch.no_grad():
            y1 = net(x[:1])
    assert (y.float() - ref).abs().max() < 0.05 and (y1.float() - ref[:1]).abs().max() < 0.05
    with torch.no_grad():
        assert (net.to(torch.bfloat16)(x.bfloat16()).float() - ref).abs().max() < 0.05
