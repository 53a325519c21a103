"""
The Real-ESRGAN second-order degradation in pure torch, batched, every random choice per sample.
Also home of what the scripts share: image I/O, PSNR/SSIM, the --key=value config parser.

    python degrade.py GT_DIR LQ_DIR --seed=0      # write one 128x128 LQ PNG per GT face
    python degrade.py --bench                     # img/s for 8 x 512x512 faces, time per stage
    python degrade.py --bench --device=cuda --batch_size=32

Per-sample design: images of different sizes share one zero canvas (top-left, valid sizes kept as
(B,2) tensors); resizes are per-sample (out x in) matrices applied with batched matmuls, blurs are
FFT correlations of per-sample reflect-padded (gathered) images, the JPEG works on whole canvases
(zeros outside = the reference's zero padding). Nothing reads a drawn value back to the host.
"""
import ast
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# ==== DEGRADATION (issue 2) ====
_before_options = set(globals())
# ---- first degradation (AI6126 2024 challenge options, Real-ESRGAN names)
kernel_prob = [0.45, 0.25, 0.12, 0.03, 0.12, 0.03]  # iso, aniso, generalized_iso/aniso, plateau_iso/aniso
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
kernel_prob2 = [0.45, 0.25, 0.12, 0.03, 0.12, 0.03]  # as kernel_prob
sinc_prob2 = 0.1  # as sinc_prob
blur_sigma2 = [0.2, 1.5]  # as blur_sigma
betag_range2 = [0.5, 4.0]  # as betag_range
betap_range2 = [1.0, 2.0]  # as betap_range
resize_prob2 = [0.3, 0.4, 0.3]  # up / down / keep
resize_range2 = [0.3, 1.2]  # scale range, relative to the final size
gaussian_noise_prob2 = 0.5  # as gaussian_noise_prob
noise_range2 = [1.0, 15.0]  # as noise_range
poisson_scale_range2 = [0.05, 1.5]  # as poisson_scale_range
gray_noise_prob2 = 0.4  # as gray_noise_prob
jpeg_range2 = [70.0, 95.0]  # JPEG quality range of the final step
# ---- final step
final_sinc_prob = 0.8  # final sinc filter, else identity
scale = 4  # the LQ is gt / scale
_OPTIONS = {k: v for k, v in globals().items() if k not in _before_options and not k.startswith('_')}

KSIZE = 21  # all blur kernels are padded to this size; drawn sizes are odd 7..21 as in Real-ESRGAN


def _options(overrides):
    bad = sorted(set(overrides) - set(_OPTIONS))
    if bad:
        raise ValueError(f"unknown degradation option(s) {', '.join(bad)} (known: {', '.join(_OPTIONS)})")
    g = globals()
    return {k: overrides.get(k, g[k]) for k in _OPTIONS}


def _real(dev):  # float64 for the kernel maths, except where the device has none
    return torch.float32 if torch.device(dev or 'cpu').type == 'mps' else torch.float64


# ---- blur kernels (basicsr.data.degradations), batched over parameter tensors
def _bessel_j1(x):
    """J1 by the trapezoidal rule on its periodic integral: ~1e-15 for |x| < 90 (torch's is ~5e-7 off)."""
    t = torch.arange(128, dtype=x.dtype, device=x.device) * (2 * math.pi / 128)
    return torch.cos(t - x[..., None] * t.sin()).mean(-1)


def _kernel(size, family, sx, sy, theta, beta, omega):
    """(B,size,size) unnormalised kernels from (B,) parameters; family 0 Gaussian, 1 generalized
    Gaussian, 2 plateau, 3 circular sinc (omega), on basicsr's grid (x = column, y = row, centre 0)."""
    v = lambda t: t.reshape(-1, 1, 1)
    a = torch.arange(size, dtype=sx.dtype, device=sx.device) - size // 2
    y, x = a[:, None], a[None, :]
    c, s, ix, iy = v(theta.cos()), v(theta.sin()), v(sx ** -2), v(sy ** -2)
    q = (c * c * ix + s * s * iy) * x * x + 2 * c * s * (ix - iy) * x * y + (s * s * ix + c * c * iy) * y * y
    qb = q ** v(beta)  # q = [x y] Sigma^-1 [x y]^T with Sigma = R(theta) diag(sx^2, sy^2) R(theta)^T
    r, w = torch.sqrt(x * x + y * y), v(omega)
    sinc = torch.where(r > 0, w * _bessel_j1(w * r) / (2 * math.pi * r.clamp_min(1)), w * w / (4 * math.pi))
    f = v(torch.as_tensor(family, device=sx.device))
    return torch.where(f == 0, torch.exp(-0.5 * q), torch.where(f == 1, torch.exp(-0.5 * qb),
                       torch.where(f == 2, 1 / (qb + 1), sinc)))


