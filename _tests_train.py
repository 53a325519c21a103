"""
Tests of train.py (tiny SwinIR, 64x64 made-up faces, CPU): python -m pytest -q _tests_train.py
"""
import hashlib
import importlib.util
import json
import os
import re
import runpy
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import degrade

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, '..', 'shared')
VECTORS = os.path.join(SHARED, 'reference', 'vectors.pt')
needs_shared = pytest.mark.skipif(not os.path.exists(VECTORS), reason='needs ../shared')
TRAIN = os.path.join(HERE, 'train.py')
TINY = ['--gt_size=64', '--patch_size=8', '--embed_dim=12', '--depths=[2]', '--num_heads=[2]', '--window_size=4',
        '--batch_size=2', '--pool_size=4', '--log_interval=1']

ONE_THREAD = {**os.environ, 'OMP_NUM_THREADS': '1'}  # tiny models: threads only cost, on a shared CPU a lot


def train(*args):
    """Run train.py in this process (it is a script: its settings live in a fresh namespace each time)."""
    argv, sys.argv, threads = sys.argv, [TRAIN, *args], torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runpy.run_path(TRAIN, run_name='__main__')
    finally:
        sys.argv = argv
        torch.set_num_threads(threads)


def records(out_dir):
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


def faces(folder, n, size=64, seed=0):
    """Smooth made-up colour images (something a tiny SwinIR can learn to upscale)."""
    os.makedirs(folder, exist_ok=True)
    rs = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        f = rs.uniform(1, 4, (3, 2))
        a = np.stack([np.sin(2 * np.pi * (f[c, 0] * xx + f[c, 1] * yy) + i) for c in range(3)], -1)
        Image.fromarray(((a * 0.5 + 0.5) * 255).astype(np.uint8)).save(os.path.join(folder, f'{i:03d}.png'))


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    faces(str(root / 'train'), 6)
    faces(str(root / 'val' / 'GT'), 3, seed=1)
    os.makedirs(root / 'val' / 'LQ')
    for name in os.listdir(root / 'val' / 'GT'):
        Image.open(root / 'val' / 'GT' / name).resize((16, 16), Image.BICUBIC).save(root / 'val' / 'LQ' / name)
    return [f'--data_dir={root / "train"}', f'--val_dir={root / "val"}']


@pytest.fixture(scope='module')
def vgg_file(tmp_path_factory):
    """A random torchvision-format vgg19 state dict (the real weights are not needed to test the plumbing)."""
    sd, c_in, i = {}, 3, 0
    for n, c in [(2, 64), (2, 128), (4, 256), (4, 512), (4, 512)]:
        for _ in range(n):
            sd[f'features.{i}.weight'] = torch.randn(c, c_in, 3, 3) * (2 / (9 * c_in)) ** 0.5
            sd[f'features.{i}.bias'] = torch.zeros(c)
            c_in, i = c, i + 2
        i += 1  # the max-pool
    path = tmp_path_factory.mktemp('vgg') / 'vgg19.pth'
    torch.save(sd, path)
    return str(path)


@pytest.fixture(scope='module')
def psnr_ckpt(data, tmp_path_factory):
    out = tmp_path_factory.mktemp('psnr')
    train(*data, *TINY, '--max_iters=4', '--eval_interval=2', f'--out_dir={out}')
    return str(out / 'best.pt')


def load(path):
    return torch.load(path, weights_only=True)


def test_psnr_steps_lower_the_loss_on_a_fixed_batch(data, tmp_path, capsys):
    # pool = one batch of whole LQ faces, never refilled after the first draw: every step sees the same batch
    train(*data, *TINY, '--patch_size=16', '--pool_size=2', '--refill_every=1000000', '--max_iters=30',
          '--learning_rate=2e-3', '--eval_interval=15', f'--out_dir={tmp_path}')
    log = [r for r in records(tmp_path) if 'loss' in r]
    assert [r['iter'] for r in log] == list(range(1, 31)) and log[-1]['loss'] < 0.5 * log[1]['loss']
    out = capsys.readouterr().out
    assert '"embed_dim": 12' in out and re.search(r'iter 30/30 \| epoch 10\.00 \| loss .* ms/iter \| ETA', out)
    ckpt = load(tmp_path / 'ckpt.pt')
    assert {'model', 'ema', 'disc', 'optimizer', 'disc_optimizer', 'model_args', 'disc_args', 'iter', 'best_psnr',
            'config', 'resume'} <= set(ckpt) and ckpt['iter'] == 30 and ckpt['disc'] is None
    assert ckpt['model_args']['embed_dim'] == 12 and ckpt['config']['max_iters'] == 30
    val = [r['val_psnr'] for r in records(tmp_path) if 'val_psnr' in r]
    assert load(tmp_path / 'best.pt')['best_psnr'] == max(val) and 'resume' not in load(tmp_path / 'best.pt')
    for name in ('grid.png', 'curves.png'):
        assert Image.open(tmp_path / name).size[0] > 0
    assert Image.open(tmp_path / 'grid.png').size == (3 * 64, 3 * 64)


