"""
The Real-ESRGAN second-order degradation in pure torch, batched, every random choice per sample.
Also home of what the scripts share: image I/O, PSNR/SSIM, the --key=value config parser.

    python degrade.py GT_DIR LQ_DIR --seed=0      # write one 128x128 LQ PNG per GT face
    python degrade.py --bench                     # img/s for 8 x 512x512 faces, time per stage
"""
import ast
import os
import sys
import tempfile

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# ==== DEGRADATION (issue 2) ====

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
