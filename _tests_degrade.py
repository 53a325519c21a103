"""
Tests of the degradation in degrade.py (issue 2): python -m pytest -q _tests_degrade.py
Equality with basicsr uses ../shared/reference/vectors.pt; the distribution test uses the val faces.
"""
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import degrade

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, '..', 'shared')
VECTORS = os.path.join(SHARED, 'reference', 'vectors.pt')
VAL = os.path.join(SHARED, 'data', 'faces', 'val')
needs_shared = pytest.mark.skipif(not os.path.exists(VECTORS), reason='needs ../shared')
needs_val = pytest.mark.skipif(not os.path.isdir(os.path.join(VAL, 'LQ')), reason='needs ../shared/data')


@pytest.fixture(scope='session')
def vectors():
    return torch.load(VECTORS, weights_only=True)


@pytest.fixture(autouse=True)
def one_thread():
    # the 2 cores are shared: an OpenMP thread waiting on a descheduled partner makes each op ~10x
    # slower (measured 0.3 img/s with 2 threads vs 10 img/s with 1 under load); tests are small anyway
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def smooth_faces(b, size=64, seed=0):
    """Stand-in images: smooth random colour fields in [0,1]."""
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(b, 3, 8, 8, generator=g), size=(size, size), mode='bicubic').clamp(0, 1)


KERNEL_FUNCTIONS = {'iso': degrade.bivariate_gaussian, 'aniso': degrade.bivariate_gaussian,
                    'generalized_iso': degrade.bivariate_generalized_gaussian,
                    'generalized_aniso': degrade.bivariate_generalized_gaussian,
                    'plateau_iso': degrade.bivariate_plateau, 'plateau_aniso': degrade.bivariate_plateau}


def reference_kernel_args(e):
    beta = () if KERNEL_FUNCTIONS[e['kind']] is degrade.bivariate_gaussian else (e['beta'],)
    return (e['size'], e['sigma_x'], e['sigma_y'], e['theta']) + beta, not e['kind'].endswith('aniso')


# ---------------------------------------------------------------- equality with the reference vectors

@needs_shared
def test_blur_kernels_match_reference(vectors):
    for e in vectors['kernels']:
        args, iso = reference_kernel_args(e)
        k = KERNEL_FUNCTIONS[e['kind']](*args, isotropic=iso)
        assert k.shape == e['kernel'].shape and k.dtype == torch.float64
        assert (k - e['kernel']).abs().max() <= 1e-6 * e['kernel'].abs().max(), e['kind']
        batched = KERNEL_FUNCTIONS[e['kind']](args[0], *(torch.tensor([a, a], dtype=torch.float64) for a in args[1:]), isotropic=iso)
        assert batched.shape == (2,) + k.shape and torch.allclose(batched[1], k, rtol=1e-9, atol=0)


@needs_shared
def test_sinc_kernels_match_reference(vectors):
    for e in vectors['sinc']:
        k = degrade.sinc_kernel(e['omega_c'], e['size'], e['pad_to'])
        assert k.shape == e['kernel'].shape
        assert (k - e['kernel']).abs().max() <= 1e-6 * e['kernel'].abs().max()


@needs_shared
def test_filter2d_and_usm_match_reference(vectors):
    f, u = vectors['filter2d'], vectors['usm']
    assert (degrade.filter2d(f['input'], f['kernel']) - f['output']).abs().max() < 2e-6
    assert (degrade.usm_sharp(u['input']) - u['output']).abs().max() < 2e-6


@needs_shared
def test_jpeg_matches_reference(vectors):
    # float32 rounding; a coefficient sitting on a quantisation tie (x.5) may round the other way than
    # in basicsr (other summation order) and move its 8x8 block: allowed in at most 0.2% of pixels
    j = vectors['jpeg']
    diff = (degrade.jpeg(j['input'], j['quality']) - j['output']).abs()
    assert diff.mean() < 2e-5 and (diff > 1e-5).float().mean() < 2e-3
    assert torch.equal(degrade.jpeg(j['input'][1:2], float(j['quality'][1])), degrade.jpeg(j['input'][1:2], j['quality'][1:2]))


# ---------------------------------------------------------------- per-sample machinery vs torch / cropped images

