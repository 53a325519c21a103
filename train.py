"""
Train SwinIR for 4x blind face super-resolution on faces degraded on the fly (the Real-ESRGAN second
order, degrade.py): first for PSNR (MSE), then with L1 + perceptual + GAN losses.

    python train.py --mode=psnr --out_dir=out_psnr                                  # seed recipe
    python train.py --mode=gan --init=out_psnr/best.pt --out_dir=out_gan
    python train.py --mode=psnr --out_dir=out_psnr --resume=True                    # continue a run
    torchrun --standalone --nproc_per_node=8 train.py --mode=psnr --out_dir=out_psnr  # DDP, a GPU each
    # CPU preset: a 48k-parameter SwinIR that beats bicubic in about 10 minutes on 2 cores
    python train.py --data_dir=../shared/data/faces/train --val_dir=../shared/data/faces/val \\
        --embed_dim=24 --depths=[2,2] --num_heads=[2,2] --patch_size=32 --batch_size=8 --pool_size=300 \\
        --refill_every=100 --learning_rate=4e-4 --max_iters=8000 --eval_interval=2000 --log_interval=200

out_dir gets ckpt.pt (latest, with everything --resume needs), best.pt (best validation PSNR, EMA),
log.jsonl, curves.png (training loss and validation PSNR) and grid.png (bicubic LQ | output | GT).
Every setting below can be overridden with --key=value; --help lists them.
"""
import copy
import hashlib
import json
import math
import os
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.nn.parallel import DistributedDataParallel as DDP

import degrade
from model import SwinIR, SwinIRConfig, UNetConfig, UNetDiscriminatorSN, VGGFeatures, load_generator

# ---- data
data_dir = 'data/train/GT'  # GT faces (png/jpg/jpeg/webp/bmp), each at least gt_size on both sides
val_dir = 'data/val'  # a folder with GT/ and LQ/ (pairs share the file stem); '' = no validation
gt_size = 512  # GT side given to the degradation; larger images are randomly cropped to it
patch_size = 64  # LQ training crop side; the GT crop is 4x (Real-ESRGAN's 64/256)
pool_size = 88  # degraded faces kept on the device: 22 batches of 4, as the seed
refill_every = 1  # every this many iterations the drawn pool entries are replaced by fresh degradations
# ---- model (SwinIRConfig fields; the defaults are the seed model, 2,251,758 parameters)
embed_dim = 78  # channels of the transformer body
depths = [6, 6, 6, 6, 6, 6]  # Swin blocks per residual group
num_heads = [6, 6, 6, 6, 6, 6]  # attention heads per residual group
window_size = 8  # attention window side, in LQ pixels
mlp_ratio = 2.0  # MLP hidden width / embed_dim
upsampler = 'pixelshuffledirect'  # or 'pixelshuffle' / 'nearest+conv' (the official classical / real-world)
resi_connection = '1conv'  # or '3conv', the end of each residual group
# ---- optim
mode = 'psnr'  # 'psnr': MSE to the sharpened GT; 'gan': L1 + perceptual + GAN, D trained alongside
init = ''  # start G from these weights: our checkpoint (EMA preferred) or an official SwinIR file
resume = False  # continue the run in out_dir from out_dir/ckpt.pt
max_iters = 200000  # iterations; the cosine schedule reaches 0 here
batch_size = 4  # crops per iteration and process
learning_rate = 2e-4  # Adam, for G and D, at iteration 0 (cosine decay, no warm-up)
beta1 = 0.9  # Adam
beta2 = 0.999  # Adam
adam_eps = 1e-8  # Adam
weight_decay = 0.0  # Adam (L2, as torch.optim.Adam applies it)
grad_clip = 1.0  # clip the gradient norm of G and of D; 0 = no clipping
ema_decay = 0.999  # EMA of G's weights; the EMA is validated and saved
# ---- gan
pixel_weight = 1.0  # L1 to the sharpened GT
perceptual_weight = 1.0  # L1 between VGG19 features of output and sharpened GT; 0 = no VGG needed
layer_weights = [0.1, 0.1, 1.0, 1.0, 1.0]  # for conv1_2, conv2_2, conv3_4, conv4_4, conv5_4
gan_weight = 0.1  # vanilla GAN (BCE on the discriminator's per-pixel logits); its target is the plain GT
disc_num_feat = 24  # U-Net SN discriminator width (616,057 parameters at 24)
vgg_path = ''  # torchvision vgg19 state dict file; '' = torch hub's cache, then its download
# ---- system
out_dir = 'out'  # checkpoints, logs, curves and image grids
eval_interval = 2000  # validate and save every this many iterations (and at the end)
log_interval = 100  # one progress line (and log.jsonl record) every this many iterations
seed = 0  # weights, crops and degradations; each DDP rank draws its own streams from it
device = ''  # '' = cuda, then mps, then cpu
dtype = 'bfloat16' if torch.cuda.is_available() else 'float32'  # autocast of G and D; degradation is float32
compile = False  # torch.compile G and D