def test_gan_from_psnr_init_updates_g_and_d(data, psnr_ckpt, vgg_file, tmp_path, capsys):
    # no model flags: --init's architecture (embed_dim 12) wins over the seed defaults
    gan = [*data, *TINY[:2], '--batch_size=2', '--pool_size=4', '--mode=gan', f'--init={psnr_ckpt}',
           f'--vgg_path={vgg_file}', '--eval_interval=100']
    train(*gan, '--max_iters=0', f'--out_dir={tmp_path / "g0"}')
    train(*gan, '--max_iters=2', '--log_interval=1', f'--out_dir={tmp_path / "g2"}')
    assert 'the architecture comes from' in capsys.readouterr().out
    psnr, g0, g2 = load(psnr_ckpt), load(tmp_path / 'g0' / 'ckpt.pt'), load(tmp_path / 'g2' / 'ckpt.pt')
    assert all(torch.equal(psnr['ema'][k], g0['model'][k]) for k in psnr['ema'])  # G starts from the EMA
    assert g2['model_args']['embed_dim'] == 12 and g2['disc_args']['num_feat'] == 24
    for part in ('model', 'disc'):
        assert g0[part].keys() == g2[part].keys()
        assert any(not torch.equal(g0[part][k], g2[part][k]) for k in g0[part] if k.endswith(('weight', 'weight_orig')))
    n_d = sum(1 for k in g2['disc'] if not k.endswith(('weight_u', 'weight_v')))  # D parameters
    assert len(g2['disc_optimizer']['state']) == n_d and len(g2['optimizer']['state']) == len(g2['model'])
    log = [r for r in records(tmp_path / 'g2') if 'loss' in r]
    assert len(log) == 2 and all(r['d'] > 0 and r['gan'] > 0 and r['percep'] > 0 and r['l1'] > 0 for r in log)


def test_resume_after_kill_equals_uninterrupted(data, tmp_path):
    # GAN mode: covers G, D (spectral-norm buffers), both Adams, the EMA, the pool and every RNG stream
    # (VGG is frozen and stateless: left out to keep the three runs quick)
    args = [*data, *TINY, '--mode=gan', '--perceptual_weight=0', '--max_iters=6', '--eval_interval=3',
            '--refill_every=2']
    run = TRAIN
    subprocess.run([sys.executable, run, *args, f'--out_dir={tmp_path / "a"}'], check=True, capture_output=True,
                   env=ONE_THREAD)
    killer = tmp_path / 'kill_at_step.py'  # kill -9 during iteration 5 (two Adam steps per iteration)
    killer.write_text(f"import os, signal, sys, runpy, torch\nsys.path.insert(0, {HERE!r})\n"
                      f"step, n = torch.optim.Adam.step, [0]\n"
                      f"def killing(self, *a, **k):\n    n[0] += 1\n"
                      f"    if n[0] == 9: os.kill(os.getpid(), signal.SIGKILL)\n    return step(self, *a, **k)\n"
                      f"torch.optim.Adam.step = killing\nrunpy.run_path({run!r}, run_name='__main__')\n")
    b = subprocess.run([sys.executable, str(killer), *args, f'--out_dir={tmp_path / "b"}'], capture_output=True,
                       env=ONE_THREAD)
    assert b.returncode == -signal.SIGKILL and load(tmp_path / 'b' / 'ckpt.pt')['iter'] == 3
    assert max(r['iter'] for r in records(tmp_path / 'b')) == 4  # it logged past its checkpoint
    subprocess.run([sys.executable, run, *args, '--resume=True', f'--out_dir={tmp_path / "b"}'], check=True,
                   capture_output=True, env=ONE_THREAD)
    la, lb = records(tmp_path / 'a'), records(tmp_path / 'b')
    strip = lambda log: [{k: v for k, v in r.items() if k != 'lr'} for r in log]  # noqa: E731
    assert strip(la) == strip(lb) and len([r for r in lb if 'loss' in r]) == 6
    a, b = load(tmp_path / 'a' / 'ckpt.pt'), load(tmp_path / 'b' / 'ckpt.pt')
    for part in ('model', 'ema', 'disc'):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])


def test_two_process_gloo_run_ends_with_identical_weights(data, tmp_path):
    out = tmp_path / 'ddp'
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                        TRAIN, *data, *TINY, '--max_iters=3', '--eval_interval=3', f'--out_dir={out}'],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    sums = dict(re.findall(r'rank (\d): weights checksum ([0-9a-f]{16})', r.stdout))
    ckpt = load(out / 'ckpt.pt')
    h = hashlib.sha256()
    for part in ('model', 'ema'):
        for k, t in ckpt[part].items():
            h.update(k.encode() + t.contiguous().flatten().view(torch.uint8).numpy().tobytes())
    assert sums.keys() == {'0', '1'} and sums['0'] == sums['1'] == h.hexdigest()[:16]


