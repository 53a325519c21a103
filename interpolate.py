"""
Network interpolation (ESRGAN): blend a PSNR-trained and a GAN-trained SwinIR weight by weight,

    every weight = alpha * PSNR + (1 - alpha) * GAN

so alpha=1 gives the PSNR model, alpha=0 the GAN model, and the seed report's 0.25 leans towards the
GAN model: its detail, with fewer of its artefacts. EMA weights are used when a checkpoint has them.

    python interpolate.py 0.25                       # out_psnr/best.pt + out_gan/best.pt -> out/interp.pt
    python interpolate.py 0.5 --psnr=a.pt --gan=b.pt --out=mix.pt
    python sample.py photos/ --ckpt=out/interp.pt    # or: python train.py --mode=gan --init=out/interp.pt

alpha outside [0, 1], a missing or unreadable file, or two checkpoints of different architectures
(keys, shapes or model_args differ) give one error line and write nothing. The output holds
{'model', 'model_args', 'config'} and is written to a temp file then renamed.
"""
import os
from dataclasses import asdict

import torch

import degrade
from model import extract_state_dict, load_generator, load_torch_file

# ---- data
psnr = 'out_psnr/best.pt'  # PSNR-trained checkpoint (train.py --mode=psnr --out_dir=out_psnr)
gan = 'out_gan/best.pt'  # GAN-trained checkpoint (train.py --mode=gan --out_dir=out_gan)
out = 'out/interp.pt'  # the blended generator


def parse_alpha(args):
    if len(args) != 1:
        raise SystemExit("error: give alpha in [0, 1] (weight of the PSNR model): python interpolate.py 0.25")
    try:
        alpha = float(args[0])
    except ValueError:
        alpha = float('nan')
    if not 0.0 <= alpha <= 1.0:
        raise SystemExit(f"error: alpha must be a number in [0, 1] (weight of the PSNR model), got {args[0]!r}")
    return alpha


def load(flag, path):
    """-> (state_dict, model_args or None) of a checkpoint, EMA weights preferred; one error line if not."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: --{flag}={path}: no such file")
    try:
        obj = load_torch_file(path, 'a checkpoint')
    except ValueError as e:  # its message starts with the path
        raise SystemExit(f"error: --{flag}={e}")
    try:
        return extract_state_dict(obj)
    except ValueError as e:
        raise SystemExit(f"error: --{flag}={path}: {e}")


def check_same_architecture(p, g, args_p, args_g):
    problems = []
    if args_p is not None and args_g is not None and args_p != args_g:
        problems.append('model_args differ in ' + ', '.join(f"{k} ({args_p.get(k)!r} vs {args_g.get(k)!r})"
                                                           for k in sorted(set(args_p) | set(args_g))
                                                           if args_p.get(k) != args_g.get(k)))
    for side, keys in (('PSNR', p.keys() - g.keys()), ('GAN', g.keys() - p.keys())):
        if keys:
            problems.append(f"{len(keys)} keys only in the {side} model (e.g. {sorted(keys)[0]})")
    shapes = [k for k in p.keys() & g.keys() if p[k].shape != g[k].shape]
    if shapes:
        k = sorted(shapes)[0]
        problems.append(f"{len(shapes)} shapes differ (e.g. {k}: {tuple(p[k].shape)} vs {tuple(g[k].shape)})")
    if problems:
        raise SystemExit(f"error: --psnr={psnr} and --gan={gan} are different architectures: {'; '.join(problems)}")


def blend(p, g, alpha):
    """alpha * p + (1 - alpha) * g for float tensors (computed in float32 at least, stored in p's dtype),
    so alpha 1 and 0 give p and g exactly; other tensors (indices) are copied from p."""
    out = {}
    for k, a in p.items():
        if a.is_floating_point():
            acc = torch.promote_types(a.dtype, torch.float32)
            out[k] = (alpha * a.to(acc) + (1.0 - alpha) * g[k].to(acc)).to(a.dtype)
        else:
            out[k] = a.clone()
    return out


if __name__ == '__main__':
    args, config = degrade.configure(globals())
    print(config)
    alpha = parse_alpha(args)
    if os.path.realpath(out) in (os.path.realpath(psnr), os.path.realpath(gan)):
        raise SystemExit(f"error: --out={out} is one of the inputs: it would be overwritten")
    (p, args_p), (g, args_g) = load('psnr', psnr), load('gan', gan)
    check_same_architecture(p, g, args_p, args_g)
    result = {'model': blend(p, g, alpha), 'model_args': args_p or args_g,
              'config': {'alpha': alpha, 'psnr': psnr, 'gan': gan}}
    try:  # the blend must load as a generator before anything is written
        _, cfg = load_generator(result)
    except ValueError as e:
        raise SystemExit(f"error: the blend of --psnr={psnr} and --gan={gan} does not load as SwinIR: {e}")
    result['model_args'] = asdict(cfg)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    degrade.save_atomic(out, lambda tmp: torch.save(result, tmp))
    print(f"wrote {out}: {alpha:g} x {psnr} + {1 - alpha:g} x {gan} ({len(p)} tensors)")