_MODEL_KEYS = ('embed_dim', 'depths', 'num_heads', 'window_size', 'mlp_ratio', 'upsampler', 'resi_connection')
_GRID_FACES = 3  # validation faces shown in grid.png


def check_settings():
    rules = [(mode in ('psnr', 'gan'), f"--mode={mode}: expected 'psnr' or 'gan'"),
             (dtype in ('float32', 'bfloat16'), f"--dtype={dtype}: expected 'float32' or 'bfloat16'"),
             (gt_size % 4 == 0 and 0 < 4 * patch_size <= gt_size,
              f"--patch_size={patch_size}: its 4x GT crop must fit in --gt_size={gt_size} (a multiple of 4)"),
             (0 < batch_size <= pool_size, f"--pool_size={pool_size}: must hold at least --batch_size={batch_size}"),
             (len(layer_weights) == 5, f"--layer_weights: expected 5 weights, got {len(layer_weights)}"),
             (min(refill_every, eval_interval, log_interval) > 0 and max_iters >= 0,
              "--refill_every, --eval_interval, --log_interval must be > 0 and --max_iters >= 0")]
    for ok, message in rules:
        if not ok:
            raise SystemExit(f"error: {message}")


def load_faces(folder):
    """Every GT face decoded once into uint8 (3,H,W), so that no step waits on image decoding."""
    paths = degrade.list_images(folder)  # exits with one line if the folder is missing
    names = {os.path.basename(p) for p in paths}
    bad = [f"{f} (not an image file)" for f in sorted(os.listdir(folder))
           if f not in names and not f.startswith('.') and os.path.isfile(os.path.join(folder, f))]
    faces = []
    for p in paths:
        try:
            img = degrade.read_image(p)[:3]  # an alpha channel is dropped
        except ValueError:
            bad.append(f"{os.path.basename(p)} (unreadable)")
            continue
        if min(img.shape[1:]) < gt_size:
            bad.append(f"{os.path.basename(p)} ({img.shape[2]}x{img.shape[1]} < --gt_size={gt_size})")
        faces.append(degrade.to_uint8(img))
    if bad:
        more = f" and {len(bad) - 6} more" if len(bad) > 6 else ''
        raise SystemExit(f"error: {folder}: cannot train on {', '.join(bad[:6])}{more}")
    if not faces:
        raise SystemExit(f"error: {folder}: no images ({', '.join(degrade.IMG_EXTS)})")
    return faces


def load_val(folder):
    """[(LQ, GT)] uint8 pairs from folder/LQ and folder/GT, matched by file stem."""
    sides = [{os.path.splitext(os.path.basename(p))[0]: p for p in degrade.list_images(os.path.join(folder, s))}
             for s in ('LQ', 'GT')]
    unpaired = sorted(set(sides[0]) ^ set(sides[1]))
    if unpaired or not sides[0]:
        raise SystemExit(f"error: --val_dir={folder}: LQ/ and GT/ must hold images with the same stems"
                         + (f"; unpaired: {', '.join(unpaired[:6])}" if unpaired else '; both are empty'))
    pairs = []
    for stem in sorted(sides[0]):
        try:
            lq, gt = (degrade.to_uint8(degrade.read_image(side[stem])[:3]) for side in sides)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        if gt.shape[1:] != (4 * lq.shape[1], 4 * lq.shape[2]):
            raise SystemExit(f"error: {sides[0][stem]}: {lq.shape[2]}x{lq.shape[1]} is not 1/4 of its GT "
                             f"({gt.shape[2]}x{gt.shape[1]})")
        pairs.append((lq, gt))
    return pairs