def error_line(*args):
    with pytest.raises(SystemExit) as e:
        train(*args)
    message = str(e.value.code)
    assert message.startswith('error: ') and '\n' not in message
    return message


def test_bad_data_gives_one_line_errors(data, tmp_path):
    bad = tmp_path / 'bad'
    faces(str(bad), 2)
    Image.new('RGB', (40, 64)).save(bad / 'small.jpg')
    (bad / 'broken.png').write_bytes(b'not a png')
    (bad / 'notes.txt').write_text('hello')
    out = f'--out_dir={tmp_path / "o"}'
    msg = error_line(*TINY, f'--data_dir={bad}', out)
    assert str(bad) in msg and 'small.jpg (40x64 < --gt_size=64)' in msg
    assert 'broken.png (unreadable)' in msg and 'notes.txt (not an image file)' in msg
    assert 'not a folder' in error_line(*TINY, f'--data_dir={tmp_path / "missing"}', out)
    os.makedirs(tmp_path / 'empty')
    assert 'no images' in error_line(*TINY, f'--data_dir={tmp_path / "empty"}', out)
    val = tmp_path / 'val'
    faces(str(val / 'GT'), 2)
    faces(str(val / 'LQ'), 1, size=16)
    assert 'unpaired: 001' in error_line(*TINY, data[0], f'--val_dir={val}', out)
    assert 'LQ' in error_line(*TINY, data[0], f'--val_dir={tmp_path}', out)
    os.remove(val / 'GT' / '001.png')
    faces(str(val / 'LQ'), 1, size=20)
    assert '20x20 is not 1/4 of its GT (64x64)' in error_line(*TINY, data[0], f'--val_dir={val}', out)
    assert 'ckpt.pt not found' in error_line(*TINY, *data, '--resume=True', out)
    (tmp_path / 'junk.pt').write_bytes(b'junk')
    assert 'junk.pt' in error_line(*TINY, *data, f'--init={tmp_path / "junk.pt"}', out)
    os.makedirs(tmp_path / 'o')
    (tmp_path / 'o' / 'ckpt.pt').write_bytes(b'precious')
    assert '--resume=True' in error_line(*TINY, *data, out)
    assert (tmp_path / 'o' / 'ckpt.pt').read_bytes() == b'precious'


def test_override_parser_rejects_unknown_keys_and_wrong_types(data, tmp_path):
    out = f'--out_dir={tmp_path}'
    assert 'unknown setting --nope' in error_line(*data, '--nope=1', out)
    assert '--batch_size expects int' in error_line(*data, '--batch_size=2.5', out)
    assert '--depths expects list' in error_line(*data, '--depths=3', out)
    assert "--mode=fast: expected 'psnr' or 'gan'" in error_line(*data, '--mode=fast', out)
    assert '--patch_size=32' in error_line(*data, '--gt_size=64', '--patch_size=32', out)
    assert not os.listdir(tmp_path)  # nothing written


def test_non_finite_step_is_skipped_and_reported(data, tmp_path, capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location('train_module', TRAIN)
    T = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(T)  # the __main__ guard keeps it from training
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), lr=0.1)

    def step(scale):
        net(torch.ones(1, 3)).sum().mul(scale).backward()
        before = [t.clone() for t in [*net.parameters(), *(v for s in opt.state.values() for v in s.values())]]
        return T.guarded_step(opt, net), before

    ok, before = step(float('nan'))  # a first step: its new moments roll back to zeros
    assert not ok and all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert all(torch.count_nonzero(s['exp_avg']) == 0 for s in opt.state.values())
    ok, before = step(1.0)
    assert ok and not torch.equal(before[0], net.weight)
    ok, before = step(float('inf'))
    after = [*net.parameters(), *(v for s in opt.state.values() for v in s.values())]
    assert not ok and all(torch.equal(a, b) for a, b in zip(before, after) if a.dim())  # all but the step count
    mse, calls = torch.nn.functional.mse_loss, [0]

    def nan_at_third(a, b):
        calls[0] += 1
        return mse(a, b) * (float('nan') if calls[0] == 3 else 1.0)
    monkeypatch.setattr(torch.nn.functional, 'mse_loss', nan_at_third)
    train(*data, *TINY, '--max_iters=4', '--eval_interval=4', f'--out_dir={tmp_path}')
    assert 'iter 3: non-finite loss or gradient, G step skipped' in capsys.readouterr().out
    assert [r['skipped'] for r in records(tmp_path) if 'loss' in r] == [0, 0, 1, 0]
    ckpt = load(tmp_path / 'ckpt.pt')
    assert all(torch.isfinite(t).all() for part in ('model', 'ema') for t in ckpt[part].values())
