"""
Tests of sample.py and interpolate.py: python -m pytest -q _tests_sample.py
The scripts run as subprocesses on tiny SwinIR checkpoints saved in tmp_path; the tiling arithmetic
is also checked in-process at float precision.
"""
import csv
import os
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import degrade
from model import SwinIR, SwinIRConfig, load_generator

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, '..', 'shared')
VECTORS = os.path.join(SHARED, 'reference', 'vectors.pt')
needs_shared = pytest.mark.skipif(not os.path.exists(VECTORS), reason='needs ../shared')

# receptive field of this config: conv_first 1 + 2 blocks x (window-1) 3 + RSTB conv 1 + conv_after_body 1
# + upsample conv 1 = 10 LQ px, so a tile needs >= 10 px of context (overlap/4) to be exact
TINY = dict(embed_dim=12, depths=[2], num_heads=[2], window_size=4, img_size=16)


@pytest.fixture
def one_thread():
    # tiny models: two threads on a shared 2-core CPU spend their time waiting on each other
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run(script, *args, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, os.path.join(HERE, script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def tiny_model(seed, **kw):
    """A tiny SwinIR whose attention and MLPs matter: the default init (std 0.02) leaves the transformer
    body nearly silent, which would hide tiling errors behind the convolutions' small reach."""
    torch.manual_seed(seed)
    m = SwinIR(SwinIRConfig(**{**TINY, **kw})).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if 'relative_position_bias_table' in n:
                p.normal_(0, 1.0)
            elif 'norm' not in n and p.dim() <= 2:
                p.normal_(0, 0.3 if p.dim() == 2 else 0.05)
    return m


def save_ckpt(path, model, ema=None):
    """Our checkpoint format (train.py): 'model', 'ema' (preferred by the loaders), 'model_args'."""
    torch.save({'model': model.state_dict(), 'ema': ema.state_dict() if ema is not None else None,
                'model_args': asdict(model.config), 'iter': 1, 'config': {}}, path)


def restore(model, img):
    with torch.inference_mode():
        return model(img[None, :3])[0]


def png(path):
    return torch.from_numpy(np.array(Image.open(path))).to(torch.int16)


# ---------------------------------------------------------------- sample.py

@pytest.fixture(scope='module')
def photos(tmp_path_factory):
    """A folder with RGB, RGBA, gray JPEG, 16-bit gray, a corrupt PNG and a text file; GT for two of them."""
    d = tmp_path_factory.mktemp('photos')
    rs = np.random.RandomState(0)
    Image.fromarray(rs.randint(0, 256, (11, 13, 3), dtype=np.uint8)).save(d / 'rgb.png')
    rgba = rs.randint(0, 256, (10, 12, 4), dtype=np.uint8)
    rgba[..., 3] = np.linspace(0, 255, 12, dtype=np.uint8)[None]
    Image.fromarray(rgba, 'RGBA').save(d / 'rgba.png')
    Image.fromarray(rs.randint(0, 256, (14, 9), dtype=np.uint8), 'L').save(d / 'gray.jpg', quality=95)
    Image.fromarray((rs.randint(0, 65536, (12, 10))).astype(np.uint16)).save(d / 's16.png')
    (d / 'bad.png').write_bytes(b'not an image')
    (d / 'notes.txt').write_text('ignored')
    gt = tmp_path_factory.mktemp('gt')
    Image.fromarray(rs.randint(0, 256, (44, 52, 3), dtype=np.uint8)).save(gt / 'rgb.png')
    Image.fromarray(rs.randint(0, 256, (48, 40, 3), dtype=np.uint8)).save(gt / 's16.png')
    return d, gt


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp('ckpt')
    model, ema = tiny_model(1), tiny_model(2)
    save_ckpt(d / 'tiny.pt', model, ema)
    return d / 'tiny.pt', model, ema


def test_sample_folder_alpha_gray_16bit_bad_file_metrics_compare(photos, ckpt, tmp_path):
    folder, gt_dir = photos
    path, model, ema = ckpt
    out = tmp_path / 'res'
    r = run('sample.py', folder, f'--ckpt={path}', f'--out_dir={out}', f'--gt_dir={gt_dir}', '--compare=True',
            '--compare_height=32')
    assert r.returncode == 1, r.stdout + r.stderr  # bad.png skipped
    assert 'bad.png' in r.stdout and 'bad.png' in r.stderr and 'Traceback' not in r.stderr
    assert 'rgba.png' in r.stdout and 'no ground truth' in r.stdout  # missing GT reported by name
    assert sorted(os.listdir(out)) == ['compare', 'compare_grid.png', 'gray.png', 'metrics.csv', 'rgb.png',
                                       'rgba.png', 's16.png']
    for name in ('rgb.png', 'rgba.png', 'gray.jpg', 's16.png'):
        img = degrade.read_image(str(folder / name))
        got = png(out / (os.path.splitext(name)[0] + '.png'))
        want = degrade.to_uint8(restore(ema, img)).permute(1, 2, 0).to(torch.int16)  # EMA weights, not 'model'
        assert got.shape[:2] == (img.shape[1] * 4, img.shape[2] * 4)
        assert (got[..., :3] - want).abs().max() <= 1, name
        assert (degrade.to_uint8(restore(model, img)).permute(1, 2, 0) - want).abs().max() > 10
        if name == 'rgba.png':  # alpha upscaled with bicubic and put back
            assert got.shape[2] == 4
            a = F.interpolate(img[None, 3:], scale_factor=4, mode='bicubic', align_corners=False)[0, 0]
            assert (got[..., 3] - degrade.to_uint8(a)).abs().max() <= 1
        else:
            assert got.shape[2] == 3
    # the 16-bit input was read at full precision: its 8-bit rounding would restore differently
    s16 = degrade.read_image(str(folder / 's16.png'))
    rounded = degrade.to_uint8(s16).float() / 255
    assert (degrade.to_uint8(restore(ema, rounded)) != degrade.to_uint8(restore(ema, s16))).any()

    # metrics: the CSV equals degrade.psnr / ssim of the written output against GT
    rows = list(csv.reader(open(out / 'metrics.csv')))
    assert rows[0] == ['name', 'psnr', 'ssim'] and [r[0] for r in rows[1:]] == ['rgb.png', 's16.png', 'mean']
    vals = []
    for row in rows[1:3]:
        pred = png(out / (os.path.splitext(row[0])[0] + '.png')).to(torch.uint8).permute(2, 0, 1)
        gt = degrade.to_uint8(degrade.read_image(str(gt_dir / row[0])))
        vals.append((degrade.psnr(pred, gt), degrade.ssim(pred, gt)))
        assert float(row[1]) == pytest.approx(vals[-1][0], abs=1e-4)
        assert float(row[2]) == pytest.approx(vals[-1][1], abs=1e-6)
    assert float(rows[3][1]) == pytest.approx(np.mean([v[0] for v in vals]), abs=1e-4)
    assert float(rows[3][2]) == pytest.approx(np.mean([v[1] for v in vals]), abs=1e-6)

    # compare: strips bicubic | restored (| GT), and a grid of one 32 px row per image
    widths = []
    for stem, (h, w), cells in (('rgb', (11, 13), 3), ('rgba', (10, 12), 2), ('gray', (14, 9), 2), ('s16', (12, 10), 3)):
        strip = png(out / 'compare' / f'{stem}.png')
        assert strip.shape == (4 * h, 4 * w * cells, 3)
        assert torch.equal(strip[:, 4 * w:8 * w], png(out / f'{stem}.png')[..., :3])
        widths.append(round(32 * w / h) * cells)
    assert Image.open(out / 'compare_grid.png').size == (max(widths), 4 * 32)


def test_sample_bad_checkpoint_one_line_nothing_written(photos, ckpt, tmp_path):
    folder, _ = photos
    garbage = tmp_path / 'garbage.pt'
    garbage.write_bytes(b'not a checkpoint')
    no_args = tmp_path / 'official.pt'  # official layout, no model_args: flags describe another model
    torch.save({'params': ckpt[1].state_dict()}, no_args)
    for ck, extra, msg in ((tmp_path / 'missing.pt', [], 'no such file'), (garbage, [], 'cannot read'),
                           (no_args, ['--embed_dim=16', '--depths=[2]', '--num_heads=[2]', '--window_size=4'],
                            'wrong shape')):
        r = run('sample.py', folder, f'--ckpt={ck}', f'--out_dir={tmp_path / "res"}', *extra)
        assert r.returncode == 1 and 'Traceback' not in r.stderr, r.stderr
        assert r.stderr.startswith(f'error: {ck}') or r.stderr.startswith(f'error: --ckpt={ck}'), r.stderr
        assert msg in r.stderr
        if ck != garbage and msg != 'wrong shape':  # a mismatch is one line per problem
            assert len(r.stderr.strip().splitlines()) == 1
        assert not os.path.exists(tmp_path / 'res') or not os.listdir(tmp_path / 'res')


def test_tiled_equals_untiled(one_thread, tmp_path, capsys):
    import sample
    model = tiny_model(3)
    img = torch.rand(3, 130, 150)  # not window multiples
    cpu = torch.device('cpu')
    whole = sample.upscale_rgb(model, img, 0, 32, 4, 4, cpu)
    assert torch.allclose(whole, restore(model, img), atol=1e-6)
    # tiles of 96 px, 48 px overlap -> 12 px of context >= the 10 px receptive field: equal everywhere,
    # image borders included, because tiles start on window multiples and the last one ends at the border
    assert sample.tile_starts(150, 96, 48) == [0, 48, 96] and sample.tile_starts(130, 96, 48) == [0, 48]
    tiled = sample.upscale_rgb(model, img, 96, 48, 4, 4, cpu)
    assert (tiled - whole).abs().max() < 1e-5
    # less context than the receptive field, or no overlap at all: different (the test can fail)
    assert (sample.upscale_rgb(model, img, 96, 32, 4, 4, cpu) - whole).abs().max() > 5e-5
    assert (sample.upscale_rgb(model, img, 96, 16, 4, 4, cpu) - whole).abs().max() > 1e-3
    assert (sample.upscale_rgb(model, img, 32, 0, 4, 4, cpu) - whole).abs().max() > 0.1
    # why tiles start on the window grid: 2 px off it, the windows and so the outputs differ
    shifted = sample.upscale_rgb(model, img[:, :, 2:], 96, 48, 4, 4, cpu)
    assert (shifted[:, 40:-40, 40:-40] - whole[:, 40:-40, 48:-40]).abs().max() > 1e-3
    # neighbouring ramps add up to one, so a constant network output stays constant
    total = torch.zeros(4 * 150)
    for x in sample.tile_starts(150, 96, 48):
        x1 = min(x + 96, 150)
        total[4 * x:4 * x1] += sample.ramp_weights(4 * (x1 - x), x > 0, x1 < 150, 48, 4)
    assert torch.allclose(total, torch.ones_like(total), atol=1e-6)

    # out of memory on tiles above 40 px: halved twice (152 -> 76 -> 36), then as if asked for 36
    class Flaky(torch.nn.Module):
        def forward(self, x):
            if max(x.shape[2:]) > 40:
                raise torch.OutOfMemoryError('CUDA out of memory (simulated)')
            return model(x)
    got = sample.upscale_rgb(Flaky(), img, 0, 48, 4, 4, cpu)
    printed = capsys.readouterr().out
    assert 'retrying with --tile=76' in printed and 'retrying with --tile=36' in printed
    assert torch.equal(got, sample.upscale_rgb(model, img, 36, 48, 4, 4, cpu))

    # the CLI with --tile writes the same image as without; the untiled run reads the official file
    # layout (no model_args: the architecture is inferred from the key shapes)
    save_ckpt(tmp_path / 'ours.pt', model)
    torch.save({'params_ema': model.state_dict()}, tmp_path / 'official.pth')
    degrade.write_image(str(tmp_path / 'big.png'), img)
    for ckpt, args in (('official.pth', []), ('ours.pt', ['--tile=96', '--tile_overlap=48'])):
        r = run('sample.py', tmp_path / 'big.png', f'--ckpt={tmp_path / ckpt}', f'--out_dir={tmp_path / str(len(args))}',
                *args)
        assert r.returncode == 0 and '[1/1] big.png 150x130 -> 600x520' in r.stdout, r.stdout + r.stderr
    a, b = png(tmp_path / '0' / 'big.png'), png(tmp_path / '2' / 'big.png')
    assert (a - b).abs().max() <= 1 and (a != b).float().mean() < 1e-3


# ---------------------------------------------------------------- interpolate.py

@pytest.fixture(scope='module')
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp('interp')
    p_model, p_ema, g_model = tiny_model(4), tiny_model(5), tiny_model(6)
    save_ckpt(d / 'psnr.pt', p_model, p_ema)
    save_ckpt(d / 'gan.pt', g_model)
    save_ckpt(d / 'other.pt', tiny_model(7, embed_dim=16))
    return d, p_ema.state_dict(), g_model.state_dict()


def test_interpolate_endpoints_mean_and_loading(pair):
    d, p, g = pair
    for alpha in (0, 1, 0.5):
        out = d / f'mix{alpha}.pt'
        r = run('interpolate.py', alpha, f'--psnr={d / "psnr.pt"}', f'--gan={d / "gan.pt"}', f'--out={out}')
        assert r.returncode == 0, r.stderr
        blend = torch.load(out, weights_only=True)
        assert blend['config']['alpha'] == alpha and blend['model_args'] == asdict(SwinIRConfig(**TINY))
        for k, t in blend['model'].items():
            want = g[k] if alpha == 0 else p[k] if alpha == 1 else (p[k] + g[k]) / 2  # EMA of the PSNR model
            assert torch.equal(t, want), k
        model, cfg = load_generator(str(out))  # as sample.py and train.py --init load it
        assert cfg == SwinIRConfig(**TINY) and torch.equal(model.state_dict()['conv_first.weight'],
                                                           blend['model']['conv_first.weight'])


def test_interpolate_bad_inputs_write_nothing(pair, monkeypatch):
    import runpy
    d, _, g = pair
    psnr, gan, out = f'--psnr={d / "psnr.pt"}', f'--gan={d / "gan.pt"}', d / 'bad' / 'x.pt'
    for args, msg in (((1.5, psnr, gan), 'alpha must be a number in [0, 1]'), (('abc', psnr, gan), 'alpha must be'),
                      ((psnr, gan), 'give alpha')):  # refused before any file is read: in-process is enough
        monkeypatch.setattr(sys, 'argv', ['interpolate.py', *map(str, args), f'--out={out}'])
        with pytest.raises(SystemExit, match=msg.replace('[', r'\[').replace(']', r'\]')):
            runpy.run_path(os.path.join(HERE, 'interpolate.py'), run_name='__main__')
    for args, msg in (((0.5, f'--psnr={d / "nope.pt"}', gan), 'nope.pt: no such file'),
                      ((0.5, psnr, f'--gan={d / "other.pt"}'), 'different architectures'),
                      ((0.5, psnr, gan, f'--out={d / "gan.pt"}'), 'is one of the inputs')):
        r = run('interpolate.py', *args, f'--out={out}') if len(args) == 3 else run('interpolate.py', *args)
        assert r.returncode == 1 and msg in r.stderr and 'Traceback' not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert not os.path.exists(d / 'bad')
    assert torch.equal(torch.load(d / 'gan.pt', weights_only=True)['model']['conv_first.weight'], g['conv_first.weight'])