class Pool:
    """Degraded faces kept on the device: uint8 LQ and USM-sharpened GT, plus where each GT came from
    (face, top, left, flip), so that the plain GT the GAN needs is cut from the cache instead of stored.
    Each draw takes random entries (a fresh permutation) and, when refilling, puts fresh degradations in
    their place, so a batch mixes degradations made at different times (Real-ESRGAN's queue)."""

    def __init__(self, faces, dev, gen, dgen, state=None):
        self.faces, self.dev, self.gen, self.dgen = faces, dev, gen, dgen
        if state is None:
            parts = [self.fresh(min(batch_size, pool_size - i)) for i in range(0, pool_size, batch_size)]
            state = dict(zip(('lq', 'usm', 'src'), (torch.cat(t) for t in zip(*parts))))
        self.lq, self.usm, self.src = state['lq'].to(dev), state['usm'].to(dev), state['src']

    def state_dict(self):
        return {'lq': self.lq.cpu(), 'usm': self.usm.cpu(), 'src': self.src.clone()}

    def crop(self, src, top, left, size):
        """uint8 (3,size,size) at (top, left) of the (flipped) GT crop that src describes."""
        face, y, x, flip = src
        if flip:
            left = gt_size - left - size
        patch = self.faces[face][:, y + top:y + top + size, x + left:x + left + size]
        return patch.flip(-1) if flip else patch

    def fresh(self, n):
        """n faces, randomly cropped to gt_size and flipped, degraded on the device in float32."""
        src = []
        for face in torch.randint(len(self.faces), (n,), generator=self.gen).tolist():
            h, w = self.faces[face].shape[1:]
            y, x = (int(torch.randint(s - gt_size + 1, (), generator=self.gen)) for s in (h, w))
            src.append([face, y, x, int(torch.randint(2, (), generator=self.gen))])
        gt = torch.stack([self.crop(s, 0, 0, gt_size) for s in src]).to(self.dev).float() / 255
        lq, usm = degrade.degrade(gt, generator=self.dgen)  # (n,3,gt/4,gt/4), (n,3,gt,gt), float32 always
        return degrade.to_uint8(lq), degrade.to_uint8(usm), torch.tensor(src)

    def draw(self, n, refill):
        """n random entries, each cropped at a random place -> float LQ (n,3,p,p), USM GT and plain GT
        (n,3,4p,4p) (plain GT only for the GAN); the drawn entries are then replaced if refill."""
        pick = torch.randperm(len(self.src), generator=self.gen)[:n].tolist()
        p, hp = patch_size, 4 * patch_size
        at = torch.randint(self.lq.shape[-1] - p + 1, (n, 2), generator=self.gen).tolist()
        lq = torch.stack([self.lq[k, :, t:t + p, s:s + p] for k, (t, s) in zip(pick, at)])
        usm = torch.stack([self.usm[k, :, 4 * t:4 * t + hp, 4 * s:4 * s + hp] for k, (t, s) in zip(pick, at)])
        gt = None
        if mode == 'gan':
            gt = torch.stack([self.crop(self.src[k].tolist(), 4 * t, 4 * s, hp) for k, (t, s) in zip(pick, at)])
            gt = gt.to(self.dev).float() / 255
        if refill:
            self.lq[pick], self.usm[pick], self.src[pick] = self.fresh(n)
        return lq.float() / 255, usm.float() / 255, gt


def guarded_step(opt, ok):
    """opt.step(), undone where the 0-dim bool tensor ok is False. Deciding on the device costs a copy
    of the weights and Adam's moments per step; deciding on the host would stall every step on a sync.
    Adam's step counter (a CPU scalar) still ticks on a skipped step: it only sets the bias correction."""
    params = [p for group in opt.param_groups for p in group['params']]

    def live():
        return {(i, k): t for i, p in enumerate(params) for k, t in [('w', p), *opt.state[p].items()] if k != 'step'}
    before = {k: t.detach().clone() for k, t in live().items()}
    opt.step()
    with torch.no_grad():
        for k, t in live().items():  # moments created by this very step roll back to zeros
            t.copy_(torch.where(ok, t, before[k] if k in before else torch.zeros_like(t)))


