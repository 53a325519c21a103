"""
The Real-ESRGAN second-order degradation in pure torch, batched, every random choice per sample.
Also home of what the scripts share: image I/O, PSNR/SSIM, the --key=value config parser.

    python degrade.py GT_DIR LQ_DIR --seed=0      # write one 128x128 LQ PNG per GT face
    python degrade.py --bench                     # img/s for 8 x 512x512 faces, time per stage

Per sample without host syncs: images of different sizes share a zero canvas (top-left, sizes in (B,2)
tensors); a resize is one (out x in) matrix per sample and axis, a blur an FFT product after gathering
per-sample reflect indices, JPEG runs on whole canvases (their zeros = the reference's zero padding).
"""
import ast
import functools
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# ==== the degradation ====
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
scale = 4  # the LQ is gt / scale
_OPTIONS = [k for k in globals() if k not in _before_options and not k.startswith('_')]
KSIZE = 21  # kernels are padded to this size; their drawn sizes are odd, 7..21 (Real-ESRGAN)


def _options(overrides):
    bad = sorted(set(overrides) - set(_OPTIONS))
    if bad:
        raise ValueError(f"unknown degradation option(s) {', '.join(bad)}; known: {', '.join(_OPTIONS)}")
    return {k: overrides.get(k, globals()[k]) for k in _OPTIONS}


def _real(dev):  # float64 for the kernel maths, where the device has it
    return torch.float32 if torch.device(dev or 'cpu').type == 'mps' else torch.float64


@functools.lru_cache(maxsize=None)
def _const(name, device, dtype):  # a module constant on a device, copied once (a copy can stall a GPU)
    return globals()[name].to(device, dtype)


