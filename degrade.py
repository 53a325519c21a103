"""
The Real-ESRGAN second-order degradation in pure torch, batched, every random choice per sample.
Also home of what the scripts share: image I/O, PSNR/SSIM, the --key=value config parser.

    python degrade.py GT_DIR LQ_DIR --seed=0              # one 128x128 LQ PNG per 512x512 GT face
    python degrade.py GT_DIR LQ_DIR --jpeg_range=[60,95]  # any setting below as --key=value
    python degrade.py --bench [GT_DIR]    # img/s and ms per stage (GT_DIR's faces, else synthetic)

No host syncs: images of different sizes share a zero canvas (top-left, sizes in (B,2) tensors);
a resize is one (out x in) matrix per sample and axis, a blur an FFT product after gathering
per-sample reflect indices, JPEG runs on whole canvases (their zeros = the reference's padding).
"""
import ast
import contextlib
import functools
import math
import os
import re
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# ==== the degradation ====
_before_options = set(globals())
# ---- first degradation (AI6126 2024 challenge options, Real-ESRGAN names)
kernel_prob = [0.45, 0.25, 0.12, 0.03, 0.12, 0.03]  # iso, aniso, generalized_, plateau_(an)iso
sinc_prob = 0.1  # a 2D sinc (ringing) kernel instead of a blur kernel
blur_sigma = [0.2, 3.0]  # blur kernel sigma range, pixels
betag_range = [0.5, 4.0]  # generalized Gaussian shape beta
betap_range = [1.0, 2.0]  # plateau shape beta
resize_prob = [0.2, 0.7, 0.1]  # resize up / down / keep
resize_range = [0.2, 1.5]  # resize scale factor range
gaussian_noise_prob = 0.5  # Gaussian noise, else Poisson
noise_range = [1.0, 20.0]  # Gaussian sigma, 8-bit levels
poisson_scale_range = [0.05, 2.0]  # Poisson noise scale
gray_noise_prob = 0.4  # one noise field for the three channels
jpeg_range = [50.0, 95.0]  # JPEG quality range
# ---- second degradation
second_blur_prob = 0.8  # blur at all in the second degradation
blur_sigma2 = [0.2, 1.5]  # as blur_sigma (kernel types, sinc and beta as in the first degradation)
resize_prob2 = [0.3, 0.4, 0.3]  # up / down / keep
resize_range2 = [0.3, 1.2]  # scale range, relative to the final size
gaussian_noise_prob2 = 0.5  # as gaussian_noise_prob
noise_range2 = [1.0, 15.0]  # as noise_range
poisson_scale_range2 = [0.05, 1.5]  # as poisson_scale_range
gray_noise_prob2 = 0.4  # as gray_noise_prob
jpeg_range2 = [70.0, 95.0]  # JPEG quality range of the final step
# ---- final step
final_sinc_prob = 0.8  # final sinc filter, else identity
first_order_prob = 0.0  # per sample: a milder first-order chain (no second degradation, no sinc)
scale = 4  # the LQ is gt / scale
_OPTIONS = [k for k in globals() if k not in _before_options and not k.startswith('_')]
# ---- system (degrade.py's command line)
seed = 0  # random seed of the degradation
device = ''  # '' = cuda, then mps, then cpu
batch_size = 8  # faces degraded at once
threads = 0  # CPU threads; 0 = torch's default
bench = False  # time degrade() and its stages instead (GT_DIR's first faces, else synthetic)

_KSIZE = 21  # kernels are padded to this size; their drawn sizes are odd, 7..21 (Real-ESRGAN)


def _numbers(v, n):  # a list or tuple of n finite numbers
    return isinstance(v, (list, tuple)) and len(v) == n and all(
        type(t) in (int, float) and math.isfinite(t) for t in v)


_PROBABILITY = (lambda v: _numbers([v], 1) and 0 <= v <= 1, 'a probability in [0, 1]')
_WEIGHTS = lambda n: (lambda v: _numbers(v, n) and min(v) >= 0 and sum(v) > 0,
                      f'{n} weights >= 0, sum > 0')
_POSITIVE = (lambda v: _numbers(v, 2) and 0 < v[0] <= v[1], '[lo, hi] with 0 < lo <= hi')
_AROUND_1 = (lambda v: _numbers(v, 2) and 0 < v[0] <= 1 <= v[1], '[lo, hi], 0 < lo <= 1 <= hi')
_LEVELS = (lambda v: _numbers(v, 2) and 0 <= v[0] <= v[1], '[lo, hi] with 0 <= lo <= hi')
_QUALITY = (lambda v: _numbers(v, 2) and 1 <= v[0] <= v[1] <= 100, '[lo, hi], 1 <= lo <= hi <= 100')
_VALID = {  # each option: (is it valid?, what is expected)
    'kernel_prob': _WEIGHTS(6), 'sinc_prob': _PROBABILITY, 'blur_sigma': _POSITIVE,
    'betag_range': _AROUND_1, 'betap_range': _AROUND_1, 'resize_prob': _WEIGHTS(3),
    'resize_range': _AROUND_1, 'gaussian_noise_prob': _PROBABILITY, 'noise_range': _LEVELS,
    'poisson_scale_range': _LEVELS, 'gray_noise_prob': _PROBABILITY, 'jpeg_range': _QUALITY,
    'second_blur_prob': _PROBABILITY, 'blur_sigma2': _POSITIVE, 'resize_prob2': _WEIGHTS(3),
    'resize_range2': _AROUND_1, 'gaussian_noise_prob2': _PROBABILITY, 'noise_range2': _LEVELS,
    'poisson_scale_range2': _LEVELS, 'gray_noise_prob2': _PROBABILITY, 'jpeg_range2': _QUALITY,
    'final_sinc_prob': _PROBABILITY, 'first_order_prob': _PROBABILITY,
    'scale': (lambda v: type(v) is int and 1 <= v <= 512, 'an int in [1, 512]'),
    'seed': (lambda v: 0 <= v < 2 ** 64, 'an int in [0, 2**64)'),  # configure checked the types
    'batch_size': (lambda v: v >= 1, 'an int >= 1'),
    'threads': (lambda v: 0 <= v <= os.cpu_count(), f"an int in [0, {os.cpu_count()}] (CPUs)")}