def test_resize_matrices_match_interpolate():
    torch.manual_seed(0)
    names = ['area', 'bilinear', 'bicubic']
    modes = torch.tensor([0, 1, 2, 0, 1, 2])
    n_in = torch.tensor([[40, 40], [31, 25], [17, 40], [40, 12], [23, 23], [11, 37]])
    n_out = torch.tensor([[50, 47], [13, 60], [17, 9], [40, 12], [7, 30], [33, 37]])
    x = torch.rand(6, 3, 40, 40) * degrade._valid(n_in, 40, 40)
    y = degrade._resize(x, n_in, n_out, n_in.float() / n_out, modes, (64, 64))
    for i in range(6):
        (h, w), (oh, ow) = n_in[i].tolist(), n_out[i].tolist()
        ref = F.interpolate(x[i:i + 1, :, :h, :w], size=(oh, ow), mode=names[modes[i]])
        assert (y[i, :, :oh, :ow] - ref[0]).abs().max() < 5e-6
        assert y[i, :, oh:].abs().max() == 0 and y[i, :, :, ow:].abs().max() == 0
    s = torch.tensor([0.37, 1.3, 1.5, 0.2, 0.81, 1.0], dtype=torch.float64)  # scale_factor semantics
    full = torch.tensor([40, 40]).expand(6, 2)
    n1 = (full * s[:, None]).floor().long()
    x = torch.rand(6, 3, 40, 40)
    y = degrade._resize(x, full, n1, (1 / s[:, None]).float().expand(6, 2), modes, (64, 64))
    for i in range(6):
        ref = F.interpolate(x[i:i + 1], scale_factor=float(s[i]), mode=names[modes[i]])
        assert ref.shape[2:] == tuple(n1[i].tolist())
        assert (y[i:i + 1, :, :ref.shape[2], :ref.shape[3]] - ref).abs().max() < 5e-6


def test_canvas_filter_and_jpeg_equal_cropped_images():
    torch.manual_seed(1)
    sizes = torch.tensor([[40, 40], [31, 25], [17, 40], [40, 12], [23, 23], [11, 37]])
    x = torch.rand(6, 3, 40, 40) * degrade._valid(sizes, 40, 40)
    k = torch.rand(6, 21, 21)
    k /= k.sum((1, 2), keepdim=True)
    q = torch.tensor([30.0, 50, 70, 90, 95, 60])
    blurred, compressed = degrade.filter2d(x, k, sizes), degrade.jpeg(x, q) * degrade._valid(sizes, 40, 40)
    for i, (h, w) in enumerate(sizes.tolist()):
        crop = x[i:i + 1, :, :h, :w]
        assert (blurred[i:i + 1, :, :h, :w] - degrade.filter2d(crop, k[i:i + 1])).abs().max() < 1e-6
        assert (compressed[i:i + 1, :, :h, :w] - degrade.jpeg(crop, q[i:i + 1])).abs().max() < 1e-6
        assert blurred[i, :, h:].abs().sum() == 0 and blurred[i, :, :, w:].abs().sum() == 0


def test_pipeline_kernels_are_the_public_kernels():
    lq, _, p = degrade.degrade(smooth_faces(24), torch.Generator().manual_seed(3), return_params=True,
                               sinc_prob=0.3, kernel_prob=[1, 1, 1, 1, 1, 1])
    kinds = list(KERNEL_FUNCTIONS)
    for i in range(24):
        size, kind = int(p['ksize1'][i]), int(p['kind1'][i])
        if kind == 6:
            k = degrade.sinc_kernel(float(p['omega1'][i]), size, 21)
        else:
            e = {'kind': kinds[kind], 'size': size, 'beta': float(p['beta1'][i]),
                 **{n: float(p[n + '1'][i]) for n in ('sigma_x', 'sigma_y', 'theta')}}
            args, iso = reference_kernel_args(e)
            pad = (21 - size) // 2
            k = F.pad(KERNEL_FUNCTIONS[kinds[kind]](*args, isotropic=iso), (pad,) * 4)
        assert torch.allclose(p['kernel1'][i].double(), k, atol=1e-7), (kind, size)
    identity = F.pad(torch.ones(1, 1), (10,) * 4)
    assert all(torch.equal(p['kernel2'][i], identity) for i in range(24) if not p['blur2'][i])
    assert all(torch.equal(p['kernel3'][i], identity) for i in range(24) if not p['sinc3'][i])