def clipped_norm(module):
    """Clip the gradient norm to grad_clip; the (unclipped) norm is also the finiteness test of the step:
    it is computed after DDP's all-reduce, so every rank takes the same decision."""
    return torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip if grad_clip > 0 else float('inf'))


@torch.no_grad()
def validate(net, pairs, dev, ctx):
    """Mean PSNR in the challenge convention (uint8 RGB, all pixels, mean over images) and a grid of
    the first faces: bicubic LQ | output | GT."""
    scores, rows = [], []
    for i, (lq, gt) in enumerate(pairs):
        x = lq[None].to(dev).float() / 255
        with ctx:
            y = degrade.to_uint8(net(x)[0]).cpu()
        scores.append(float(degrade.psnr(y, gt)))  # a numpy scalar would not load with weights_only
        if i < _GRID_FACES:
            rows.append(torch.cat([bicubic(lq), y, gt], dim=2))
    return sum(scores) / len(scores), torch.cat(rows, dim=1)


def bicubic(lq):
    return degrade.to_uint8(F.interpolate(lq[None].float() / 255, scale_factor=4, mode='bicubic')[0])


def save_atomic(obj, path):
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or '.', suffix='.tmp')
    os.close(fd)
    try:
        obj.save(tmp, format='PNG') if isinstance(obj, Image.Image) else torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def plot(draw, box, points, title, log_y=False, ref=None):
    """One panel: a polyline of (x, y) points in box, min/max labels, an optional dashed reference y."""
    left, top, right, bottom = box
    draw.rectangle(box, outline='black')
    draw.text((left, top - 16), title, fill='black')
    ys = [math.log10(y) if log_y else y for _, y in points]
    if not points:
        return
    lo, hi = min(ys + ([ref] if ref else [])), max(ys + ([ref] if ref else []))
    lo, hi = (lo - 0.5, hi + 0.5) if hi - lo < 1e-9 else (lo, hi)
    x0, x1 = points[0][0], max(points[-1][0], points[0][0] + 1)
    fx = lambda x: left + (x - x0) / (x1 - x0) * (right - left)  # noqa: E731
    fy = lambda y: bottom - (y - lo) / (hi - lo) * (bottom - top)  # noqa: E731
    if ref is not None:
        for a in range(left, right, 12):
            draw.line([(a, fy(ref)), (min(a + 6, right), fy(ref))], fill='gray')
    xy = [(fx(x), fy(y)) for (x, _), y in zip(points, ys)]
    draw.line(xy, fill='blue', width=2) if len(xy) > 1 else draw.ellipse([xy[0][0] - 2, xy[0][1] - 2, xy[0][0] + 2, xy[0][1] + 2], fill='blue')
    for y in (lo, hi):
        draw.text((left - 58, fy(y) - 6), f"{10 ** y:.3g}" if log_y else f"{y:.2f}", fill='black')
    draw.text((left, bottom + 4), str(x0), fill='black')
    draw.text((right - 60, bottom + 4), f"{x1} iter", fill='black')


def draw_curves(records, path):
    img = Image.new('RGB', (1000, 400), 'white')
    draw = ImageDraw.Draw(img)
    loss = [(r['iter'], r['loss']) for r in records if 'loss' in r and 0 < r['loss'] < float('inf')]
    val = [(r['iter'], r['val_psnr']) for r in records if 'val_psnr' in r]
    ref = next((r['bicubic_psnr'] for r in records if 'bicubic_psnr' in r), None)
    plot(draw, (70, 30, 480, 360), loss, f"training loss ({mode}, log scale)", log_y=True)
    plot(draw, (570, 30, 980, 360), val, "validation PSNR, dB (EMA; dashed: bicubic)", ref=ref)
    save_atomic(img, path)