def _options(overrides, keys=_OPTIONS):  # keys' globals with overrides; ValueError naming a bad one
    unknown = sorted(set(overrides) - set(keys))
    if unknown:
        raise ValueError(f"unknown degradation option(s) {', '.join(unknown)}; known: "
                         + ', '.join(keys))
    o = {k: overrides.get(k, globals()[k]) for k in keys}
    for k in keys:
        valid, expected = _VALID[k]
        if not valid(o[k]):
            raise ValueError(f"{k}={o[k]!r}: expected {expected}")
    return o


def _real(dev):  # float64 for the kernel maths, where the device has it
    return torch.float32 if torch.device(dev or 'cpu').type == 'mps' else torch.float64


@contextlib.contextmanager
def _full_float32():  # full float32 matmuls whatever the caller allowed (TF32, bf16 passes)
    backends = (torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.mkldnn.matmul)
    saved = [b.fp32_precision for b in backends]
    try:
        for b in backends:
            b.fp32_precision = 'ieee'
        yield
    finally:
        for b, precision in zip(backends, saved):
            b.fp32_precision = precision


# ---- blur kernels (basicsr.data.degradations), batched over (B,) parameter tensors
def blur_kernel(size, sigma_x, sigma_y, theta, beta=1.0, *, isotropic=True, family=0, omega=1.0,
                cut=None):
    """Kernels summing to 1, family 0 Gaussian, 1 generalized Gaussian, 2 plateau, 3 circular sinc,
    on basicsr's grid (x = column, y = row, centre 0), zero outside the central cut x cut (=
    basicsr's kernel of that size, zero-padded); isotropic: sigma_x on both axes, no rotation.
    Python floats -> (size,size); (B,) tensors (family and cut too) -> (B,size,size)."""
    vals = (sigma_x, sigma_y, theta, beta, omega)
    dev = next((t.device for t in vals if torch.is_tensor(t)), None)
    sx, sy, theta, beta, omega = torch.broadcast_tensors(
        *(torch.as_tensor(t, dtype=_real(dev), device=dev).reshape(-1) for t in vals))
    if isotropic:
        sy, theta = sx, 0 * theta
    v = lambda t: t.reshape(-1, 1, 1)
    a = torch.arange(size, dtype=sx.dtype, device=sx.device) - size // 2
    y, x = a[:, None], a[None, :]
    c, s, ix, iy = v(theta.cos()), v(theta.sin()), v(sx ** -2), v(sy ** -2)
    # q = [x y] Sigma^-1 [x y]^T with Sigma = R(theta) diag(sx^2, sy^2) R(theta)^T
    xx, xy, yy = c * c * ix + s * s * iy, 2 * c * s * (ix - iy), s * s * ix + c * c * iy
    q = xx * x * x + xy * x * y + yy * y * y
    qb, r, w = q ** v(beta), torch.sqrt(x * x + y * y), v(omega)
    # J1 by the trapezoidal rule on its periodic integral: 1e-15 (torch.special.bessel_j1: 5e-7)
    t = torch.arange(128, dtype=sx.dtype, device=sx.device) * (2 * math.pi / 128)
    j1 = torch.cos(t - (w * r)[..., None] * t.sin()).mean(-1)
    sinc = torch.where(r > 0, w * j1 / (2 * math.pi * r.clamp_min(1)), w * w / (4 * math.pi))
    f = v(family if torch.is_tensor(family) else torch.full((), family, device=sx.device))
    k = torch.where(f == 0, torch.exp(-0.5 * q), torch.where(
        f == 1, torch.exp(-0.5 * qb), torch.where(f == 2, 1 / (qb + 1), sinc)))
    if cut is not None:
        k = k * ((y.abs() <= v(cut) // 2) & (x.abs() <= v(cut) // 2))
    k = k / k.sum((1, 2), keepdim=True)
    return k if any(torch.is_tensor(t) for t in vals) else k[0]


# ---- filtering and resizing; images may sit top-left on a zero canvas with valid sizes (B,2)
def _valid(sizes, h, w):  # (B,1,h,w): 1 inside each valid region
    ar = lambda n: torch.arange(n, device=sizes.device)
    return ((ar(h)[:, None] < sizes[:, :1, None]) & (ar(w) < sizes[:, 1:, None]))[:, None].float()


# FFT lengths 2^a 3^b 5^c (no prime factor above 5: the fast ones), all of them up to 2^16
_FFT_SIZES = sorted(2**a * 3**b * 5**c for a in range(17) for b in range(11) for c in range(7))


def filter2d(img, kernels, sizes=None):
    """basicsr filter2D: correlation with per-sample (B,k,k) (or one (k,k)) kernels, reflect
    padding, as an FFT product. sizes (B,2): valid sizes on a zero canvas (kept zero outside)."""
    B, C, H, W = img.shape
    r = kernels.shape[-1] // 2
    n = (H, W) if sizes is None else (sizes[:, :1], sizes[:, 1:])
    # padded by at least r on each side (no wrap-around), to a fast FFT length
    nh, nw = (next(m for m in _FFT_SIZES if m >= d + 2 * r) for d in (H, W))

    def reflect(length, n):  # (B or 1,length): source index of each padded position, about n
        p = (torch.arange(length, device=img.device) - r).abs().view(1, -1)
        return ((n - 1) - ((n - 1) - p).abs()).clamp_min(0)
    x = img.gather(2, reflect(nh, n[0])[:, None, :, None].expand(B, C, nh, W))
    x = x.gather(3, reflect(nw, n[1])[:, None, None, :].expand(B, C, nh, nw))
    kf = torch.fft.rfft2(kernels.reshape(-1, 2 * r + 1, 2 * r + 1), s=(nh, nw))
    kf = kf.conj().to(torch.complex64)  # conj: a correlation, as filter2D
    out = torch.fft.irfft2(torch.fft.rfft2(x).mul_(kf[:, None]), s=(nh, nw))[..., :H, :W]
    return out if sizes is None else out * _valid(sizes, H, W)


def usm_sharp(img, weight=0.5, radius=50, threshold=10):
    """basicsr USMSharp: sharpen where |img - blur| > threshold/255, blended by the blurred mask;
    the blur is cv2.getGaussianKernel(radius rounded up to odd, sigma 0)."""
    r = radius + 1 - radius % 2
    g = torch.arange(r, dtype=_real(img.device), device=img.device) - r // 2
    g = torch.exp(-g ** 2 / (2 * (0.3 * ((r - 1) * 0.5 - 1) + 0.8) ** 2))
    g = g[:, None] * g / g.sum() ** 2
    residual = img - filter2d(img, g)
    soft = filter2d((residual.abs() * 255 > threshold).float(), g)
    return soft * (img + weight * residual).clamp(0, 1) + (1 - soft) * img


def _resize(img, n_in, n_out, rs, mode, out_hw):
    """Per-sample F.interpolate (align_corners=False, no antialias) of the valid (n_in) regions to
    n_out (both (B,2)) on an out_hw canvas; mode 0 area, 1 bilinear, 2 bicubic; rs (B,2) = input
    pixels per output pixel as torch takes it (1/scale_factor, or n_in/n_out)."""
    B, C, H, W = img.shape
    m = mode.view(-1, 1, 1)

    def matrix(ni, no, ratio, rows, cols):  # (B,rows,cols) for one axis; rows from no on are 0
        o = torch.arange(rows, device=img.device)[None, :, None]
        ni, no = ni.view(-1, 1, 1), no.view(-1, 1, 1)
        # area = adaptive average pooling: weight w over [start, end), a running sum of +w and -w
        start, end = o * ni // no, ((o + 1) * ni + no - 1) // no
        w = 1 / (end - start).float()
        area = torch.zeros(B, rows, cols + 1, device=img.device).scatter_add_(
            2, torch.cat([start, end], 2).clamp(max=cols), torch.cat([w, -w], 2)).cumsum(2)
        # bilinear / bicubic: 4 taps around the source coordinate, cubic with torch's A = -0.75
        src = ratio.view(-1, 1, 1).float() * (o + 0.5) - 0.5
        src = torch.where(m == 2, src, src.clamp_min(0))  # linear clamps negative ones, cubic not
        t = src - src.floor()
        near = lambda x: (1.25 * x - 2.25) * x * x + 1  # |x| <= 1
        far = lambda x: ((-0.75 * x + 3.75) * x - 6) * x + 3  # 1 < |x| < 2
        taps = torch.where(m == 2, torch.cat([far(t + 1), near(t), near(1 - t), far(2 - t)], 2),
                           torch.cat([0 * t, 1 - t, t, 0 * t], 2))
        idx = (src.floor().long() + torch.arange(-1, 3, device=img.device)).clamp(0).minimum(ni - 1)
        mat = torch.zeros(B, rows, cols, device=img.device).scatter_add_(2, idx, taps)
        return torch.where(m == 0, area[..., :cols], mat) * (o < no)
    rh = matrix(n_in[:, 0], n_out[:, 0], rs[:, 0], out_hw[0], H)
    rw = matrix(n_in[:, 1], n_out[:, 1], rs[:, 1], out_hw[1], W)
    rows = torch.bmm(img.flatten(1, 2), rw.transpose(1, 2)).view(B, C, H, -1)  # (B,C,H,out_w)
    return torch.matmul(rh[:, None], rows)


# ---- noise (basicsr generate_*_noise_pt), per-sample level and gray flag
def gaussian_noise(img, sigma, gray, generator=None):
    """Noise to add: N(0, sigma/255) per pixel, sigma (B,) in 8-bit levels; gray: one field."""
    n = torch.randn(img.shape, generator=generator, device=img.device)
    n.mul_(sigma.float().view(-1, 1, 1, 1) / 255)
    return torch.where(gray.view(-1, 1, 1, 1), n[:, :1], n)


def poisson_noise(img, scale, gray, generator=None, sizes=None):
    """Noise to add: (Poisson(x*v)/v - x)*scale with x the image rounded to 8 bits and v its number
    of distinct levels rounded up to a power of 2, per sample (gray: of the luma, one field)."""
    B, C, H, W = img.shape
    gv, sv = gray.view(-1, 1, 1, 1), scale.float().view(-1, 1, 1, 1)
    luma = img[:, :1] * 0.2989 + img[:, 1:2] * 0.587 + img[:, 2:] * 0.114  # rgb_to_grayscale
    lev = torch.where(gv, luma, img).mul_(255).round_().clamp_(0, 255)
    # distinct levels: one histogram, bins offset by 256 per sample; level 0 also counts the zeros
    # outside the valid region, so it is present only if seen more often than those
    off = 256 * torch.arange(B, device=img.device).view(-1, 1, 1, 1) + 0.5
    hist = torch.histc(lev + off, bins=256 * B, min=0, max=256 * B).view(B, 256)
    outside = 0 if sizes is None else C * (H * W - sizes.prod(1))
    count = (hist[:, 1:] > 0).sum(1) + (hist[:, 0] > outside)
    v = 2 ** torch.ceil(torch.log2(count.clamp_min(1).float())).view(-1, 1, 1, 1)
    # rate 0 (almost free in torch.poisson) at scale 0 and in a gray sample's 2nd/3rd channel
    keep = (sv > 0) & ~(gv & (torch.arange(C, device=img.device) > 0).view(1, -1, 1, 1))
    noise = torch.poisson(lev * (v / 255 * keep), generator=generator)
    noise = noise.mul_(sv / v).sub_(lev.mul_(sv / 255))
    return torch.where(gv, noise[:, :1], noise)


# ---- JPEG round trip (basicsr DiffJPEG, differentiable=False: its tables, colour maps, rounding)
_Y_TABLE = torch.tensor([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113,
    92, 49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99.0]).view(8, 8).T
_C_TABLE = F.pad(torch.tensor([[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99],
                               [47, 66, 99, 99.0]]), (0, 4, 0, 4), value=99.0)
_RGB2YCC = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5],
                         [0.5, -0.418688, -0.081312]])