# ---------------------------------------------------------------- noise

def test_gaussian_noise_levels_and_gray():
    img, g = torch.rand(3, 3, 64, 64), torch.Generator().manual_seed(0)
    n = degrade.gaussian_noise(img, torch.tensor([0.0, 10.0, 20.0]), torch.tensor([False, False, True]), g)
    assert n[0].abs().max() == 0 and abs(n[1].std().item() * 255 - 10) < 0.5 and abs(n[2].std().item() * 255 - 20) < 1
    assert torch.equal(n[2, 0], n[2, 1]) and torch.equal(n[2, 0], n[2, 2]) and not torch.equal(n[1, 0], n[1, 1])


def test_poisson_noise_counts_distinct_levels_of_the_valid_region():
    # 4 distinct nonzero levels inside (-> counts scaled by 4), zeros outside must not count as a 5th level
    levels = torch.tensor([10.0, 80, 160, 240]) / 255
    img = levels[torch.randint(0, 4, (2, 3, 32, 32), generator=torch.Generator().manual_seed(0))]
    sizes = torch.tensor([[20, 30], [32, 32]])
    img = img * degrade._valid(sizes, 32, 32)
    g = torch.Generator().manual_seed(1)
    n = degrade.poisson_noise(img, torch.tensor([1.0, 1.0]), torch.tensor([False, False]), g, sizes)
    counts = (n[0, :, :20, :30] + img[0, :, :20, :30]) * 4  # Poisson draws / v with v = 4
    assert torch.allclose(counts, counts.round(), atol=1e-4) and abs(n[0, :, :20, :30].mean()) < 0.02
    counts = (n[1] + img[1]) * 4
    assert torch.allclose(counts, counts.round(), atol=1e-4)
    gray = degrade.poisson_noise(img, torch.tensor([0.0, 2.0]), torch.tensor([True, True]), g)
    assert gray[0].abs().max() == 0 and torch.equal(gray[1, 0], gray[1, 2]) and gray[1].abs().max() > 0


# ---------------------------------------------------------------- edges

def test_jpeg_extreme_qualities_are_finite_and_sane():
    img = smooth_faces(2, 48)
    best, worst, mid = (degrade.jpeg(img, q) for q in (100.0, 1.0, 50.0))
    for out in (best, worst, mid):
        assert out.shape == img.shape and torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    err = [(out - img).abs().mean() for out in (best, mid, worst)]
    assert err[0] < 0.04 and err[0] < err[1] < err[2]  # q=100 loses only what 4:2:0 chroma loses


def test_degrade_shapes_levels_and_seeds():
    gt = smooth_faces(3)
    lq, gt_usm, p = degrade.degrade(gt, torch.Generator().manual_seed(0), return_params=True)
    assert lq.shape == (3, 3, 16, 16) and gt_usm.shape == gt.shape and lq.dtype == torch.float32
    assert lq.min() >= 0 and lq.max() <= 1 and torch.equal(lq * 255, (lq * 255).round())
    assert all(v.shape[0] == 3 for v in p.values())
    assert torch.equal(lq, degrade.degrade(gt, torch.Generator().manual_seed(0))[0])
    assert not torch.equal(lq, degrade.degrade(gt, torch.Generator().manual_seed(1))[0])
    assert torch.equal(gt_usm, degrade.usm_sharp(gt))


def test_degrade_under_autocast_computes_in_float32():
    gt = smooth_faces(2)
    ref = degrade.degrade(gt, torch.Generator().manual_seed(5))[0]
    with torch.autocast('cpu', dtype=torch.bfloat16):
        lq = degrade.degrade(gt, torch.Generator().manual_seed(5))[0]
    assert lq.dtype == torch.float32 and torch.equal(lq, ref)


def test_degrade_constant_images_stay_finite():
    gt = torch.stack([torch.zeros(3, 64, 64), torch.ones(3, 64, 64), torch.full((3, 64, 64), 0.5)])
    for seed in range(3):
        lq, gt_usm = degrade.degrade(gt, torch.Generator().manual_seed(seed))
        assert torch.isfinite(lq).all() and lq.min() >= 0 and lq.max() <= 1 and torch.isfinite(gt_usm).all()


