"""
Network interpolation (ESRGAN): blend a PSNR-trained and a GAN-trained SwinIR weight by weight,

    every weight = alpha * PSNR + (1 - alpha) * GAN

so alpha=1 gives the PSNR model, alpha=0 the GAN model, and the seed report's 0.25 leans towards the
GAN model: its detail, with fewer of its artefacts. EMA weights are used when a checkpoint has them.

    python interpolate.py 0.25                         # psnr.pt + gan.pt -> interp.pt
    python interpolate.py 0.5 --psnr=a.pt --gan=b.pt --out=mix.pt
    python sample.py photos/                           # uses interp.pt first
    python train.py --mode=gan --init=interp.pt        # the blend also starts a run

psnr.pt and gan.pt are what `python train.py --mode=psnr` and `--mode=gan` keep in the working
directory. alpha outside [0, 1], a missing or broken file, a file with no SwinIR in it, two
different architectures or an output path that cannot be written give one error line and write
nothing. The output holds {'model', 'model_args', 'config'}, written to a temp file then renamed.
"""
import os
from dataclasses import asdict

import torch

import degrade
from model import load_generator

# ---- data
psnr = 'psnr.pt'  # PSNR-trained generator (python train.py --mode=psnr keeps it up to date)
gan = 'gan.pt'  # GAN-trained generator (python train.py --mode=gan --init=psnr.pt)
out = 'interp.pt'  # the blend (python sample.py photos/ uses it first)

_MAKERS = {'psnr': 'python train.py --mode=psnr writes psnr.pt',
           'gan': 'python train.py --mode=gan --init=psnr.pt writes gan.pt'}


def parse_alpha(args):
    if len(args) != 1:
        raise SystemExit("error: give alpha in [0, 1] (weight of the PSNR model): "
                         "python interpolate.py 0.25")
    try:
        alpha = float(args[0])
    except ValueError:
        alpha = float('nan')
    if not 0.0 <= alpha <= 1.0:
        raise SystemExit("error: alpha must be a number in [0, 1] (weight of the PSNR model), "
                         f"got {args[0]!r}")
    return alpha


def check_out():
    """--out: a file that is no input, in a folder that exists (or can be made) and is writable;
    checked before any work, so that a wrong path costs nothing."""
    if not out or os.path.isdir(out):
        raise SystemExit(f"error: --out={out}: a folder; give a file name, e.g. --out=interp.pt")
    if os.path.realpath(out) in (os.path.realpath(psnr), os.path.realpath(gan)):
        raise SystemExit(f"error: --out={out} is one of the inputs: it would be overwritten")
    folder = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(folder):  # the nearest existing folder above: makedirs starts there
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise SystemExit(f"error: --out={out}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK):
        raise SystemExit(f"error: --out={out}: the folder {folder} is not writable")


def load(flag, path):
    """-> (SwinIR, SwinIRConfig) of one input, EMA weights preferred; one error line if not."""
    if not os.path.isfile(path):
        why = 'a folder, not a checkpoint' if os.path.isdir(path) else 'no such file'
        raise SystemExit(f"error: --{flag}={path}: {why} ({_MAKERS[flag]})")
    try:
        return load_generator(path)
    except ValueError as e:  # its message starts with the path
        raise SystemExit(f"error: --{flag}={e}")


def check_same_architecture(cfg_p, cfg_g):
    """Equal configs build equal keys and shapes; img_size only keeps official kwargs loadable."""
    a = asdict(cfg_p)
    b = asdict(cfg_g)
    diff = [f"{k} ({a[k]!r} vs {b[k]!r})" for k in a if k != 'img_size' and a[k] != b[k]]
    if diff:
        raise SystemExit(f"error: --psnr={psnr} and --gan={gan} are different architectures: "
                         f"{', '.join(diff)}")


def blend(p, g, alpha):
    """alpha * p + (1 - alpha) * g for float tensors (computed in float32 at least, stored in p's
    dtype), so alpha 1 and 0 give p and g exactly; other tensors (indices) are copied from p."""
    mixed = {}
    for k, a in p.items():
        if a.is_floating_point():
            acc = torch.promote_types(a.dtype, torch.float32)
            mixed[k] = (alpha * a.to(acc) + (1.0 - alpha) * g[k].to(acc)).to(a.dtype)
        else:
            mixed[k] = a.clone()
    return mixed


if __name__ == '__main__':
    args, config = degrade.configure(globals())
    print(config)
    alpha = parse_alpha(args)
    check_out()
    model_p, cfg_p = load('psnr', psnr)
    model_g, cfg_g = load('gan', gan)
    check_same_architecture(cfg_p, cfg_g)
    p = model_p.state_dict()
    result = {'model': blend(p, model_g.state_dict(), alpha), 'model_args': asdict(cfg_p),
              'config': {'alpha': alpha, 'psnr': psnr, 'gan': gan}}
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        degrade.save_atomic(out, lambda tmp: torch.save(result, tmp))
    except OSError as e:  # a full disk: save_atomic leaves no partial file and the old one intact
        raise SystemExit(f"error: --out={out}: cannot write it ({e})")
    print(f"wrote {out}: {alpha:g} x {psnr} + {1 - alpha:g} x {gan} ({len(p)} tensors)")