_YCC2RGB = torch.tensor([[1.0, 0.0, 1.402], [1.0, -0.344136, -0.714136], [1.0, 1.772, 0.0]])
_D = torch.tensor([[math.cos((2 * x + 1) * u * math.pi / 16) / 2 * (0.5 ** 0.5 if u == 0 else 1)
                   for x in range(8)] for u in range(8)], dtype=torch.float64)  # D[u, x]
_DCT = torch.kron(_D, _D).float()  # (64,64) orthonormal: row-major 8x8 X -> row-major D X D^T


@functools.lru_cache(maxsize=4)  # copied once: a copy from pageable host memory drains a GPU queue
def _jpeg_tables(device, dtype):  # DCT, Y and C quantisation tables, RGB->YCbCr, YCbCr->RGB
    return [t.to(device, dtype) for t in (_DCT, _Y_TABLE, _C_TABLE, _RGB2YCC, _YCC2RGB)]


def jpeg(img, quality):
    """JPEG encode/decode of (B,3,H,W) in [0,1] at per-sample quality (B,) (or one number): YCbCr,
    4:2:0 chroma by 2x2 means, 8x8 DCT, standard tables scaled as libjpeg does, true rounding, zero
    padding to multiples of 16, clamp. The colour maps are affine: chroma is made at half size."""
    B, _, H, W = img.shape
    q = torch.as_tensor(quality, dtype=torch.float32, device=img.device).expand(B)
    factor = torch.where(q < 50, 5000 / q, 200 - q * 2) / 100
    dct, y_table, c_table, rgb2ycc, ycc2rgb = _jpeg_tables(img.device, img.dtype)

    def round_trip(x, table):  # (B,c,h,w): 8x8 block DCT, quantise with table * factor, back
        c, h, w = x.shape[1:]
        # clamp: quality 100 gives a zero table (DiffJPEG divides by it); libjpeg keeps steps >= 1
        step = (table.flatten() * factor.view(-1, 1, 1)).clamp_min(1)
        blocks = (x - 128).view(B, c, h // 8, 8, w // 8, 8).transpose(3, 4).reshape(B, -1, 64)
        blocks = (torch.round(blocks @ dct.T / step).mul_(step) @ dct).add_(128)
        return blocks.view(B, c, h // 8, w // 8, 8, 8).transpose(3, 4).reshape(B, c, h, w)
    x = F.pad(img, (0, -W % 16, 0, -H % 16)) if H % 16 or W % 16 else img
    m = rgb2ycc * 255
    y = round_trip(x[:, :1] * m[0, 0] + x[:, 1:2] * m[0, 1] + x[:, 2:] * m[0, 2], y_table)
    c = round_trip(torch.einsum('bchw,jc->bjhw', F.avg_pool2d(x, 2), m[1:]) + 128, c_table)
    rgb = torch.einsum('bchw,jc->bjhw', c - 128, ycc2rgb[:, 1:])
    rgb = F.interpolate(rgb, scale_factor=2.0).add_(y)
    return rgb[..., :H, :W].contiguous().clamp_(0, 255).mul_(1 / 255)


# ---- the pipeline (Real-ESRGAN feed_data, every choice per sample)
def draw_params(n, device='cpu', generator=None, **overrides):
    """Every random choice of degrade() for n samples as (n,) tensors in three dicts 'first',
    'second', 'final'. kind: 0..5 as kernel_prob, 6 sinc; updown: 0 up, 1 down, 2 keep; mode:
    0 area, 1 bilinear, 2 bicubic; scale: a scale factor (first), relative to the final size
    (second); resize_first (final): [resize + sinc] before JPEG; first_order (final): the sample
    skips the second degradation and the sinc (resized to the final size, then the final JPEG)."""
    o, dev = _options(overrides), torch.device(device)
    rand = lambda: torch.rand(n, generator=generator, device=dev, dtype=_real(dev))
    uniform = lambda lo, hi: lo + (hi - lo) * rand()
    ksize = lambda: 7 + 2 * torch.randint(0, 8, (n,), generator=generator, device=dev)  # 7..21

    def pick(probs):  # index i with probability probs[i] / sum(probs)
        u, c = rand() * sum(probs), np.cumsum(probs)
        return sum((u >= t).long() for t in c[:-1].tolist())

    def stage(blur_sigma, resize_prob, resize_range, gaussian_noise_prob, noise_range,
              poisson_scale_range, gray_noise_prob):  # one degradation's draws, in this order
        kind = torch.where(rand() < o['sinc_prob'], 6, pick(o['kernel_prob']))
        size = ksize()
        below = rand() < 0.5  # basicsr: beta below 1 for half the draws
        u = rand()
        sigma_x, sigma_y = uniform(*blur_sigma), uniform(*blur_sigma)
        theta = uniform(-math.pi, math.pi)
        lo = torch.where(kind < 4, torch.full_like(u, o['betag_range'][0]), o['betap_range'][0])
        hi = torch.where(kind < 4, torch.full_like(u, o['betag_range'][1]), o['betap_range'][1])
        min_omega = torch.where(size < 13, torch.full_like(u, math.pi / 3), math.pi / 5)
        iso = kind % 2 == 0
        p = {'kind': kind, 'ksize': size, 'sigma_x': sigma_x,
             'sigma_y': torch.where(iso, sigma_x, sigma_y), 'theta': torch.where(iso, 0.0, theta),
             'omega': min_omega + (math.pi - min_omega) * rand(),
             'beta': torch.where(below, lo + (1 - lo) * u, 1 + (hi - 1) * u),
             'updown': pick(resize_prob)}
        (lo, hi), u = resize_range, rand()
        p['scale'] = torch.where(p['updown'] == 0, 1 + (hi - 1) * u,
                                 torch.where(p['updown'] == 1, lo + (1 - lo) * u, 1.0))
        p['mode'] = pick([1, 1, 1])
        p['gaussian'] = rand() < gaussian_noise_prob
        p['gray'] = rand() < gray_noise_prob
        p['sigma'] = uniform(*noise_range)
        p['poisson'] = uniform(*poisson_scale_range)
        return p
    first = stage(o['blur_sigma'], o['resize_prob'], o['resize_range'], o['gaussian_noise_prob'],
                  o['noise_range'], o['poisson_scale_range'], o['gray_noise_prob'])
    first['jpeg'] = uniform(*o['jpeg_range'])
    second = stage(o['blur_sigma2'], o['resize_prob2'], o['resize_range2'],
                   o['gaussian_noise_prob2'], o['noise_range2'], o['poisson_scale_range2'],
                   o['gray_noise_prob2'])
    final = {'jpeg': uniform(*o['jpeg_range2'])}
    second['blur'] = rand() < o['second_blur_prob']
    final['sinc'] = rand() < o['final_sinc_prob']
    final['ksize'] = ksize()
    final['omega'] = uniform(math.pi / 3, math.pi)
    final['resize_first'] = rand() < 0.5
    final['mode'] = pick([1, 1, 1])
    # drawn only when asked for, so that the default consumes today's random stream exactly
    off = torch.zeros_like(final['sinc'])  # (n,) False
    mild = rand() < o['first_order_prob'] if o['first_order_prob'] else off
    final['first_order'] = mild
    final['sinc'] = final['sinc'] & ~mild
    second['blur'] = second['blur'] & ~mild
    for key in ('sigma', 'poisson'):  # no second noise, and straight to the final size
        second[key] = torch.where(mild, 0.0, second[key])
    second['scale'] = torch.where(mild, 1.0, second['scale'])
    return {'first': first, 'second': second, 'final': final}


def add_kernels(p):
    """Adds 'kernel' (B,21,21) to each stage of p: a delta where the second blur or sinc is off."""
    def kernel(family, q, on):
        k = blur_kernel(_KSIZE, q['sigma_x'], q['sigma_y'], q['theta'], q['beta'],
                        isotropic=False, family=family, omega=q['omega'], cut=q['ksize'])
        delta = F.pad(torch.ones_like(k[:1, :1, :1]), (_KSIZE // 2,) * 4)
        return torch.where(on.view(-1, 1, 1), k, delta).float()
    first, second, final = p['first'], p['second'], p['final']
    one = torch.ones_like(final['omega'])
    first['kernel'] = kernel(first['kind'] // 2, first, one > 0)
    second['kernel'] = kernel(second['kind'] // 2, second, second['blur'])
    sinc = dict(sigma_x=one, sigma_y=one, theta=one, beta=one, omega=final['omega'],
                ksize=final['ksize'])
    final['kernel'] = kernel(3, sinc, final['sinc'])


def _sizes(x, h, w):  # (B,2): the same valid size (h, w) for each of x's samples
    sizes = torch.full((len(x), 2), h, device=x.device)
    sizes[:, 1] = w
    return sizes


def _blur_resize_noise(x, sizes, new_sizes, rs, canvas, p, generator):
    """Blur x (valid sizes (B,2)) with p['kernel'], resize to new_sizes on a zero canvas, noise."""
    x = filter2d(x, p['kernel'], sizes)
    x = _resize(x, sizes, new_sizes, rs, p['mode'], canvas)
    gauss, gray = p['gaussian'], p['gray']
    noise = poisson_noise(x, torch.where(gauss, 0.0, p['poisson']), gray, generator, new_sizes)
    noise += gaussian_noise(x, torch.where(gauss, p['sigma'], 0.0), gray, generator)
    return noise.add_(x).clamp_(0, 1).mul_(_valid(new_sizes, *canvas))


def first_degradation(gt_usm, p, o, generator):
    """Blur, resize by a scale factor, noise, JPEG -> (B,3,h,w) canvas, valid sizes (B,2)."""
    B, _, H, W = gt_usm.shape
    gt_sizes = _sizes(gt_usm, H, W)
    sizes = (gt_sizes * p['scale'].view(-1, 1)).floor().long()
    if gt_usm.device.type == 'cpu':  # as small as it can be (a host sync is free on a CPU)
        canvas = sizes.amax(0).tolist()
    else:  # as large as it may have to be: no host sync
        canvas = [int(d * max(o['resize_range'][1], 1)) for d in (H, W)]
    canvas = [-(-d // 16) * 16 for d in canvas]  # JPEG pads to 16 anyway
    rs = (1 / p['scale'].view(-1, 1)).float().expand(B, 2)  # torch's 1 / scale_factor
    x = _blur_resize_noise(gt_usm, gt_sizes, sizes, rs, canvas, p, generator)
    return jpeg(x, p['jpeg']) * _valid(sizes, *canvas), sizes


def second_degradation(x, sizes, gt_hw, p, o, generator):
    """Blur where p['blur'], resize relative to the final size (gt_hw / scale), noise."""
    h, w = (d / o['scale'] for d in gt_hw)
    new_sizes = (_sizes(x, h, w) * p['scale'].view(-1, 1)).floor().long()
    canvas = [-(-int(d * max(o['resize_range2'][1], 1)) // 16) * 16 for d in (h, w)]
    rs = sizes.float() / new_sizes
    return _blur_resize_noise(x, sizes, new_sizes, rs, canvas, p, generator), new_sizes


def final_step(x, sizes, gt_hw, p, o):
    """[resize to gt_hw / scale, sinc] then JPEG where p['resize_first'], else the other way."""
    h, w = (d // o['scale'] for d in gt_hw)
    resize_first = p['resize_first'].view(-1, 1, 1, 1)
    x = torch.where(resize_first, x, jpeg(x, p['jpeg']) * _valid(sizes, *x.shape[2:]))
    out_sizes = _sizes(x, h, w)
    x = _resize(x, sizes, out_sizes, sizes.float() / out_sizes, p['mode'], (h, w))
    x = filter2d(x, p['kernel'])
    x = torch.where(resize_first, jpeg(x.clamp(0, 1), p['jpeg']), x)
    return (x * 255).round().clamp(0, 255) / 255


def degrade(gt, generator=None, return_params=False, **overrides):
    """gt (B,3,H,W) in [0,1] -> lq (B,3,H/scale,W/scale), the USM-sharpened gt (and the drawn p),
    choices from generator (on gt's device) or the global RNG; overrides: any option above."""
    o = _options(overrides)
    with torch.no_grad(), torch.autocast(gt.device.type, enabled=False), _full_float32():
        gt = gt.float()
        p = draw_params(len(gt), gt.device, generator, **o)
        add_kernels(p)
        gt_usm = usm_sharp(gt)
        x, sizes = first_degradation(gt_usm, p['first'], o, generator)
        x, sizes = second_degradation(x, sizes, gt.shape[2:], p['second'], o, generator)
        lq = final_step(x, sizes, gt.shape[2:], p['final'], o)  # on 8-bit levels
    return (lq, gt_usm, p) if return_params else (lq, gt_usm)


# ---- command line: degrade a folder, or benchmark
def _gt_paths(folder):  # the image paths in folder; none is an error
    paths = list_images(folder)
    if not paths:
        raise SystemExit(f"error: {folder}: no images ({' '.join(IMG_EXTS)})")
    return paths


def _bench(dev, folder):
    """img/s of degrade() and ms per stage, timing the stage functions that degrade() calls."""
    if folder:
        try:
            gt = torch.stack([read_image(path)[:3] for path in _gt_paths(folder)[:batch_size]])
        except (ValueError, RuntimeError) as e:  # unreadable, or of different sizes
            raise SystemExit(f"error: --bench {folder}: {str(e).splitlines()[0]}")
    else:
        noise = torch.rand(batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
        gt = F.interpolate(noise, size=(512, 512), mode='bicubic').clamp(0, 1)
    gt = gt.to(dev)
    hw = gt.shape[2:]
    g = torch.Generator(dev).manual_seed(seed)
    o = _options({})
    sync = getattr(torch, dev.type).synchronize if dev.type in ('cuda', 'mps') else lambda: None
    ms = {}  # stage: ms per batch, the mean of 5 rounds

    def timed(stage, fn, *args):
        sync()
        t0 = time.perf_counter()
        out = fn(*args)
        sync()
        ms[stage] = ms.get(stage, 0) + (time.perf_counter() - t0) * 1000 / 5
        return out
    degrade(gt, g)  # warm-up
    with torch.no_grad(), _full_float32():
        for _ in range(5):
            p = timed('draw', draw_params, len(gt), dev, g)
            timed('kernels', add_kernels, p)
            gt_usm = timed('usm', usm_sharp, gt)
            x, sizes = timed('first', first_degradation, gt_usm, p['first'], o, g)
            x, sizes = timed('second', second_degradation, x, sizes, hw, p['second'], o, g)
            timed('final', final_step, x, sizes, hw, p['final'], o)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        degrade(gt, g)
    total = sum(ms.values())
    print(f"degrade: {len(gt)} x {tuple(gt.shape[1:])} {folder or 'synthetic'} on {dev} "
          f"({torch.get_num_threads()} threads): {len(gt) * 1000 / total:.1f} img/s, "
          f"{total:.0f} ms per batch, "
          f"{sum(e.cpu_parent is None for e in prof.events())} top-level ops per call")
    print('  ms per batch: ' + ', '.join(f"{k} {v:.0f}" for k, v in ms.items()))


def main(argv=None):
    args, config = configure(globals(), argv)
    try:
        _options({}, list(_VALID))  # the globals configure set
    except ValueError as e:
        raise SystemExit(f"error: --{e}")
    print('config:', config)
    dev = pick_device(device)
    torch.set_num_threads(threads or torch.get_num_threads())
    if bench and len(args) < 2:
        return _bench(dev, args[0] if args else '')
    if len(args) != 2 or bench:
        raise SystemExit(f"error: expected GT_DIR LQ_DIR, or --bench [GT_DIR]; got {args} "
                         "(python degrade.py --help)")
    gt_dir, lq_dir = args
    if os.path.realpath(gt_dir) == os.path.realpath(lq_dir):
        raise SystemExit(f"error: LQ_DIR {lq_dir} is GT_DIR: refusing to write into it")
    paths = _gt_paths(gt_dir)
    names = [os.path.splitext(os.path.basename(path))[0] + '.png' for path in paths]
    if len(set(names)) < len(names):  # a.jpg and a.png: one LQ would overwrite the other
        twins = [path for path, name in zip(paths, names) if names.count(name) > 1]
        raise SystemExit(f"error: {twins[0]} and {twins[1]}: one LQ name; rename one of them")
    try:
        os.makedirs(lq_dir, exist_ok=True)
    except OSError as e:  # a file, under a file, no permission
        raise SystemExit(f"error: LQ_DIR {lq_dir}: cannot be made a folder ({e.strerror})")
    g = torch.Generator(dev).manual_seed(seed)
    skipped = 0
    for i in range(0, len(paths), batch_size):
        batch = {}  # LQ path: GT image
        for path, name in zip(paths[i:i + batch_size], names[i:i + batch_size]):
            try:
                img = read_image(path)
                if img.shape[1:] != (512, 512):
                    raise ValueError(f"{path}: expected a 512x512 image, "
                                     f"got {img.shape[2]}x{img.shape[1]}")
                batch[os.path.join(lq_dir, name)] = img[:3]
            except ValueError as e:
                print(f"skipped {e}", flush=True)
                skipped += 1
        if batch:
            lqs = degrade(torch.stack(list(batch.values())).to(dev), g)[0]
            for path, lq in zip(batch, lqs):
                try:
                    write_image(path, lq)
                except OSError as e:  # no permission, a full disk: the LQs written so far stay
                    raise SystemExit(f"error: {path}: cannot write ({e.strerror or e})")
        done = min(i + batch_size, len(paths)) - skipped
        print(f"{done}/{len(paths)} written to {lq_dir}", flush=True)
    if skipped:
        raise SystemExit(f"error: {skipped} of {len(paths)} images skipped (named above)")


# ==== shared by the scripts: image I/O, metrics, config ====
IMG_EXTS = ('.png', '.jpg', '.jpeg', '.webp', '.bmp')


def list_images(folder):  # sorted image paths in folder (by extension)
    try:
        names = [f for f in os.listdir(folder) if f.lower().endswith(IMG_EXTS)]
    except OSError as e:  # missing, a file, no permission
        raise SystemExit(f"error: {folder}: not a folder we can read ({e.strerror})")
    return sorted(os.path.join(folder, f) for f in names)


def read_image(path):
    """Image file -> float32 (C,H,W) in [0,1], C=4 with alpha; ValueError if it is unreadable."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ('I;16', 'I;16B', 'I;16L', 'I'):  # 16-bit gray: keep the precision
                a = np.asarray(im, dtype=np.float32) / 65535.0
                return torch.from_numpy(a).clamp(0, 1)[None].expand(3, -1, -1).contiguous()
            alpha = im.mode in ('RGBA', 'LA', 'PA') or 'transparency' in im.info and im.mode == 'P'
            a = np.asarray(im.convert('RGBA' if alpha else 'RGB'), dtype=np.float32) / 255.0
    except Exception as e:
        raise ValueError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None
    return torch.from_numpy(a).permute(2, 0, 1).contiguous()


def to_uint8(img):  # float [0,1] -> uint8, rounded like the reference (clamp, *255, round)
    return (img.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8)


def upscale_bicubic(img, scale=4):
    """uint8 (3,H,W) -> (3,sH,sW) by PIL's bicubic: the README's floor (26.35 dB on val; torch's
    bicubic, another kernel, gives 26.27)."""
    im = Image.fromarray(img.cpu().permute(1, 2, 0).numpy())
    big = im.resize((im.width * scale, im.height * scale), Image.BICUBIC)
    return torch.from_numpy(np.array(big)).permute(2, 0, 1)


def save_atomic(path, write):
    """write(temporary path) next to path, then rename it to path: a crash or a full disk never
    leaves a half-written file, and an existing file stays intact until the new one is complete."""
    tmp = f"{path}.{os.getpid()}.tmp"  # one per process; made by write, as a plain open() would
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_image(path, img):  # (C,H,W) float [0,1] or uint8 -> PNG at path, atomically
    a = (img if img.dtype == torch.uint8 else to_uint8(img)).cpu().permute(1, 2, 0).numpy()
    a = a[..., 0] if a.shape[2] == 1 else a
    save_atomic(path, lambda tmp: Image.fromarray(a).save(tmp, format='PNG'))


def _prepare(pred, gt, crop_border, y_channel):  # float64, y_channel: basicsr's rgb2ycbcr luma
    assert pred.shape == gt.shape, f"shape mismatch {tuple(pred.shape)} vs {tuple(gt.shape)}"
    pred, gt = pred.double(), gt.double()
    if y_channel:  # BT.601 luma in [16,235]
        w = torch.tensor([65.481, 128.553, 24.966], dtype=torch.float64, device=pred.device)
        pred, gt = ((torch.einsum('chw,c->hw', x / 255.0, w) + 16.0)[None] for x in (pred, gt))
    c = crop_border
    return (pred[:, c:-c, c:-c], gt[:, c:-c, c:-c]) if c else (pred, gt)


def psnr(pred, gt, crop_border=0, y_channel=False):  # uint8 (3,H,W); default: the challenge's
    pred, gt = _prepare(pred, gt, crop_border, y_channel)
    mse = ((pred - gt) ** 2).mean().item()
    return float('inf') if mse == 0 else 10.0 * np.log10(255.0 ** 2 / mse)


def ssim(pred, gt, crop_border=0, y_channel=True):
    """SSIM of uint8 (3,H,W): 11x11 Gaussian window (sigma 1.5), valid region, channel mean."""
    pred, gt = _prepare(pred, gt, crop_border, y_channel)
    g = torch.exp(-(torch.arange(11, dtype=torch.float64) - 5) ** 2 / (2 * 1.5 ** 2))
    win = (g[:, None] * g[None, :] / g.sum() ** 2)[None, None].to(pred.device)
    blur = lambda x: F.conv2d(x[:, None], win)[:, 0]  # (C,H-10,W-10)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu1, mu2 = blur(pred), blur(gt)
    var1, var2 = blur(pred * pred) - mu1 ** 2, blur(gt * gt) - mu2 ** 2
    cov = blur(pred * gt) - mu1 * mu2
    m = ((2 * mu1 * mu2 + c1) * (2 * cov + c2)) / ((mu1 ** 2 + mu2 ** 2 + c1) * (var1 + var2 + c2))
    return m.mean(dim=(1, 2)).mean().item()


def configure(g, argv=None):
    """Override the config globals in g (lower-case, no '_', of plain types) from --key=value:
    Python literals, a str setting takes the text as is, a bare --key sets a bool; one error line
    for an unknown key or a wrong type; --help: g's docstring and each setting with its comment.
    Returns (positional arguments, resolved config)."""
    argv = sys.argv[1:] if argv is None else argv
    keys = [k for k, v in g.items() if k.islower() and not k.startswith('_')
            and isinstance(v, (int, float, bool, str, list, tuple, type(None)))]
    if '-h' in argv or '--help' in argv:
        source = g.get('__file__') or ''
        source = open(source, encoding='utf-8').read() if os.path.isfile(source) else ''
        comments = dict(reversed(re.findall(r'^(\w+) = .*?  # (.+)$', source, re.M)))  # 1st one
        print((g.get('__doc__') or '').strip() + '\n\nsettings (--key=value):')
        for k in keys:
            print(f"  --{k}={g[k]!r}" + (f"  # {comments[k].strip()}" if k in comments else ''))
        raise SystemExit(0)
    positional = []
    for arg in argv:
        if not arg.startswith('--'):
            positional.append(arg)
            continue
        key, eq, text = arg[2:].partition('=')
        if key not in keys:
            raise SystemExit(f"error: unknown setting --{key} (known: {', '.join(keys)})")
        if not eq and not isinstance(g[key], bool):
            raise SystemExit(f"error: --{key} needs a value: --{key}=VALUE")
        g[key] = _parse_value(key, text, g[key]) if eq else True
    return positional, {k: g[k] for k in keys}


def _parse_value(key, text, default):
    if isinstance(default, str):
        return text[1:-1] if len(text) > 1 and text[0] == text[-1] and text[0] in '\'"' else text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # a bare word
    if default is None:
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(default)(value)
    if type(value) is not type(default):
        raise SystemExit(f"error: --{key} expects {type(default).__name__} (like {default!r}), "
                         f"got {text!r}")
    return value


def pick_device(name=''):  # '' picks cuda, then mps, then cpu; otherwise the named one, checked
    if not name:
        mps = torch.backends.mps.is_available()
        return torch.device('cuda' if torch.cuda.is_available() else 'mps' if mps else 'cpu')
    try:
        dev = torch.device(name)
        torch.empty(1, device=dev)
        torch.Generator(dev)  # the degradation's random choices ('meta' has no generator)
    except (RuntimeError, AssertionError) as e:
        raise SystemExit(f"error: --device={name}: not usable here ({str(e).splitlines()[0]})")
    return dev


if __name__ == '__main__':
    main()