def test_degrade_overrides():
    gt = smooth_faces(2)
    assert degrade.degrade(gt, scale=2)[0].shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match='resize_probb'):
        degrade.degrade(gt, resize_probb=[1, 0, 0])
    p = degrade.draw_params(500, generator=torch.Generator().manual_seed(0), resize_prob=[0, 0, 1], jpeg_range=[60, 61])
    assert (p['scale1'] == 1).all() and (p['jpeg1'] >= 60).all() and (p['jpeg1'] <= 61).all()


def test_drawn_options_occur_with_the_configured_probabilities():
    n = 40000
    p = degrade.draw_params(n, generator=torch.Generator().manual_seed(0))

    def frequencies(values, probs):  # each category within 5 binomial standard errors
        probs = torch.tensor(probs, dtype=torch.float64)
        f = torch.bincount(values.long().flatten(), minlength=len(probs)).double() / values.numel()
        assert ((f - probs).abs() <= 5 * (probs * (1 - probs) / values.numel()).sqrt() + 1e-12).all(), (f, probs)
    for s, x in (('1', ''), ('2', '2')):
        kinds = [(1 - degrade.sinc_prob) * q for q in degrade.kernel_prob] + [degrade.sinc_prob]
        frequencies(p['kind' + s], kinds)
        frequencies(p['updown' + s], getattr(degrade, 'resize_prob' + x))
        frequencies(p['mode' + s], [1 / 3] * 3)
        frequencies((p['ksize' + s] - 7) // 2, [1 / 8] * 8)
        frequencies(p['gaussian' + s], [0.5, 0.5])
        frequencies(p['gray' + s], [0.6, 0.4])
        lo, hi = getattr(degrade, 'resize_range' + x)
        up, down, keep = (p['updown' + s] == i for i in range(3))
        sc = p['scale' + s]
        assert (sc[up] >= 1).all() and (sc[up] <= hi).all() and (sc[down] >= lo).all() and (sc[down] <= 1).all()
        assert (sc[keep] == 1).all()
        for key, (lo, hi) in (('jpeg', getattr(degrade, 'jpeg_range' + x)), ('sigma', getattr(degrade, 'noise_range' + x)),
                              ('poisson', getattr(degrade, 'poisson_scale_range' + x)),
                              ('sigma_x', getattr(degrade, 'blur_sigma' + x))):
            v = p[key + s]
            assert v.min() >= lo and v.max() <= hi and abs(v.mean() - (lo + hi) / 2) < 5 * (hi - lo) / math.sqrt(12 * n)
        iso = p['kind' + s] % 2 == 0
        assert torch.equal(p['sigma_y' + s][iso], p['sigma_x' + s][iso]) and (p['theta' + s][iso] == 0).all()
        generalized = (p['kind' + s] == 2) | (p['kind' + s] == 3)
        frequencies(p['beta' + s][generalized] < 1, [0.5, 0.5])
        small = p['ksize' + s] < 13
        assert p['omega' + s][small].min() >= math.pi / 3 and p['omega' + s][~small].min() < math.pi / 3
    frequencies(p['blur2'], [0.2, 0.8])
    frequencies(p['sinc3'], [0.2, 0.8])
    frequencies(p['resize_first3'], [0.5, 0.5])
    frequencies(p['mode3'], [1 / 3] * 3)


# ---------------------------------------------------------------- the distribution of the reference val LQ

def bicubic_x4_psnr(lq, gt):
    """PSNR (challenge convention) of the LQ upsampled x4 with PIL bicubic, as the README's floor."""
    up = Image.fromarray(degrade.to_uint8(lq).permute(1, 2, 0).numpy()).resize(gt.shape[1:][::-1], Image.BICUBIC)
    return degrade.psnr(torch.from_numpy(np.array(up)).permute(2, 0, 1), degrade.to_uint8(gt))


@needs_val
def test_psnr_distribution_matches_reference_val_lq():
    # also the robust spread IQR / 1.349: the std of the 50 reference samples hangs on a few tail values
    # (reference 1.57 dB; ours 1.77 here, 1.84-1.89 over 600 other draws), see notes/degrade.md
    paths = degrade.list_images(os.path.join(VAL, 'GT'))
    gts = torch.stack([degrade.read_image(p)[:3] for p in paths])
    ref = np.array([bicubic_x4_psnr(degrade.read_image(p.replace('GT', 'LQ'))[:3], gt) for p, gt in zip(paths, gts)])
    g, ours = torch.Generator().manual_seed(0), []
    for _ in range(4):  # 200 draws: standard error of our mean ~0.1 dB
        for i in range(0, len(gts), 2):
            ours += [bicubic_x4_psnr(lq, gt) for lq, gt in zip(degrade.degrade(gts[i:i + 2], g)[0], gts[i:i + 2])]
    spread = lambda v: (np.quantile(v, 0.75) - np.quantile(v, 0.25)) / 1.349
    assert abs(ref.mean() - 26.35) < 0.01  # the README's bicubic floor
    report = (np.mean(ours), np.std(ours), spread(ours), ref.mean(), ref.std(), spread(ref))
    assert abs(np.mean(ours) - ref.mean()) < 0.3 and abs(np.std(ours) - ref.std()) < 0.3, report
    assert abs(spread(ours) - spread(ref)) < 0.3, report


def test_pipeline_equals_per_image_torch_composition():
    # noise off, the batched per-sample pipeline must equal basicsr's steps applied to each image
    # alone with torch's own ops (F.interpolate, conv2d with reflect padding); rounding to 8 bits may
    # differ by one level where a value sits on .5
    def filter2D(x, k):
        r = k.shape[-1] // 2
        return F.conv2d(F.pad(x, (r,) * 4, mode='reflect'), k[None].expand(3, 1, -1, -1), groups=3)
    modes, H = ['area', 'bilinear', 'bicubic'], 96
    gt = smooth_faces(12, H)
    off = dict(noise_range=[0.0, 0.0], poisson_scale_range=[0.0, 0.0], noise_range2=[0.0, 0.0], poisson_scale_range2=[0.0, 0.0])
    lq, _, p = degrade.degrade(gt, torch.Generator().manual_seed(1), return_params=True, **off)
    for i in range(12):
        interp = lambda x, s, size=None: F.interpolate(x, size=size, scale_factor=None if size else float(p['scale1'][i]),
                                                        mode=modes[p['mode' + s][i]])
        x = filter2D(degrade.usm_sharp(gt[i:i + 1]), p['kernel1'][i])
        x = degrade.jpeg(interp(x, '1').clamp(0, 1), p['jpeg1'][i:i + 1])
        x = interp(filter2D(x, p['kernel2'][i]), '2', (int(H / 4 * float(p['scale2'][i])),) * 2).clamp(0, 1)
        if p['resize_first3'][i]:
            x = degrade.jpeg(filter2D(interp(x, '3', (H // 4,) * 2), p['kernel3'][i]).clamp(0, 1), p['jpeg2'][i:i + 1])
        else:
            x = filter2D(interp(degrade.jpeg(x, p['jpeg2'][i:i + 1]), '3', (H // 4,) * 2), p['kernel3'][i])
        diff = ((x * 255).round().clamp(0, 255) - lq[i] * 255).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01, i


# ---------------------------------------------------------------- command line

def test_cli_writes_lq_and_names_bad_images(tmp_path, capsys):
    gt_dir, lq_dir = tmp_path / 'gt', tmp_path / 'lq'
    gt_dir.mkdir()
    for i, img in enumerate(smooth_faces(2, 512)):
        degrade.write_image(str(gt_dir / f'{i:05d}.png'), img)
    (gt_dir / 'broken.png').write_bytes(b'not a png')
    degrade.write_image(str(gt_dir / 'small.png'), smooth_faces(1, 64)[0])
    with pytest.raises(SystemExit, match='2 of 4 images skipped'):
        degrade.main([str(gt_dir), str(lq_dir), '--seed=1'])
    out = capsys.readouterr().out
    assert 'broken.png: cannot read image' in out and 'small.png: expected a 512x512 image, got 64x64' in out
    assert '2/4 written' in out
    assert sorted(os.listdir(lq_dir)) == ['00000.png', '00001.png']
    assert degrade.read_image(str(lq_dir / '00000.png')).shape == (3, 128, 128)
    with pytest.raises(SystemExit, match='refusing'):
        degrade.main([str(gt_dir), str(gt_dir) + '/'])
    with pytest.raises(SystemExit, match='unknown setting --sead'):
        degrade.main([str(gt_dir), str(lq_dir), '--sead=1'])