def checksum(*modules):
    """A short hash of the weights (the same on every DDP rank when they are in step)."""
    h = hashlib.sha256()
    for m in modules:
        for k, t in m.state_dict().items():
            h.update(k.encode() + t.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def stream_seed(rank, restart, stream):
    """Distinct, reproducible RNG seeds per rank and purpose (hash of an int tuple is not salted)."""
    return hash((seed, rank, restart, stream)) & 0x7FFF_FFFF_FFFF_FFFF


def build_generator(ckpt):
    """G from the resumed checkpoint, or from --init (whose own architecture wins over the flags), or new."""
    flags = SwinIRConfig(**{k: globals()[k] for k in _MODEL_KEYS})
    if ckpt is not None:
        g = SwinIR(SwinIRConfig(**ckpt['model_args']))
        g.load_state_dict(ckpt['model'])
        return g
    if not init:
        return SwinIR(flags)
    try:
        g, cfg = load_generator(init, flags)
    except ValueError as e:
        raise SystemExit(f"error: --init: {e}") from None
    differ = [f"{k}={getattr(cfg, k)!r}" for k in _MODEL_KEYS if getattr(cfg, k) != getattr(flags, k)]
    if differ:
        print(f"--init: the architecture comes from {init}: {', '.join(differ)}")
    return g.train()


def setup():
    """Settings, processes, device, data and networks; everything the loop needs, in a dict."""
    _, config = degrade.configure(globals())
    check_settings()
    ddp = 'RANK' in os.environ
    dev = degrade.pick_device(device)
    if ddp:
        dist.init_process_group('nccl' if dev.type == 'cuda' else 'gloo')
        if dev.type == 'cuda':
            dev = torch.device('cuda', int(os.environ['LOCAL_RANK']))
            torch.cuda.set_device(dev)
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')
    if resume and not os.path.isfile(ckpt_path):
        raise SystemExit(f"error: --resume=True: {ckpt_path} not found")
    if not resume and os.path.exists(ckpt_path):
        raise SystemExit(f"error: {ckpt_path} exists: continue it with --resume=True, or pick another --out_dir")
    faces = load_faces(data_dir)
    pairs = load_val(val_dir) if val_dir and rank == 0 else []
    ckpt = torch.load(ckpt_path, map_location='cpu', weights_only=True) if resume else None
    if ckpt is not None and ckpt['config']['mode'] != mode:
        raise SystemExit(f"error: --mode={mode}: {ckpt_path} is a {ckpt['config']['mode']} run")
    torch.manual_seed(seed)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)
    g = build_generator(ckpt).to(dev)
    config.update({k: getattr(g.config, k) for k in _MODEL_KEYS})
    ema = copy.deepcopy(g).eval().requires_grad_(False)
    if ckpt is not None:
        ema.load_state_dict(ckpt['ema'])
    d = vgg = None
    if mode == 'gan':
        d = UNetDiscriminatorSN(UNetConfig(**ckpt['disc_args']) if ckpt else UNetConfig(num_feat=disc_num_feat))
        if ckpt is not None:
            d.load_state_dict(ckpt['disc'])
        d.to(dev).train()
        if perceptual_weight:
            try:
                vgg = VGGFeatures(vgg_path).to(dev)
            except (FileNotFoundError, ValueError) as e:
                raise SystemExit(f"error: --vgg_path: {e}") from None
    adam = dict(lr=learning_rate, betas=(beta1, beta2), eps=adam_eps, weight_decay=weight_decay)
    opt = torch.optim.Adam(g.parameters(), **adam)
    opt_d = torch.optim.Adam(d.parameters(), **adam) if d else None
    if ckpt is not None:
        opt.load_state_dict(ckpt['optimizer'])
        if opt_d:
            opt_d.load_state_dict(ckpt['disc_optimizer'])
    start = ckpt['iter'] if ckpt else 0
    restart = start if rank else 0  # only rank 0's streams and pool are saved: others start afresh
    torch.manual_seed(stream_seed(rank, restart, 0))
    gen = torch.Generator().manual_seed(stream_seed(rank, restart, 1))  # picks, crops and flips
    dgen = torch.Generator(dev).manual_seed(stream_seed(rank, restart, 2))  # the degradation's choices
    own = ckpt['resume'] if ckpt is not None and rank == 0 else None
    if own:
        torch.set_rng_state(own['rng']['torch'])
        gen.set_state(own['rng']['data'])
        dgen.set_state(own['rng']['degrade'])
        if dev.type == 'cuda' and own['rng']['cuda'] is not None:
            torch.cuda.set_rng_state(own['rng']['cuda'], dev)
    pool = Pool(faces, dev, gen, dgen, own['pool'] if own else None)
    g_run, d_fwd = (torch.compile(g), torch.compile(d) if d else None) if compile else (g, d)
    d_run = d_fwd
    if ddp:  # broadcast_buffers=False: D's spectral-norm vectors are updated by every rank in step
        ids = [dev.index] if dev.type == 'cuda' else None
        g_run = DDP(g_run, device_ids=ids, broadcast_buffers=False)
        d_run = DDP(d_fwd, device_ids=ids, broadcast_buffers=False) if d else None
    if dev.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    ctx = nullcontext() if dtype == 'float32' else torch.autocast(dev.type, dtype=torch.bfloat16)
    return dict(config=config, rank=rank, world=world, dev=dev, ctx=ctx, faces=faces, pairs=pairs, g=g, ema=ema,
                d=d, vgg=vgg, opt=opt, opt_d=opt_d, g_run=g_run, d_run=d_run, d_fwd=d_fwd, pool=pool, gen=gen,
                dgen=dgen, start=start, best=ckpt['best_psnr'] if ckpt else -float('inf'))