def _public_kernel(size, family, sx, sy, theta, beta, omega, isotropic):
    vals = (sx, sy, theta, beta, omega)
    dev = next((t.device for t in vals if torch.is_tensor(t)), None)
    sx, sy, theta, beta, omega = torch.broadcast_tensors(
        *(torch.as_tensor(t, dtype=_real(dev), device=dev).reshape(-1) for t in vals))
    if isotropic:  # basicsr: sigma_x for both axes, no rotation
        sy, theta = sx, torch.zeros_like(theta)
    k = _kernel(size, family, sx, sy, theta, beta, omega)
    k = k / k.sum((1, 2), keepdim=True)
    return k if any(torch.is_tensor(t) for t in vals) else k[0]


def bivariate_gaussian(size, sigma_x, sigma_y, theta, isotropic=True):
    return _public_kernel(size, 0, sigma_x, sigma_y, theta, 1.0, 1.0, isotropic)


def bivariate_generalized_gaussian(size, sigma_x, sigma_y, theta, beta, isotropic=True):
    return _public_kernel(size, 1, sigma_x, sigma_y, theta, beta, 1.0, isotropic)


def bivariate_plateau(size, sigma_x, sigma_y, theta, beta, isotropic=True):
    return _public_kernel(size, 2, sigma_x, sigma_y, theta, beta, 1.0, isotropic)


def sinc_kernel(omega_c, size, pad_to=0):
    """2D circular low-pass (basicsr circular_lowpass_kernel), zero-padded to pad_to when larger."""
    p = max(pad_to - size, 0) // 2
    return F.pad(_public_kernel(size, 3, 1.0, 1.0, 0.0, 1.0, omega_c, True), (p, p, p, p))


