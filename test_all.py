"""
Tests for the whole project: python -m pytest -q test_all.py
Equality with the reference implementations uses ../shared/reference/vectors.pt; tests that need
../shared are skipped when it is absent (a fresh clone has none).
"""
import os

import numpy as np
import pytest
import torch

import degrade

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, '..', 'shared')
VECTORS = os.path.join(SHARED, 'reference', 'vectors.pt')
needs_shared = pytest.mark.skipif(not os.path.exists(VECTORS), reason='needs ../shared')


@pytest.fixture(scope='session')
def vectors():
    return torch.load(VECTORS, weights_only=True)


# ---------------------------------------------------------------- shared helpers: I/O, metrics, config

@needs_shared
def test_metrics_match_reference(vectors):
    for m in vectors['metrics']:
        pred, gt = m['pred_rgb'].permute(2, 0, 1), m['gt_rgb'].permute(2, 0, 1)
        for crop in (0, 4):
            for space, y in (('rgb', False), ('y', True)):
                assert degrade.psnr(pred, gt, crop, y) == pytest.approx(m[f'psnr_crop{crop}_{space}'], abs=1e-4)
                assert degrade.ssim(pred, gt, crop, y) == pytest.approx(m[f'ssim_crop{crop}_{space}'], abs=1e-6)


def test_psnr_identical_and_known_value():
    a = torch.full((3, 8, 8), 100, dtype=torch.uint8)
    assert degrade.psnr(a, a) == float('inf')
    assert degrade.psnr(a, a + 1) == pytest.approx(10 * np.log10(255 ** 2))
    assert degrade.ssim(torch.randint(0, 255, (3, 16, 16), dtype=torch.uint8).expand(3, -1, -1).contiguous(),
                        torch.zeros(3, 16, 16, dtype=torch.uint8)) < 0.5


def test_image_roundtrip_alpha_gray_16bit(tmp_path):
    from PIL import Image
    rgba = np.random.RandomState(0).randint(0, 256, (9, 7, 4), dtype=np.uint8)
    Image.fromarray(rgba, 'RGBA').save(tmp_path / 'a.png')
    img = degrade.read_image(str(tmp_path / 'a.png'))
    assert img.shape == (4, 9, 7) and torch.equal(degrade.to_uint8(img).permute(1, 2, 0), torch.from_numpy(rgba))
    Image.fromarray(rgba[..., 0], 'L').save(tmp_path / 'g.jpg', quality=100)
    assert degrade.read_image(str(tmp_path / 'g.jpg')).shape == (3, 9, 7)
    sixteen = (np.arange(63, dtype=np.uint16).reshape(9, 7) * 1000)
    Image.fromarray(sixteen).save(tmp_path / 's.png')
    img16 = degrade.read_image(str(tmp_path / 's.png'))
    assert torch.allclose(img16[0], torch.from_numpy(sixteen / 65535.0).float(), atol=1e-6)
    degrade.write_image(str(tmp_path / 'out.png'), img[:3])
    assert torch.equal(degrade.to_uint8(degrade.read_image(str(tmp_path / 'out.png'))), degrade.to_uint8(img[:3]))
    (tmp_path / 'bad.png').write_bytes(b'not an image')
    with pytest.raises(ValueError, match='bad.png'):
        degrade.read_image(str(tmp_path / 'bad.png'))
    assert [os.path.basename(p) for p in degrade.list_images(str(tmp_path))] == ['a.png', 'bad.png', 'g.jpg', 'out.png', 's.png']


def test_configure_overrides_and_errors():
    g = {'__doc__': 'doc', 'batch_size': 4, 'lr': 2e-4, 'compile': False, 'depths': [6, 6], 'out_dir': 'out',
         'init': '', 'extra': None, '_private': 1, 'mod': os}
    pos, cfg = degrade.configure(g, ['photos/', '--batch_size=8', '--lr=1', '--compile=True', '--depths=[2,2]',
                                     '--out_dir=run 1', "--init='x.pt'"])
    assert pos == ['photos/'] and cfg['batch_size'] == 8 and cfg['lr'] == 1.0 and isinstance(cfg['lr'], float)
    assert cfg['compile'] is True and cfg['depths'] == [2, 2] and cfg['out_dir'] == 'run 1' and cfg['init'] == 'x.pt'
    assert set(cfg) == {'batch_size', 'lr', 'compile', 'depths', 'out_dir', 'init', 'extra'}
    for bad, msg in (('--nope=1', 'unknown setting --nope'), ('--batch_size=4.5', '--batch_size expects int'),
                     ('--compile=yes', '--compile expects bool'), ('--depths=3', '--depths expects list'),
                     ('--batch_size', 'needs a value')):
        with pytest.raises(SystemExit, match=msg):
            degrade.configure(dict(g), [bad])


# ---------------------------------------------------------------- README and CI never drift apart

def _readme_block(heading):
    """The first fenced code block under the README section whose title starts with heading."""
    text = open(os.path.join(HERE, 'README.md')).read()
    section = text.split('\n## ' + heading, 1)[1].split('\n## ', 1)[0]
    return section.split('```', 2)[1].split('\n', 1)[1].strip()


def test_readme_commands_are_what_ci_runs():
    ci = [line.strip() for line in open(os.path.join(HERE, '.ci', 'run')) if not line.lstrip().startswith('#')]
    install, tests = _readme_block('Install'), _readme_block('Tests')
    assert 'requirements.txt' in install and install in ci
    assert tests.startswith('python -m pytest') and tests in ci
    assert ci.index(install) < ci.index(tests)