def train_step(s, lq, usm, gt):
    """One G update (and one D update for the GAN) -> device tensor [G loss, its parts..., D loss, ok flags]."""
    g, d, vgg, ctx = s['g'], s['d'], s['vgg'], s['ctx']
    with ctx:
        out = s['g_run'](lq)
    if mode == 'psnr':
        loss = F.mse_loss(out.float(), usm)
        parts = [loss]
    else:
        d.requires_grad_(False)  # G's adversarial term through the plain D: no D gradient, no DDP hooks
        with ctx:
            l_pix = pixel_weight * F.l1_loss(out.float(), usm)
            l_per = torch.zeros((), device=lq.device)
            if vgg is not None:
                with torch.no_grad():
                    target = vgg(usm)
                l_per = perceptual_weight * sum(w * F.l1_loss(a.float(), b.float())
                                                for w, a, b in zip(layer_weights, vgg(out), target))
            fake = s['d_fwd'](out).float()
            l_gan = gan_weight * F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))
        loss = l_pix + l_per + l_gan
        parts = [l_pix, l_per, l_gan]
    loss.backward()
    ok = torch.isfinite(clipped_norm(g))
    guarded_step(s['opt'], ok)
    s['opt'].zero_grad(set_to_none=True)
    with torch.no_grad():  # a skipped step left g unchanged, so the EMA only moves towards finite weights
        torch._foreach_lerp_(list(s['ema'].parameters()), list(g.parameters()), 1 - ema_decay)
    if mode == 'psnr':
        return torch.stack([loss.detach(), *parts, ok.float()])
    d.requires_grad_(True)
    with ctx:  # real and fake in one forward: one all-reduce and one spectral-norm update per D step
        real, fake = s['d_run'](torch.cat([gt, out.detach().float()])).float().chunk(2)
        l_d = (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
               + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))
    l_d.backward()
    ok_d = torch.isfinite(clipped_norm(d))
    guarded_step(s['opt_d'], ok_d)
    s['opt_d'].zero_grad(set_to_none=True)
    return torch.stack([loss.detach(), *[t.detach() for t in parts], l_d.detach(), ok.float(), ok_d.float()])


def evaluate_and_save(s, it, log):
    """Validate the EMA, write grid.png, best.pt (when better), ckpt.pt (with the resume state), curves."""
    record = {'iter': it}
    if s['pairs']:
        t0 = time.time()
        record['val_psnr'], grid = validate(s['ema'], s['pairs'], s['dev'], s['ctx'])
        degrade.write_image(os.path.join(out_dir, 'grid.png'), grid)
        print(f"iter {it}: val PSNR {record['val_psnr']:.3f} dB (EMA, {len(s['pairs'])} faces, {time.time() - t0:.1f} s)")
    dev, d = s['dev'], s['d']
    ckpt = {'model': s['g'].state_dict(), 'ema': s['ema'].state_dict(), 'disc': d.state_dict() if d else None,
            'optimizer': s['opt'].state_dict(), 'disc_optimizer': s['opt_d'].state_dict() if d else None,
            'model_args': asdict(s['g'].config), 'disc_args': asdict(d.config) if d else None,
            'iter': it, 'best_psnr': max(s['best'], record.get('val_psnr', -float('inf'))), 'config': s['config']}
    if record.get('val_psnr', -float('inf')) > s['best']:
        s['best'] = record['val_psnr']
        save_atomic(ckpt, os.path.join(out_dir, 'best.pt'))
    rng = {'torch': torch.get_rng_state(), 'data': s['gen'].get_state(), 'degrade': s['dgen'].get_state(),
           'cuda': torch.cuda.get_rng_state(dev) if dev.type == 'cuda' else None}
    save_atomic({**ckpt, 'resume': {'rng': rng, 'pool': s['pool'].state_dict()}}, os.path.join(out_dir, 'ckpt.pt'))
    log.append(record)