def _stage_kernel(kind, size, sx, sy, theta, beta, omega, on):
    """Per-sample (B,21,21) float kernels: kind 0..5 as kernel_prob, 6 sinc; cut to the drawn size
    (= basicsr's size-k kernel padded to 21); a delta (identity) where `on` is False."""
    k = _kernel(KSIZE, kind // 2, sx, sy, theta, beta, omega)
    a = (torch.arange(KSIZE, device=kind.device) - KSIZE // 2).abs()
    k = k * ((a[:, None] <= size.view(-1, 1, 1) // 2) & (a <= size.view(-1, 1, 1) // 2))
    delta = (a[:, None] == 0) & (a == 0)
    return torch.where(on.view(-1, 1, 1), k / k.sum((1, 2), keepdim=True), delta.to(k.dtype))


# ---- filtering and resizing on a zero canvas with per-sample valid sizes (B,2)
def _valid(sizes, h, w):  # (B,1,h,w) 1 inside each sample's valid top-left region
    ar = lambda n: torch.arange(n, device=sizes.device)
    return ((ar(h)[:, None] < sizes[:, :1, None]) & (ar(w) < sizes[:, 1:, None]))[:, None].float()


def _fft_len(n):  # smallest 2^a 3^b 5^c >= n: FFTs of those lengths are fast
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def _reflect_index(length, r, n):  # (B,length): padded position -> source index, 'reflect' about each n
    p = (torch.arange(length, device=n.device) - r).abs()
    return ((n[:, None] - 1) - ((n[:, None] - 1) - p).abs()).clamp_min(0)


def filter2d(img, kernels, sizes=None):
    """basicsr filter2D: per-sample (B,k,k) (or one (k,k)) correlation with reflect padding, here as an
    FFT product. sizes (B,2): each image's valid size on a zero canvas (the rest stays zero)."""
    B, C, H, W = img.shape
    k = kernels.shape[-1]
    r = k // 2
    full = torch.tensor([H, W], device=img.device).expand(B, 2)
    n = full if sizes is None else sizes
    nh, nw = _fft_len(H + 2 * r), _fft_len(W + 2 * r)
    x = img.gather(2, _reflect_index(nh, r, n[:, 0])[:, None, :, None].expand(B, C, nh, W))
    x = x.gather(3, _reflect_index(nw, r, n[:, 1])[:, None, None, :].expand(B, C, nh, nw))
    kf = torch.fft.rfft2(kernels.reshape(-1, k, k), s=(nh, nw)).conj().to(torch.complex64)
    out = torch.fft.irfft2(torch.fft.rfft2(x).mul_(kf[:, None]), s=(nh, nw))[..., :H, :W]
    return out if sizes is None else out * _valid(sizes, H, W)


def usm_sharp(img, weight=0.5, radius=50, threshold=10):
    """Unsharp masking as basicsr's USMSharp: Gaussian of cv2.getGaussianKernel(radius|1, 0)."""
    r = radius + 1 - radius % 2
    sigma = 0.3 * ((r - 1) * 0.5 - 1) + 0.8
    g = torch.exp(-(torch.arange(r, dtype=_real(img.device), device=img.device) - r // 2) ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    blur = lambda x: filter2d(x, g[:, None] * g[None])
    residual = img - blur(img)
    soft = blur((residual.abs() * 255 > threshold).float())
    return soft * (img + weight * residual).clamp(0, 1) + (1 - soft) * img


def _cubic(t, a=-0.75):  # torch's bicubic convolution weights for the 4 taps around t in [0,1)
    near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1
    far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.cat([far(t + 1), near(t), near(1 - t), far(2 - t)], -1)


def _resize_matrix(n_in, n_out, rs, mode, rows, cols):
    """(B,rows,cols) matrices doing F.interpolate (align_corners=False, no antialias) along one axis,
    per sample: mode 0 area (adaptive average pooling), 1 bilinear, 2 bicubic; rs = source pixels per
    output pixel as torch uses it (1/scale_factor, or n_in/n_out); rows >= n_out are zero."""
    B, dev = n_in.shape[0], n_in.device
    o = torch.arange(rows, device=dev)[None, :, None]
    ni, no, m = n_in.view(-1, 1, 1), n_out.view(-1, 1, 1), mode.view(-1, 1, 1)
    start, end = o * ni // no, ((o + 1) * ni + no - 1) // no
    w = 1 / (end - start).float()  # area: +w at start, -w at end, then a running sum along the row
    area = torch.zeros(B, rows, cols + 1, device=dev).scatter_add_(
        2, torch.cat([start, end], 2).clamp(max=cols), torch.cat([w, -w], 2)).cumsum(2)[..., :cols]
    src = rs.view(-1, 1, 1).float() * (o + 0.5) - 0.5
    src = torch.where(m == 2, src, src.clamp_min(0))  # linear clamps negative coordinates, cubic does not
    f = src.floor()
    t = src - f
    taps = torch.where(m == 2, _cubic(t), torch.cat([0 * t, 1 - t, t, 0 * t], -1))
    idx = (f.long() + torch.arange(-1, 3, device=dev)).clamp(min=0).minimum(ni - 1)
    mat = torch.zeros(B, rows, cols, device=dev).scatter_add_(2, idx, taps)
    return torch.where(m == 0, area, mat) * (o < no)


def _resize(img, n_in, n_out, rs, mode, out_hw):
    """Per-sample resize of each valid (n_in) region to n_out (all (B,2)), onto an out_hw canvas."""
    B, C, H, W = img.shape
    rh = _resize_matrix(n_in[:, 0], n_out[:, 0], rs[:, 0], mode, out_hw[0], H)
    rw = _resize_matrix(n_in[:, 1], n_out[:, 1], rs[:, 1], mode, out_hw[1], W)
    return torch.matmul(rh[:, None], torch.bmm(img.flatten(1, 2), rw.transpose(1, 2)).view(B, C, H, -1))


# ---- noise (basicsr generate_*_noise_pt), per-sample level and gray flag
def gaussian_noise(img, sigma, gray, generator=None):
    """Noise to add: N(0, sigma/255) per pixel, sigma (B,) in 8-bit levels; gray: one field for all channels."""
    n = torch.randn(img.shape, generator=generator, device=img.device).mul_(sigma.float().view(-1, 1, 1, 1) / 255)
    return torch.where(gray.view(-1, 1, 1, 1), n[:, :1], n)


_LUMA = (0.2989, 0.587, 0.114)  # torchvision rgb_to_grayscale, as basicsr's gray Poisson noise


def poisson_noise(img, scale, gray, generator=None, sizes=None):
    """Noise to add: (Poisson(x*v)/v - x)*scale with x the image rounded to 8 bits and v the count of its
    distinct levels rounded up to a power of 2, per sample (gray: of the luma, one field). Samples with
    scale 0 (and a gray sample's 2nd/3rd channel) get rate 0, which costs torch.poisson almost nothing."""
    B, C, H, W = img.shape
    dev, gv, sv = img.device, gray.view(-1, 1, 1, 1), scale.float().view(-1, 1, 1, 1)
    luma = torch.einsum('bchw,c->bhw', img, img.new_tensor(_LUMA))[:, None]
    lev = (torch.where(gv, luma, img) * 255).round_().clamp_(0, 255)
    # distinct levels: mark bins 1..256 of each sample (bin 0 collects the pixels outside the valid region)
    idx = (lev + 1).mul_(1 if sizes is None else _valid(sizes, H, W)).long()
    idx += 257 * torch.arange(B, device=dev).view(-1, 1, 1, 1)
    seen = torch.zeros(B * 257, device=dev).index_put_((idx.flatten(),), torch.ones((), device=dev))
    v = 2 ** torch.ceil(torch.log2(seen.view(B, 257)[:, 1:].sum(1).clamp_min(1))).view(-1, 1, 1, 1)
    keep = (sv > 0) & ~(gv & (torch.arange(C, device=dev) > 0).view(1, -1, 1, 1))
    noise = torch.poisson(lev * (v / 255 * keep), generator=generator).mul_(sv / v).sub_(lev * (sv / 255))
    return torch.where(gv, noise[:, :1], noise)


# ---- JPEG round trip (basicsr DiffJPEG, differentiable=False)
_Y_TABLE = torch.tensor([[16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55],
                         [14, 13, 16, 24, 40, 57, 69, 56], [14, 17, 22, 29, 51, 87, 80, 62],
                         [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
                         [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]]).float().T
_C_TABLE = torch.full((8, 8), 99.0)
_C_TABLE[:4, :4] = torch.tensor([[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99.0]])
_RGB2YCC = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
_YCC2RGB = torch.tensor([[1.0, 0.0, 1.402], [1.0, -0.344136, -0.714136], [1.0, 1.772, 0.0]])
_d = torch.tensor([[(0.5 ** 0.5 if u == 0 else 1.0) * 0.5 * math.cos((2 * x + 1) * u * math.pi / 16)
                    for x in range(8)] for u in range(8)], dtype=torch.float64)
_DCT = torch.kron(_d, _d).float()  # (64,64): row-major block -> row-major D X D^T coefficients (orthonormal)


def _dct_round_trip(x, table, factor):
    """(B,c,h,w), h and w multiples of 8: blockwise DCT, quantise with table*factor (B,), back."""
    B, c, h, w = x.shape
    dct = _DCT.to(x.device)
    # clamp: quality 100 gives factor 0, a zero table (basicsr divides by it); libjpeg also keeps steps >= 1
    q = (table.to(x.device).flatten() * factor.view(-1, 1, 1)).clamp_min(1)
    coef = (x - 128).view(B, c, h // 8, 8, w // 8, 8).transpose(3, 4).reshape(B, -1, 64) @ dct.T
    blocks = (torch.round(coef / q).mul_(q) @ dct).add_(128)
    return blocks.view(B, c, h // 8, w // 8, 8, 8).transpose(3, 4).reshape(B, c, h, w)


def jpeg(img, quality):
    """JPEG encode/decode of (B,3,H,W) in [0,1] at per-sample quality (B,) (or one number): YCbCr, 4:2:0
    chroma by 2x2 means, 8x8 DCT, standard tables scaled as in libjpeg/DiffJPEG, true rounding, zero
    padding to multiples of 16, clamp."""
    B, _, H, W = img.shape
    q = torch.as_tensor(quality, dtype=torch.float32, device=img.device).expand(B)
    factor = torch.where(q < 50, 5000 / q, 200 - q * 2) / 100
    shift = img.new_tensor([0.0, 128.0, 128.0]).view(1, 3, 1, 1)
    x = F.pad(img, (0, -W % 16, 0, -H % 16)) * 255
    ycc = torch.einsum('bchw,jc->bjhw', x, _RGB2YCC.to(img.device)).add_(shift)
    y = _dct_round_trip(ycc[:, :1], _Y_TABLE, factor)
    c = F.interpolate(_dct_round_trip(F.avg_pool2d(ycc[:, 1:], 2), _C_TABLE, factor), scale_factor=2.0)
    rgb = torch.einsum('bchw,jc->bjhw', torch.cat([y, c], 1).sub_(shift), _YCC2RGB.to(img.device))
    return rgb[..., :H, :W].clamp(0, 255) / 255


# ---- the pipeline (Real-ESRGAN feed_data, every choice per sample)
def draw_params(n, device='cpu', generator=None, **overrides):
    """Every random choice of degrade() for n samples, as (n,) tensors on device (kernels are made
    from them in degrade). kind: 0..5 as kernel_prob, 6 sinc; updown: 0 up, 1 down, 2 keep;
    mode: 0 area, 1 bilinear, 2 bicubic; scale1 is the scale factor, scale2 relative to the final size."""
    o, dev = _options(overrides), torch.device(device)
    rand = lambda: torch.rand(n, generator=generator, device=dev, dtype=_real(dev))
    uniform = lambda lo, hi: lo + (hi - lo) * rand()

    def pick(probs):  # index i with probability probs[i]
        c = torch.tensor(probs, dtype=_real(dev), device=dev).cumsum(0)
        return (rand()[:, None] * c[-1] >= c[:-1]).sum(1)

    def ksize():  # odd 7..KSIZE
        return 7 + 2 * torch.randint(0, (KSIZE - 5) // 2, (n,), generator=generator, device=dev)

    p = {}
    for s, x in (('1', ''), ('2', '2')):
        kind = torch.where(rand() < o['sinc_prob' + x], 6, pick(o['kernel_prob' + x]))
        size, iso, half, u = ksize(), kind % 2 == 0, rand() < 0.5, rand()
        sx, sy, theta = uniform(*o['blur_sigma' + x]), uniform(*o['blur_sigma' + x]), uniform(-math.pi, math.pi)
        (g0, g1), (p0, p1) = o['betag_range' + x], o['betap_range' + x]
        lo, hi = torch.where(kind < 4, g0, p0), torch.where(kind < 4, g1, p1)
        w0 = torch.where(size < 13, math.pi / 3, math.pi / 5)  # basicsr: wider sinc range for large kernels
        p.update({f'kind{s}': kind, f'ksize{s}': size, f'sigma_x{s}': sx, f'sigma_y{s}': torch.where(iso, sx, sy),
                  f'theta{s}': torch.where(iso, 0.0, theta), f'omega{s}': w0 + (math.pi - w0) * rand(),
                  f'beta{s}': torch.where(half, lo + (1 - lo) * u, 1 + (hi - 1) * u)})  # basicsr: half below 1
        updown, (lo, hi), u = pick(o['resize_prob' + x]), o['resize_range' + x], rand()
        p[f'updown{s}'], p[f'mode{s}'] = updown, pick([1, 1, 1])
        p[f'scale{s}'] = torch.where(updown == 0, 1 + (hi - 1) * u, torch.where(updown == 1, lo + (1 - lo) * u, 1.0))
        p[f'gaussian{s}'], p[f'gray{s}'] = rand() < o['gaussian_noise_prob' + x], rand() < o['gray_noise_prob' + x]
        p[f'sigma{s}'], p[f'poisson{s}'] = uniform(*o['noise_range' + x]), uniform(*o['poisson_scale_range' + x])
        p[f'jpeg{s}'] = uniform(*o['jpeg_range' + x])
    p['blur2'], p['sinc3'], p['ksize3'] = rand() < o['second_blur_prob'], rand() < o['final_sinc_prob'], ksize()
    p['omega3'], p['resize_first3'], p['mode3'] = uniform(math.pi / 3, math.pi), rand() < 0.5, pick([1, 1, 1])
    return p


def _kernels(p):
    """The three per-sample (B,21,21) kernels of the drawn parameters."""
    for s, on in (('1', None), ('2', p['blur2'])):
        on = torch.ones_like(p['blur2']) if on is None else on
        p[f'kernel{s}'] = _stage_kernel(*(p[f'{k}{s}'] for k in ('kind', 'ksize', 'sigma_x', 'sigma_y', 'theta',
                                                                 'beta', 'omega')), on)
    one = torch.ones_like(p['omega3'])
    p['kernel3'] = _stage_kernel(torch.full_like(p['ksize3'], 6), p['ksize3'], one, one, 0 * one, one,
                                 p['omega3'], p['sinc3'])


def _add_noise(x, sizes, p, s, generator):
    gauss, gray = p['gaussian' + s], p['gray' + s]
    n = gaussian_noise(x, torch.where(gauss, p['sigma' + s], 0.0), gray, generator)
    n += poisson_noise(x, torch.where(gauss, 0.0, p['poisson' + s]), gray, generator, sizes)
    return (x + n).clamp_(0, 1).mul_(_valid(sizes, *x.shape[2:]))


def _degrade(gt, p, o, generator, tick=lambda stage: None):
    B, _, H, W = gt.shape
    full = torch.tensor([H, W], device=gt.device).expand(B, 2)
    _kernels(p)
    tick('kernels')
    gt_usm = usm_sharp(gt)
    tick('usm')
    # first degradation: blur, resize (scale_factor), noise, JPEG; canvas fits the largest drawable size
    x = filter2d(gt_usm, p['kernel1'].float())
    tick('blur1')
    s1 = p['scale1'].view(-1, 1)
    n1 = (full * s1).floor().long()
    c1 = n1.amax(0).tolist() if gt.device.type == 'cpu' else [int(d * max(o['resize_range'][1], 1)) for d in (H, W)]
    c1 = [-(-c // 16) * 16 for c in c1]  # a fixed canvas on accelerators; on the CPU (no sync cost) a tight one
    x = _resize(x, full, n1, (1 / s1).float().expand(B, 2), p['mode1'], c1)
    tick('resize1')
    x = _add_noise(x, n1, p, '1', generator)
    tick('noise1')
    x = jpeg(x, p['jpeg1']) * _valid(n1, *c1)
    tick('jpeg1')
    # second degradation: blur (or not), resize relative to the final size, noise
    x = filter2d(x, p['kernel2'].float(), n1)
    tick('blur2')
    n2 = (full / o['scale'] * p['scale2'].view(-1, 1)).floor().long()
    c2 = [-(-int(d / o['scale'] * max(o['resize_range2'][1], 1)) // 16) * 16 for d in (H, W)]
    x = _resize(x, n1, n2, n1.float() / n2, p['mode2'], c2)
    tick('resize2')
    x = _add_noise(x, n2, p, '2', generator)
    tick('noise2')
    # final: [resize + sinc] then JPEG, or JPEG then [resize + sinc], per sample; round to 8 bits
    first = p['resize_first3'].view(-1, 1, 1, 1)
    x = torch.where(first, x, jpeg(x, p['jpeg2']) * _valid(n2, *c2))
    n3 = full // o['scale']
    x = _resize(x, n2, n3, n2.float() / n3, p['mode3'], (H // o['scale'], W // o['scale']))
    x = filter2d(x, p['kernel3'].float())
    x = torch.where(first, jpeg(x.clamp(0, 1), p['jpeg2']), x)
    lq = (x * 255).round().clamp(0, 255) / 255
    tick('final')
    return lq, gt_usm


def degrade(gt, generator=None, return_params=False, **overrides):
    """gt (B,3,H,W) in [0,1] -> (lq (B,3,H/scale,W/scale) on 8-bit levels, gt_usm), and the drawn
    parameters when asked. Random choices come from generator (on gt's device) or the global RNG;
    overrides: any option global above. Computed in float32 even under autocast."""
    o = _options(overrides)
    with torch.no_grad(), torch.autocast(gt.device.type, enabled=False):
        p = draw_params(gt.shape[0], gt.device, generator, **o)
        lq, gt_usm = _degrade(gt.float(), p, o, generator)
    return (lq, gt_usm, p) if return_params else (lq, gt_usm)


# ---- command line: make an LQ folder, or benchmark
def _bench(dev, batch_size, seed):
    gt_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'shared', 'data', 'faces', 'val', 'GT')
    paths = list_images(gt_dir)[:batch_size] if os.path.isdir(gt_dir) else []
    gt = torch.stack([read_image(q)[:3] for q in paths]) if len(paths) == batch_size else \
        F.interpolate(torch.rand(batch_size, 3, 16, 16), size=(512, 512), mode='bicubic').clamp(0, 1)
    gt, g = gt.to(dev), torch.Generator(dev).manual_seed(seed)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == 'cuda' else lambda: None
    degrade(gt, g)  # warm-up
    times, rounds = {}, 5
    for _ in range(rounds):
        sync()
        last = [time.perf_counter()]

        def tick(stage):
            sync()
            now = time.perf_counter()
            times[stage] = times.get(stage, 0.0) + now - last[0]
            last[0] = now
        with torch.no_grad():
            _degrade(gt, draw_params(batch_size, dev, g), _options({}), g, tick)
    total = sum(times.values()) / rounds
    print(f"degrade: {batch_size} x {tuple(gt.shape[1:])} ({'faces' if paths else 'synthetic'}) on {dev}: "
          f"{batch_size / total:.1f} img/s ({total * 1000:.0f} ms per batch, mean of {rounds})")
    print('  ' + ', '.join(f"{k} {v / rounds * 1000:.0f} ms" for k, v in times.items()))


def main(argv=None):
    cfg = dict(__doc__=__doc__, seed=0, device='', batch_size=8, bench=False)
    args, cfg = configure(cfg, argv)
    print('config:', cfg)
    dev = pick_device(cfg['device'])
    if cfg['bench']:
        return _bench(dev, cfg['batch_size'], cfg['seed'])
    if len(args) != 2:
        raise SystemExit("usage: python degrade.py GT_DIR LQ_DIR [--seed=0] [--device=cpu] (or --bench)")
    gt_dir, lq_dir = args
    if os.path.realpath(gt_dir) == os.path.realpath(lq_dir):
        raise SystemExit(f"error: LQ_DIR {lq_dir} is GT_DIR: refusing to write next to the ground truth")
    paths = list_images(gt_dir)
    os.makedirs(lq_dir, exist_ok=True)
    g, size, skipped, done = torch.Generator(dev).manual_seed(cfg['seed']), 512, 0, 0
    for i in range(0, len(paths), cfg['batch_size']):
        batch, names = [], []
        for q in paths[i:i + cfg['batch_size']]:
            try:
                img = read_image(q)
                if img.shape[1:] != (size, size):
                    raise ValueError(f"{q}: expected a {size}x{size} image, got {img.shape[2]}x{img.shape[1]}")
            except ValueError as e:
                print(f"\nskipped: {e}", flush=True)
                skipped += 1
                continue
            batch.append(img[:3])
            names.append(os.path.splitext(os.path.basename(q))[0] + '.png')
        if batch:
            lq, _ = degrade(torch.stack(batch).to(dev), g)
            for name, im in zip(names, lq):
                write_image(os.path.join(lq_dir, name), im)
        done += len(batch)
        print(f"\r{done}/{len(paths)} written to {lq_dir}", end='', flush=True)
    print()
    if skipped:
        raise SystemExit(f"error: {skipped} of {len(paths)} image(s) skipped (see above)")


# ==== shared by the scripts: image I/O, metrics, config ====
IMG_EXTS = ('.png', '.jpg', '.jpeg', '.webp', '.bmp')


def list_images(folder):
    """Sorted image paths in folder (by extension); a clear error if the folder is missing."""
    if not os.path.isdir(folder):
        raise SystemExit(f"error: {folder}: not a folder")
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMG_EXTS))


def read_image(path):
    """Image file -> float32 (C,H,W) in [0,1]: C=3 (RGB), or 4 when it has alpha. 16-bit aware.
    Raises ValueError naming the file when it cannot be read."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ('I;16', 'I;16B', 'I;16L', 'I'):  # 16-bit gray: keep the precision
                a = np.asarray(im, dtype=np.float32) / 65535.0
                return torch.from_numpy(a).clamp(0, 1)[None].expand(3, -1, -1).contiguous()
            alpha = im.mode in ('RGBA', 'LA', 'PA') or (im.mode == 'P' and 'transparency' in im.info)
            a = np.asarray(im.convert('RGBA' if alpha else 'RGB'), dtype=np.float32) / 255.0
    except Exception as e:
        raise ValueError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None
    return torch.from_numpy(a).permute(2, 0, 1).contiguous()


def to_uint8(img):
    """float [0,1] -> uint8, rounded like the reference (clamp, *255, round)."""
    return (img.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8)


def write_image(path, img):
    """(C,H,W) float [0,1] or uint8 -> PNG at path, written to a temp file then renamed."""
    a = img if img.dtype == torch.uint8 else to_uint8(img)
    a = a.cpu().permute(1, 2, 0).numpy()
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(suffix='.png', dir=folder)
    os.close(fd)
    try:
        Image.fromarray(a[..., 0] if a.shape[2] == 1 else a).save(tmp, format='PNG')
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _y_channel(img):
    """uint8 (3,H,W) RGB -> float64 (1,H,W) BT.601 luma in [16,235], as basicsr's rgb2ycbcr."""
    w = torch.tensor([65.481, 128.553, 24.966], dtype=torch.float64, device=img.device)
    return (torch.einsum('chw,c->hw', img.double() / 255.0, w) + 16.0)[None]


def _prepare(pred, gt, crop_border, y_channel):
    assert pred.shape == gt.shape, f"shape mismatch {tuple(pred.shape)} vs {tuple(gt.shape)}"
    if y_channel:
        pred, gt = _y_channel(pred), _y_channel(gt)
    pred, gt = pred.double(), gt.double()
    if crop_border:
        c = crop_border
        pred, gt = pred[:, c:-c, c:-c], gt[:, c:-c, c:-c]
    return pred, gt


def psnr(pred, gt, crop_border=0, y_channel=False):
    """PSNR of two uint8 (3,H,W) images; default = the challenge convention (RGB, all pixels)."""
    pred, gt = _prepare(pred, gt, crop_border, y_channel)
    mse = ((pred - gt) ** 2).mean().item()
    return float('inf') if mse == 0 else 10.0 * np.log10(255.0 ** 2 / mse)


def ssim(pred, gt, crop_border=0, y_channel=True):
    """SSIM of two uint8 (3,H,W) images: 11x11 Gaussian window (sigma 1.5), valid region,
    mean over channels; y_channel=True is the usual face-SR report convention."""
    pred, gt = _prepare(pred, gt, crop_border, y_channel)
    g = torch.exp(-(torch.arange(11, dtype=torch.float64) - 5) ** 2 / (2 * 1.5 ** 2))
    win = (g[:, None] * g[None, :] / g.sum() ** 2)[None, None].to(pred.device)
    blur = lambda x: F.conv2d(x[:, None], win)[:, 0]  # (C,H-10,W-10)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu1, mu2 = blur(pred), blur(gt)
    s11, s22, s12 = blur(pred * pred) - mu1 ** 2, blur(gt * gt) - mu2 ** 2, blur(pred * gt) - mu1 * mu2
    m = ((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) / ((mu1 ** 2 + mu2 ** 2 + c1) * (s11 + s22 + c2))
    return m.mean(dim=(1, 2)).mean().item()


def configure(g, argv=None):
    """Override the config globals in dict g (ints, floats, bools, strs, lists, tuples, None that
    do not start with '_') from --key=value arguments. Values are Python literals parsed with
    ast.literal_eval; a str setting takes the text as is. Unknown keys and wrong types exit with
    one line naming the flag. Returns (positional arguments, resolved config dict)."""
    argv = sys.argv[1:] if argv is None else argv
    keys = [k for k, v in g.items() if not k.startswith('_')
            and isinstance(v, (int, float, bool, str, list, tuple, type(None)))]
    if '-h' in argv or '--help' in argv:
        print((g.get('__doc__') or '').strip() + '\n\nsettings (--key=value):')
        for k in keys:
            print(f"  --{k}={g[k]!r}")
        raise SystemExit(0)
    positional = []
    for arg in argv:
        if not arg.startswith('--'):
            positional.append(arg)
            continue
        key, eq, text = arg[2:].partition('=')
        if key not in keys:
            raise SystemExit(f"error: unknown setting --{key} (known: {', '.join(keys)})")
        if not eq:
            raise SystemExit(f"error: --{key} needs a value: --{key}=VALUE")
        g[key] = _parse_value(key, text, g[key])
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
        raise SystemExit(f"error: --{key} expects {type(default).__name__} (like {default!r}), got {text!r}")
    return value


def pick_device(name=''):
    """'' picks cuda, then mps, then cpu; otherwise the named device, checked."""
    if not name:
        if torch.cuda.is_available():
            return torch.device('cuda')
        mps = getattr(torch.backends, 'mps', None)
        return torch.device('mps' if mps is not None and mps.is_available() else 'cpu')
    try:
        dev = torch.device(name)
        torch.empty(1, device=dev)
    except (RuntimeError, AssertionError) as e:
        raise SystemExit(f"error: --device={name}: not usable here ({str(e).splitlines()[0]})")
    return dev


if __name__ == '__main__':
    main()