# ---- blur kernels (basicsr.data.degradations), batched over (B,) parameter tensors
def _kernel(size, family, sx, sy, theta, beta, omega, cut=None):
    """(B,size,size) kernels summing to 1 from (B,) parameters: family 0 Gaussian, 1 generalized Gaussian,
    2 plateau, 3 circular sinc, on basicsr's grid (x = column, y = row, centre 0); zero outside the
    central cut x cut (B,) (= basicsr's kernel of that size, zero-padded)."""
    v = lambda t: t.reshape(-1, 1, 1)
    a = torch.arange(size, dtype=sx.dtype, device=sx.device) - size // 2
    y, x = a[:, None], a[None, :]
    c, s, ix, iy = v(theta.cos()), v(theta.sin()), v(sx ** -2), v(sy ** -2)
    # q = [x y] Sigma^-1 [x y]^T, Sigma = R(theta) diag(sx^2, sy^2) R(theta)^T
    q = (c * c * ix + s * s * iy) * x * x + 2 * c * s * (ix - iy) * x * y + (s * s * ix + c * c * iy) * y * y
    qb, r, w = q ** v(beta), torch.sqrt(x * x + y * y), v(omega)
    # J1 by the trapezoidal rule on its periodic integral: 1e-15 here (torch.special.bessel_j1: 5e-7)
    t = torch.arange(128, dtype=sx.dtype, device=sx.device) * (2 * math.pi / 128)
    j1 = torch.cos(t - (w * r)[..., None] * t.sin()).mean(-1)
    sinc = torch.where(r > 0, w * j1 / (2 * math.pi * r.clamp_min(1)), w * w / (4 * math.pi))
    f = v(family if torch.is_tensor(family) else torch.full_like(sx, family))
    k = torch.where(f == 0, torch.exp(-0.5 * q), torch.where(
        f == 1, torch.exp(-0.5 * qb), torch.where(f == 2, 1 / (qb + 1), sinc)))
    if cut is not None:
        k = k * ((y.abs() <= v(cut) // 2) & (x.abs() <= v(cut) // 2))
    return k / k.sum((1, 2), keepdim=True)


def _public(size, family, sx, sy, theta, beta=1.0, omega=1.0, isotropic=False):
    """Python float parameters -> (size,size), 1-D tensors -> (B,size,size); isotropic as basicsr:
    sigma_x on both axes, no rotation."""
    vals = (sx, sy, theta, beta, omega)
    dev = next((t.device for t in vals if torch.is_tensor(t)), None)
    sx, sy, theta, beta, omega = torch.broadcast_tensors(
        *(torch.as_tensor(t, dtype=_real(dev), device=dev).reshape(-1) for t in vals))
    k = _kernel(size, family, sx, sx if isotropic else sy, 0 * theta if isotropic else theta, beta, omega)
    return k if any(torch.is_tensor(t) for t in vals) else k[0]


def bivariate_gaussian(size, sigma_x, sigma_y, theta, isotropic=True):
    return _public(size, 0, sigma_x, sigma_y, theta, isotropic=isotropic)


def bivariate_generalized_gaussian(size, sigma_x, sigma_y, theta, beta, isotropic=True):
    return _public(size, 1, sigma_x, sigma_y, theta, beta, isotropic=isotropic)


def bivariate_plateau(size, sigma_x, sigma_y, theta, beta, isotropic=True):
    return _public(size, 2, sigma_x, sigma_y, theta, beta, isotropic=isotropic)


def sinc_kernel(omega_c, size, pad_to=0):
    p = max(pad_to - size, 0) // 2  # basicsr circular_lowpass_kernel, zero-padded to pad_to
    return F.pad(_public(size, 3, 1.0, 1.0, 0.0, omega=omega_c), (p, p, p, p))


# ---- filtering and resizing; images may sit top-left on a zero canvas with valid sizes (B,2)
def _valid(sizes, h, w):  # (B,1,h,w): 1 inside each valid region
    ar = lambda n: torch.arange(n, device=sizes.device)
    return ((ar(h)[:, None] < sizes[:, :1, None]) & (ar(w) < sizes[:, 1:, None]))[:, None].float()


def filter2d(img, kernels, sizes=None):
    """basicsr filter2D: correlation with per-sample (B,k,k) (or one (k,k)) kernels, reflect padding,
    done as an FFT product. sizes (B,2): valid sizes on a zero canvas (kept zero outside)."""
    B, C, H, W = img.shape
    r = kernels.shape[-1] // 2
    n = (H, W) if sizes is None else (sizes[:, :1], sizes[:, 1:])
    nh, nw = (next(m for m in range(d + 2 * r, 4 * d + 8 * r) if 30 ** 20 % m == 0) for d in (H, W))  # 2^a 3^b 5^c

    def reflect(length, n):  # (B or 1,length): source index of each padded position, 'reflect' about n
        p = (torch.arange(length, device=img.device) - r).abs().view(1, -1)
        return ((n - 1) - ((n - 1) - p).abs()).clamp_min(0)
    x = img.gather(2, reflect(nh, n[0])[:, None, :, None].expand(B, C, nh, W))
    x = x.gather(3, reflect(nw, n[1])[:, None, None, :].expand(B, C, nh, nw))
    kf = torch.fft.rfft2(kernels.reshape(-1, 2 * r + 1, 2 * r + 1), s=(nh, nw)).conj().to(torch.complex64)
    out = torch.fft.irfft2(torch.fft.rfft2(x).mul_(kf[:, None]), s=(nh, nw))[..., :H, :W]
    return out if sizes is None else out * _valid(sizes, H, W)


def usm_sharp(img, weight=0.5, radius=50, threshold=10):
    """basicsr USMSharp: sharpen where |img - blur| > threshold/255, blended by the blurred mask; the
    blur is cv2.getGaussianKernel(radius rounded up to odd, sigma 0)."""
    r = radius + 1 - radius % 2
    g = torch.arange(r, dtype=_real(img.device), device=img.device) - r // 2
    g = torch.exp(-g ** 2 / (2 * (0.3 * ((r - 1) * 0.5 - 1) + 0.8) ** 2))
    g = g[:, None] * g / g.sum() ** 2
    residual = img - filter2d(img, g)
    soft = filter2d((residual.abs() * 255 > threshold).float(), g)
    return soft * (img + weight * residual).clamp(0, 1) + (1 - soft) * img


def _resize(img, n_in, n_out, rs, mode, out_hw):
    """Per-sample F.interpolate (align_corners=False, no antialias) of the valid (n_in) regions to n_out
    (both (B,2)) on an out_hw canvas; mode 0 area, 1 bilinear, 2 bicubic; rs (B,2) = input pixels per
    output pixel as torch takes it (1/scale_factor, or n_in/n_out)."""
    B, C, H, W = img.shape

    def matrix(ni, no, rs, rows, cols):  # (B,rows,cols) for one axis; rows from n_out on are zero
        o = torch.arange(rows, device=img.device)[None, :, None]
        ni, no, m = ni.view(-1, 1, 1), no.view(-1, 1, 1), mode.view(-1, 1, 1)
        start, end = o * ni // no, ((o + 1) * ni + no - 1) // no
        w = 1 / (end - start).float()  # area = adaptive average pool: +w at start, -w at end, running sum
        area = torch.zeros(B, rows, cols + 1, device=img.device).scatter_add_(
            2, torch.cat([start, end], 2).clamp(max=cols), torch.cat([w, -w], 2)).cumsum(2)[..., :cols]
        src = rs.view(-1, 1, 1).float() * (o + 0.5) - 0.5
        src = torch.where(m == 2, src, src.clamp_min(0))  # linear clamps negative coordinates, cubic not
        t = src - src.floor()
        near, far = lambda x: (1.25 * x - 2.25) * x * x + 1, lambda x: ((-0.75 * x + 3.75) * x - 6) * x + 3
        taps = torch.where(m == 2, torch.cat([far(t + 1), near(t), near(1 - t), far(2 - t)], 2),
                           torch.cat([0 * t, 1 - t, t, 0 * t], 2))  # cubic: torch's A = -0.75
        idx = (src.floor().long() + torch.arange(-1, 3, device=img.device)).clamp(min=0).minimum(ni - 1)
        mat = torch.zeros(B, rows, cols, device=img.device).scatter_add_(2, idx, taps)
        return torch.where(m == 0, area, mat) * (o < no)
    rh, rw = (matrix(n_in[:, i], n_out[:, i], rs[:, i], out_hw[i], (H, W)[i]) for i in (0, 1))
    return torch.matmul(rh[:, None], torch.bmm(img.flatten(1, 2), rw.transpose(1, 2)).view(B, C, H, -1))


# ---- noise (basicsr generate_*_noise_pt), per-sample level and gray flag
def gaussian_noise(img, sigma, gray, generator=None):
    """Noise to add: N(0, sigma/255) per pixel, sigma (B,) in 8-bit levels; gray: one field for all channels."""
    n = torch.randn(img.shape, generator=generator, device=img.device).mul_(sigma.float().view(-1, 1, 1, 1) / 255)
    return torch.where(gray.view(-1, 1, 1, 1), n[:, :1], n)


def poisson_noise(img, scale, gray, generator=None, sizes=None):
    """Noise to add: (Poisson(x*v)/v - x)*scale with x the image rounded to 8 bits and v its number of
    distinct levels rounded up to a power of 2, per sample (gray: of the luma, one field). Samples with
    scale 0 (and a gray sample's 2nd/3rd channel) get rate 0, which costs torch.poisson almost nothing."""
    B, C, H, W = img.shape
    dev, gv, sv = img.device, gray.view(-1, 1, 1, 1), scale.float().view(-1, 1, 1, 1)
    luma = img[:, :1] * 0.2989 + img[:, 1:2] * 0.587 + img[:, 2:] * 0.114  # torchvision rgb_to_grayscale
    lev = torch.where(gv, luma, img).mul_(255).round_().clamp_(0, 255)
    # distinct levels: one histogram, bins offset by 256 per sample; level 0 also counts the zeros
    # outside the valid region, so it is present only if seen more often than those
    off = 256 * torch.arange(B, device=dev).view(-1, 1, 1, 1) + 0.5
    hist = torch.histc(lev + off, bins=256 * B, min=0, max=256 * B).view(B, 256)
    outside = 0 if sizes is None else C * (H * W - sizes.prod(1))
    count = (hist[:, 1:] > 0).sum(1) + (hist[:, 0] > outside)
    v = 2 ** torch.ceil(torch.log2(count.clamp_min(1).float())).view(-1, 1, 1, 1)
    keep = (sv > 0) & ~(gv & (torch.arange(C, device=dev) > 0).view(1, -1, 1, 1))
    noise = torch.poisson(lev * (v / 255 * keep), generator=generator).mul_(sv / v).sub_(lev.mul_(sv / 255))
    return torch.where(gv, noise[:, :1], noise)


# ---- JPEG round trip (basicsr DiffJPEG, differentiable=False: its tables, colour maps, true rounding)
_Y_TABLE = torch.tensor([16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69,
                         56, 14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104,
                         113, 92, 49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99.0]).view(8, 8).T
_C_TABLE = F.pad(torch.tensor([[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99.0]]), (0, 4, 0, 4),
                 value=99.0)
_RGB2YCC = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
_YCC2RGB = torch.tensor([[1.0, 0.0, 1.402], [1.0, -0.344136, -0.714136], [1.0, 1.772, 0.0]])
_d = torch.tensor([[math.cos((2 * x + 1) * u * math.pi / 16) * (0.5 ** 0.5 if u == 0 else 1) / 2 for x in range(8)]
                   for u in range(8)], dtype=torch.float64)
_DCT = torch.kron(_d, _d).float()  # (64,64) orthonormal: row-major 8x8 block -> row-major D X D^T


def jpeg(img, quality):
    """JPEG encode/decode of (B,3,H,W) in [0,1] at per-sample quality (B,) (or one number): YCbCr, 4:2:0
    chroma by 2x2 means, 8x8 DCT, standard tables scaled as libjpeg does, true rounding, zero padding to
    multiples of 16, clamp. The colour maps are affine, so chroma is made and put back at half size."""
    B, _, H, W = img.shape
    q = torch.as_tensor(quality, dtype=torch.float32, device=img.device).expand(B)
    factor, dct = torch.where(q < 50, 5000 / q, 200 - q * 2) / 100, _const('_DCT', img.device, img.dtype)

    def round_trip(x, table):  # (B,c,h,w): 8x8 block DCT, quantise with table * factor, back
        c, h, w = x.shape[1:]
        # clamp: quality 100 gives factor 0, a zero table (DiffJPEG divides by it); libjpeg keeps steps >= 1
        q = (_const(table, x.device, x.dtype).flatten() * factor.view(-1, 1, 1)).clamp_min(1)
        coef = (x - 128).view(B, c, h // 8, 8, w // 8, 8).transpose(3, 4).reshape(B, -1, 64) @ dct.T
        blocks = (torch.round(coef / q).mul_(q) @ dct).add_(128)
        return blocks.view(B, c, h // 8, w // 8, 8, 8).transpose(3, 4).reshape(B, c, h, w)
    x = F.pad(img, (0, -W % 16, 0, -H % 16)) if H % 16 or W % 16 else img
    m, minv = _const('_RGB2YCC', img.device, img.dtype) * 255, _const('_YCC2RGB', img.device, img.dtype)
    y = round_trip(x[:, :1] * m[0, 0] + x[:, 1:2] * m[0, 1] + x[:, 2:] * m[0, 2], '_Y_TABLE')
    c = round_trip(torch.einsum('bchw,jc->bjhw', F.avg_pool2d(x, 2), m[1:]) + 128, '_C_TABLE')
    rgb = F.interpolate(torch.einsum('bchw,jc->bjhw', c - 128, minv[:, 1:]), scale_factor=2.0).add_(y)
    return rgb[..., :H, :W].contiguous().clamp_(0, 255).mul_(1 / 255)


# ---- the pipeline (Real-ESRGAN feed_data, every choice per sample)
def draw_params(n, device='cpu', generator=None, **overrides):
    """Every random choice of degrade() for n samples as (n,) tensors (degrade adds the kernels).
    kind: 0..5 as kernel_prob, 6 sinc; updown: 0 up, 1 down, 2 keep; mode: 0 area, 1 bilinear, 2 bicubic;
    scale1 is a scale factor, scale2 relative to the final size; resize_first3: [resize + sinc] first."""
    o, dev = _options(overrides), torch.device(device)
    rand = lambda: torch.rand(n, generator=generator, device=dev, dtype=_real(dev))
    uniform = lambda lo, hi: lo + (hi - lo) * rand()
    ksize = lambda: 7 + 2 * torch.randint(0, (KSIZE - 5) // 2, (n,), generator=generator, device=dev)

    def pick(probs):  # index i with probability probs[i]
        u, c = rand() * sum(probs), np.cumsum(probs)
        return sum((u >= t).long() for t in c[:-1].tolist())
    p = {}
    for s, x in (('1', ''), ('2', '2')):
        kind = torch.where(rand() < o['sinc_prob'], 6, pick(o['kernel_prob']))
        size, iso, below, u = ksize(), kind % 2 == 0, rand() < 0.5, rand()
        sx, sy, theta = uniform(*o['blur_sigma' + x]), uniform(*o['blur_sigma' + x]), uniform(-math.pi, math.pi)
        (g0, g1), (p0, p1) = o['betag_range'], o['betap_range']
        lo, hi = torch.where(kind < 4, torch.full_like(u, g0), p0), torch.where(kind < 4, torch.full_like(u, g1), p1)
        w0 = torch.where(size < 13, torch.full_like(u, math.pi / 3), math.pi / 5)  # float64 bounds
        p.update({'kind' + s: kind, 'ksize' + s: size, 'sigma_x' + s: sx, 'sigma_y' + s: torch.where(iso, sx, sy),
                  'theta' + s: torch.where(iso, 0.0, theta), 'omega' + s: w0 + (math.pi - w0) * rand(),
                  'beta' + s: torch.where(below, lo + (1 - lo) * u, 1 + (hi - 1) * u)})  # basicsr: half below 1
        updown, (lo, hi), u = pick(o['resize_prob' + x]), o['resize_range' + x], rand()
        p.update({'updown' + s: updown, 'mode' + s: pick([1, 1, 1]), 'scale' + s: torch.where(
            updown == 0, 1 + (hi - 1) * u, torch.where(updown == 1, lo + (1 - lo) * u, 1.0))})
        p['gaussian' + s], p['gray' + s] = rand() < o['gaussian_noise_prob' + x], rand() < o['gray_noise_prob' + x]
        p['sigma' + s], p['poisson' + s] = uniform(*o['noise_range' + x]), uniform(*o['poisson_scale_range' + x])
        p['jpeg' + s] = uniform(*o['jpeg_range' + x])
    p['blur2'], p['sinc3'], p['ksize3'] = rand() < o['second_blur_prob'], rand() < o['final_sinc_prob'], ksize()
    p['omega3'], p['resize_first3'], p['mode3'] = uniform(math.pi / 3, math.pi), rand() < 0.5, pick([1, 1, 1])
    return p


def _degrade(gt, p, o, generator, tick=lambda stage: None):
    B, _, H, W = gt.shape
    full, one = torch.full((B, 2), H, device=gt.device), torch.ones_like(p['omega3'])
    full[:, 1] = W
    names, delta = ('sigma_x', 'sigma_y', 'theta', 'beta', 'omega'), F.pad(one[:1, None, None], (KSIZE // 2,) * 4)

    def kernel(family, args, size, on):  # (B,21,21); a delta (identity) where `on` is False
        return torch.where(on.view(-1, 1, 1), _kernel(KSIZE, family, *args, cut=size), delta).float()
    p['kernel1'] = kernel(p['kind1'] // 2, [p[k + '1'] for k in names], p['ksize1'], one > 0)
    p['kernel2'] = kernel(p['kind2'] // 2, [p[k + '2'] for k in names], p['ksize2'], p['blur2'])
    p['kernel3'] = kernel(3, [one, one, one, one, p['omega3']], p['ksize3'], p['sinc3'])

    def noise(x, sizes, s):  # Gaussian or Poisson per sample, clamp, keep the canvas zero outside
        gauss, gray = p['gaussian' + s], p['gray' + s]
        n = poisson_noise(x, torch.where(gauss, 0.0, p['poisson' + s]), gray, generator, sizes)
        n += gaussian_noise(x, torch.where(gauss, p['sigma' + s], 0.0), gray, generator)
        return n.add_(x).clamp_(0, 1).mul_(_valid(sizes, *x.shape[2:]))
    tick('kernels')
    gt_usm = usm_sharp(gt)
    tick('usm')
    # first degradation: blur, resize by scale_factor, noise, JPEG
    x = filter2d(gt_usm, p['kernel1'])
    tick('blur1')
    n1 = (full * p['scale1'].view(-1, 1)).floor().long()
    c1 = n1.amax(0).tolist() if gt.device.type == 'cpu' else [int(d * max(o['resize_range'][1], 1)) for d in (H, W)]
    c1 = [-(-c // 16) * 16 for c in c1]
    x = _resize(x, full, n1, (1 / p['scale1'].view(-1, 1)).float().expand(B, 2), p['mode1'], c1)
    tick('resize1')
    x = noise(x, n1, '1')
    tick('noise1')
    x = jpeg(x, p['jpeg1']) * _valid(n1, *c1)
    tick('jpeg1')
    # second degradation: blur (or not), resize relative to the final size, noise
    x = filter2d(x, p['kernel2'], n1)
    tick('blur2')
    n2 = (full / o['scale'] * p['scale2'].view(-1, 1)).floor().long()
    c2 = [-(-int(d / o['scale'] * max(o['resize_range2'][1], 1)) // 16) * 16 for d in (H, W)]
    x = _resize(x, n1, n2, n1.float() / n2, p['mode2'], c2)
    tick('resize2')
    x = noise(x, n2, '2')
    tick('noise2')
    # final: [resize back + sinc] then JPEG, or JPEG then [resize back + sinc]; round to 8 bits
    first = p['resize_first3'].view(-1, 1, 1, 1)
    x = torch.where(first, x, jpeg(x, p['jpeg2']) * _valid(n2, *c2))
    n3 = full // o['scale']
    x = filter2d(_resize(x, n2, n3, n2.float() / n3, p['mode3'], (H // o['scale'], W // o['scale'])), p['kernel3'])
    x = torch.where(first, jpeg(x.clamp(0, 1), p['jpeg2']), x)
    tick('final')
    return (x * 255).round().clamp(0, 255) / 255, gt_usm


def degrade(gt, generator=None, return_params=False, **overrides):
    """gt (B,3,H,W) in [0,1] -> lq (B,3,H/scale,W/scale) on 8-bit levels and the USM-sharpened gt (+ the
    drawn parameters and kernels). Choices come from generator (on gt's device) or the global RNG;
    overrides: any option global above. Runs in float32 even under autocast."""
    o = _options(overrides)
    with torch.no_grad(), torch.autocast(gt.device.type, enabled=False):
        p = draw_params(gt.shape[0], gt.device, generator, **o)
        lq, gt_usm = _degrade(gt.float(), p, o, generator)
    return (lq, gt_usm, p) if return_params else (lq, gt_usm)


# ---- command line: degrade a folder, or benchmark
def _bench(dev, batch_size, seed, o):
    gt_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'shared', 'data', 'faces', 'val', 'GT')
    paths = list_images(gt_dir)[:batch_size] if os.path.isdir(gt_dir) else []
    gt = torch.stack([read_image(q)[:3] for q in paths]) if len(paths) == batch_size else \
        F.interpolate(torch.rand(batch_size, 3, 32, 32), size=(512, 512), mode='bicubic').clamp(0, 1)
    gt, g, stamps, times, rounds = gt.to(dev), torch.Generator(dev).manual_seed(seed), [], {}, 5
    sync = getattr(torch, dev.type).synchronize if dev.type in ('cuda', 'mps') else lambda: None
    degrade(gt, g, **o)  # warm-up
    with torch.no_grad():
        for _ in range(rounds):
            sync()
            stamps.append(('start', time.perf_counter()))
            _degrade(gt, draw_params(batch_size, dev, g, **o), o, g,
                     lambda stage: (sync(), stamps.append((stage, time.perf_counter()))))
    for (_, t0), (stage, t1) in zip(stamps, stamps[1:]):
        times[stage] = times.get(stage, 0) + (t1 - t0) / rounds * (stage != 'start')
    total = sum(times.values())
    print(f"degrade: {batch_size} x 3x512x512 {'val faces' if paths else 'synthetic images'} on {dev} "
          f"({torch.get_num_threads()} threads): {batch_size / total:.1f} img/s, {total * 1000:.0f} ms per batch")
    print('  ms per batch: ' + ', '.join(f"{k} {v * 1000:.0f}" for k, v in times.items() if k != 'start'))


def main(argv=None):
    argv = ['--bench=True' if a == '--bench' else a for a in (sys.argv[1:] if argv is None else argv)]
    cfg = {'__doc__': __doc__, 'seed': 0, 'device': '', 'batch_size': 8, 'threads': 0, 'bench': False,
           **{k: globals()[k] for k in _OPTIONS}}
    args, cfg = configure(cfg, argv)
    print('config:', cfg)
    dev, opts = pick_device(cfg['device']), {k: cfg[k] for k in _OPTIONS}
    torch.set_num_threads(cfg['threads'] or torch.get_num_threads())
    if cfg['bench']:
        return _bench(dev, cfg['batch_size'], cfg['seed'], opts)
    if len(args) != 2:
        raise SystemExit("usage: python degrade.py GT_DIR LQ_DIR [--seed=0] [--device=cpu] (or --bench)")
    if os.path.realpath(args[0]) == os.path.realpath(args[1]):
        raise SystemExit(f"error: LQ_DIR {args[1]} is GT_DIR: refusing to write into the ground truth folder")
    paths, g, done, skipped = list_images(args[0]), torch.Generator(dev).manual_seed(cfg['seed']), 0, 0
    os.makedirs(args[1], exist_ok=True)
    for i in range(0, len(paths), cfg['batch_size']):
        batch = {}
        for path in paths[i:i + cfg['batch_size']]:
            try:
                img = read_image(path)
                if img.shape[1:] != (512, 512):
                    raise ValueError(f"{path}: expected a 512x512 image, got {img.shape[2]}x{img.shape[1]}")
                batch[os.path.splitext(os.path.basename(path))[0] + '.png'] = img[:3]
            except ValueError as e:
                print(f"skipped {e}", flush=True)
                skipped += 1
        if batch:
            for name, lq in zip(batch, degrade(torch.stack(list(batch.values())).to(dev), g, **opts)[0]):
                write_image(os.path.join(args[1], name), lq)
        done += len(batch)
        print(f"{done}/{len(paths)} written to {args[1]}", end='\r', flush=True)
    print()
    if skipped:
        raise SystemExit(f"error: {skipped} of {len(paths)} images skipped (named above)")


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


def upscale_bicubic(img, scale=4):
    """uint8 (3,H,W) -> uint8 (3,sH,sW) with PIL's bicubic: the convention of the README's bicubic floor
    (26.35 dB on val; torch's bicubic, another kernel, gives 26.27)."""
    im = Image.fromarray(img.cpu().permute(1, 2, 0).numpy())
    return torch.from_numpy(np.array(im.resize((im.width * scale, im.height * scale), Image.BICUBIC))).permute(2, 0, 1)


def save_atomic(path, write):
    """write(temporary path) in path's folder, then rename it to path: a crash or a full disk never
    leaves a half-written file, and an existing file stays intact until the new one is complete."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, suffix='.tmp')
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # the permissions of a plain open(), not mkstemp's 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_image(path, img):
    """(C,H,W) float [0,1] or uint8 -> PNG at path, atomically."""
    a = (img if img.dtype == torch.uint8 else to_uint8(img)).cpu().permute(1, 2, 0).numpy()
    save_atomic(path, lambda tmp: Image.fromarray(a[..., 0] if a.shape[2] == 1 else a).save(tmp, format='PNG'))


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