def read_log(path, upto):
    """log.jsonl records up to iteration upto: a run killed after its last checkpoint logged beyond it."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [r for r in map(json.loads, f) if r['iter'] <= upto]


def write_log(records, path):
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix='.tmp')
    with os.fdopen(fd, 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in records)
    os.replace(tmp, path)


def main():
    s = setup()
    rank, world, pool, start = s['rank'], s['world'], s['pool'], s['start']
    master = rank == 0
    names = ['loss', 'mse'] if mode == 'psnr' else ['loss', 'l1', 'percep', 'gan', 'd']
    flags = ['G'] if mode == 'psnr' else ['G', 'D']
    log_path = os.path.join(out_dir, 'log.jsonl')
    log = []
    if master:
        print(json.dumps(s['config'], indent=1))
        print(f"{sum(p.numel() for p in s['g'].parameters()):,} G parameters, {len(s['faces'])} training faces, "
              f"{len(s['pairs'])} validation pairs, {world} process(es) on {s['dev']}, {dtype}")
        os.makedirs(out_dir, exist_ok=True)
        log = read_log(log_path, start) if resume else []
        if s['pairs'] and not log:
            ref = sum(degrade.psnr(bicubic(lq), gt) for lq, gt in s['pairs']) / len(s['pairs'])
            log.append({'iter': 0, 'bicubic_psnr': ref})
            print(f"bicubic: {ref:.3f} dB on {val_dir}")
        write_log(log, log_path)
    it, hist, t_last = start, [], time.time()
    while True:
        if master and (it == max_iters or (it % eval_interval == 0 and it > start)):
            evaluate_and_save(s, it, log)
            write_log(log, log_path)
            draw_curves(log, os.path.join(out_dir, 'curves.png'))
            t_last = time.time()  # the ETA counts training time only
        if it >= max_iters:
            break
        lr = learning_rate * 0.5 * (1 + math.cos(math.pi * it / max_iters))
        for opt in (s['opt'], s['opt_d']):
            for group in (opt.param_groups if opt else []):
                group['lr'] = lr
        hist.append(train_step(s, *pool.draw(batch_size, refill=it % refill_every == 0)))
        it += 1
        if it % log_interval and it != max_iters:
            continue
        rows = torch.stack(hist).tolist()  # the one host sync per log_interval
        steps, hist, now = len(rows), [], time.time()
        ms, t_last = (now - t_last) * 1000 / steps, now
        for j, row in enumerate(rows):
            skipped = [f for f, ok in zip(flags, row[len(names):]) if not ok]
            if skipped and master:
                print(f"iter {it - steps + j + 1}: non-finite loss or gradient, {'+'.join(skipped)} step skipped")
        good = [r for r in rows if all(r[len(names):])] or rows
        means = {n: sum(r[k] for r in good) / len(good) for k, n in enumerate(names)}
        if master:
            log.append({'iter': it, **means, 'lr': lr, 'skipped': len(rows) - len(good)})
            with open(log_path, 'a') as f:
                f.write(json.dumps(log[-1]) + '\n')
            parts = ', '.join(f"{n} {means[n]:.4g}" for n in names[1:])
            eta = (max_iters - it) * ms / 1000
            print(f"iter {it}/{max_iters} | epoch {it * batch_size * world / len(s['faces']):.2f} | loss "
                  f"{means['loss']:.4g} ({parts}) | lr {lr:.2e} | {batch_size * world * 1000 / ms:.1f} img/s | "
                  f"{ms:.1f} ms/iter | ETA {int(eta // 60)}m{int(eta % 60):02d}s")
    print(f"rank {rank}: weights checksum {checksum(*[m for m in (s['g'], s['ema'], s['d']) if m is not None])}")
    if world > 1:
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
