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
        --refill_every=100 --learning_rate=4e-4 --max_iters=8000 --eval_interval=2000 --log_interval=500 \\
        --usm_target=False

out_dir gets ckpt.pt (latest, with everything --resume needs), best.pt (best validation PSNR, EMA),
log.jsonl, curves.png (training loss and validation PSNR) and grid.png (bicubic LQ | output | GT).
Every setting below can be overridden with --key=value; --help lists them.
"""
import copy
import hashlib
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

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
usm_target = True  # pixel/perceptual targets USM-sharpened (Real-ESRGAN); False: plain GT, higher val PSNR
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


def check_settings():
    rules = [(mode in ('psnr', 'gan'), f"--mode={mode}: expected 'psnr' or 'gan'"),
             (dtype in ('float32', 'bfloat16'), f"--dtype={dtype}: expected 'float32' or 'bfloat16'"),
             (gt_size % 4 == 0 and 0 < 4 * patch_size <= gt_size,
              f"--patch_size={patch_size}: its 4x GT crop must fit in --gt_size={gt_size} (a multiple of 4)"),
             (mode == 'psnr' or patch_size % 2 == 0, f"--patch_size={patch_size}: the discriminator needs an even one"),
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

    def upload(self, u8):  # pinned: a copy from pageable memory would wait for the GPU's queue
        u8 = u8.pin_memory().to(self.dev, non_blocking=True) if self.dev.type == 'cuda' else u8.to(self.dev)
        return u8.float() / 255

    def fresh(self, n):
        """n faces, randomly cropped to gt_size and flipped, degraded on the device in float32."""
        src = []
        for face in torch.randint(len(self.faces), (n,), generator=self.gen).tolist():
            h, w = self.faces[face].shape[1:]
            y, x = (int(torch.randint(s - gt_size + 1, (), generator=self.gen)) for s in (h, w))
            src.append([face, y, x, int(torch.randint(2, (), generator=self.gen))])
        gt = self.upload(torch.stack([self.crop(s, 0, 0, gt_size) for s in src]))
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
        if mode == 'gan' or not usm_target:
            gt = self.upload(torch.stack([self.crop(self.src[k].tolist(), 4 * t, 4 * s, hp)
                                          for k, (t, s) in zip(pick, at)]))
        if refill:
            self.lq[pick], self.usm[pick], self.src[pick] = self.fresh(n)
        return lq.float() / 255, usm.float() / 255, gt


def guarded_step(opt, net):
    """Clip net's gradient norm, then opt.step() undone on the device if the norm is not finite; -> ok.
    The norm is taken after DDP's all-reduce, so every rank decides alike. Deciding on the device costs a
    copy of the weights and Adam's moments; deciding on the host would stall every step on a sync.
    Adam's step counter (a CPU scalar) still ticks on a skipped step: it only sets the bias correction."""
    ok = torch.isfinite(torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip if grad_clip > 0 else math.inf))
    params = list(net.parameters())

    def live():
        return {(i, k): t for i, p in enumerate(params) for k, t in [('w', p), *opt.state[p].items()] if k != 'step'}
    before = {k: t.detach().clone() for k, t in live().items()}
    opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        for k, t in live().items():  # moments created by this very step roll back to zeros
            t.copy_(torch.where(ok, t, before[k] if k in before else torch.zeros_like(t)))
    return ok


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
        if i < 3:  # the first three faces make grid.png
            rows.append(torch.cat([degrade.upscale_bicubic(lq), y, gt], dim=2))
    return sum(scores) / len(scores), torch.cat(rows, dim=1)


def plot(draw, box, points, title, log_y=False, ref=None):
    """One panel: (x, y) points as a polyline in box, min/max labels, an optional dashed line at y=ref."""
    left, top, right, bottom = box
    draw.rectangle(box, outline='black')
    draw.text((left, top - 16), title, fill='black')
    if not points:
        return
    ys = [math.log10(y) if log_y else y for _, y in points]
    lo, hi = min(ys + [ref or ys[0]]), max(ys + [ref or ys[0]])
    hi, x0, x1 = max(hi, lo + 1e-6), points[0][0], max(points[-1][0], points[0][0] + 1)

    def at(x, y):
        return left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - lo) / (hi - lo) * (bottom - top)
    for a in range(left, right, 12) if ref else []:
        draw.line([(a, at(x0, ref)[1]), (a + 6, at(x0, ref)[1])], fill='gray')
    xy = [at(x, y) for (x, _), y in zip(points, ys)]
    draw.line(xy if len(xy) > 1 else [xy[0], (xy[0][0] + 3, xy[0][1])], fill='blue', width=2)
    for y in (lo, hi):
        draw.text((left - 58, at(0, y)[1] - 6), f"{10 ** y:.3g}" if log_y else f"{y:.2f}", fill='black')
    draw.text((left, bottom + 4), str(x0), fill='black')
    draw.text((right - 60, bottom + 4), f"{x1} iter", fill='black')


def draw_curves(records, path):
    img = Image.new('RGB', (1000, 400), 'white')
    draw = ImageDraw.Draw(img)
    loss = [(r['iter'], r['loss']) for r in records if 0 < r.get('loss', 0) < float('inf')]
    ref = next((r['bicubic_psnr'] for r in records if 'bicubic_psnr' in r), None)
    plot(draw, (70, 30, 480, 360), loss, f"training loss ({mode}, log scale)", log_y=True)
    plot(draw, (570, 30, 980, 360), [(r['iter'], r['val_psnr']) for r in records if 'val_psnr' in r],
         "validation PSNR, dB (EMA; dashed: bicubic)", ref=ref)
    degrade.save_atomic(path, lambda tmp: img.save(tmp, format='PNG'))


def checksum(*modules):
    """A short hash of the weights: equal on every DDP rank when the ranks are in step."""
    h = hashlib.sha256()
    for k, t in ((k, t) for m in modules for k, t in m.state_dict().items()):
        h.update(k.encode() + t.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def build_generator(ckpt):
    """G from the resumed checkpoint, else from --init (its own architecture wins over the flags), else new."""
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
    """Settings, processes, data and networks: everything the loop needs, in a namespace."""
    _, config = degrade.configure(globals())
    check_settings()
    ddp, dev = 'RANK' in os.environ, degrade.pick_device(device)
    if ddp:
        dist.init_process_group('nccl' if dev.type == 'cuda' else 'gloo')
        if dev.type == 'cuda':
            dev = torch.device('cuda', int(os.environ['LOCAL_RANK']))
            torch.cuda.set_device(dev)
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    path = os.path.join(out_dir, 'ckpt.pt')
    if resume != os.path.isfile(path):  # never start over a run's checkpoint
        raise SystemExit(f"error: --resume=True: {path} not found" if resume else
                         f"error: {path} exists: continue it with --resume=True, or pick another --out_dir")
    faces, pairs = load_faces(data_dir), load_val(val_dir) if val_dir and rank == 0 else []
    ckpt = torch.load(path, map_location='cpu', weights_only=True) if resume else None
    if ckpt is not None and ckpt['config']['mode'] != mode:
        raise SystemExit(f"error: --mode={mode}: {path} is a {ckpt['config']['mode']} run")
    torch.manual_seed(seed)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)
    g = build_generator(ckpt).to(dev)
    config.update({k: getattr(g.config, k) for k in _MODEL_KEYS})
    ema = copy.deepcopy(g).eval().requires_grad_(False)
    d = vgg = opt_d = None
    adam = dict(lr=learning_rate, betas=(beta1, beta2), eps=adam_eps, weight_decay=weight_decay)
    opt = torch.optim.Adam(g.parameters(), **adam)
    if mode == 'gan':
        d = UNetDiscriminatorSN(UNetConfig(**ckpt['disc_args']) if ckpt else UNetConfig(num_feat=disc_num_feat))
        opt_d = torch.optim.Adam(d.to(dev).parameters(), **adam)
        try:
            vgg = VGGFeatures(vgg_path).to(dev) if perceptual_weight else None
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"error: --vgg_path: {e}") from None
    if ckpt is not None:
        for module, key in ((ema, 'ema'), (d, 'disc'), (opt, 'optimizer'), (opt_d, 'disc_optimizer')):
            if module is not None:
                module.load_state_dict(ckpt[key])
    start = ckpt['iter'] if ckpt else 0
    # every rank its own streams; only rank 0's (and its pool) are saved, so the others restart theirs
    seeds = [hash((seed, rank, start if rank else 0, k)) & (2 ** 63 - 1) for k in range(3)]  # ints: not salted
    torch.manual_seed(seeds[0])
    gen = torch.Generator().manual_seed(seeds[1])  # pool picks, crops, flips
    dgen = torch.Generator(dev).manual_seed(seeds[2])  # the degradation's random choices
    saved = ckpt['resume'] if ckpt is not None and rank == 0 else None
    if saved:
        torch.set_rng_state(saved['rng']['torch'])
        gen.set_state(saved['rng']['data'])
        dgen.set_state(saved['rng']['degrade'])
        if saved['rng']['cuda'] is not None and dev.type == 'cuda':
            torch.cuda.set_rng_state(saved['rng']['cuda'], dev)
    g_run, d_fwd = (torch.compile(g), d and torch.compile(d)) if compile else (g, d)
    d_run = d_fwd
    if ddp:  # broadcast_buffers=False: every rank updates D's spectral-norm vectors identically
        ids = [dev.index] if dev.type == 'cuda' else None
        g_run = DDP(g_run, device_ids=ids, broadcast_buffers=False)
        d_run = d and DDP(d_fwd, device_ids=ids, broadcast_buffers=False)
    if dev.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return SimpleNamespace(
        config=config, rank=rank, world=world, dev=dev, faces=faces, pairs=pairs, g=g, ema=ema, d=d, vgg=vgg,
        opt=opt, opt_d=opt_d, g_run=g_run, d_run=d_run, d_fwd=d_fwd, gen=gen, dgen=dgen, start=start,
        pool=Pool(faces, dev, gen, dgen, saved['pool'] if saved else None),
        ctx=nullcontext() if dtype == 'float32' else torch.autocast(dev.type, dtype=torch.bfloat16),
        best=ckpt['best_psnr'] if ckpt else -float('inf'))


def train_step(s, lq, usm, gt):
    """One G update (and one D update for the GAN) -> device tensor [G loss, its parts, (D loss), ok flags]."""
    with s.ctx:
        out = s.g_run(lq)
    target = usm if usm_target else gt
    if mode == 'psnr':
        parts = [F.mse_loss(out.float(), target)]
    else:
        s.d.requires_grad_(False)  # G's adversarial term goes through the plain D: no D grads, no DDP hooks
        with s.ctx:
            parts = [pixel_weight * F.l1_loss(out.float(), target), torch.zeros((), device=lq.device)]
            if s.vgg is not None:
                with torch.no_grad():
                    features = s.vgg(target)
                parts[1] = perceptual_weight * sum(w * F.l1_loss(a.float(), b.float())
                                                   for w, a, b in zip(layer_weights, s.vgg(out), features))
            fake = s.d_fwd(out).float()
            parts.append(gan_weight * F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake)))
    loss = sum(parts)
    loss.backward()
    oks = [guarded_step(s.opt, s.g)]
    with torch.no_grad():  # a skipped step left G unchanged: the EMA only moves towards finite weights
        torch._foreach_lerp_(list(s.ema.parameters()), list(s.g.parameters()), 1 - ema_decay)
    if mode == 'gan':
        s.d.requires_grad_(True)
        with s.ctx:  # real and fake in one forward: one all-reduce and one spectral-norm update per D step
            real, fake = s.d_run(torch.cat([gt, out.detach().float()])).float().chunk(2)
            l_d = (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
                   + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))
        l_d.backward()
        parts.append(l_d)
        oks.append(guarded_step(s.opt_d, s.d))
    return torch.stack([loss, *parts, *oks]).detach().float()


def evaluate_and_save(s, it, log):
    """Validate the EMA; write grid.png, best.pt (when better), ckpt.pt (plus the resume state), log, curves."""
    record = {'iter': it}
    if s.pairs:
        t0 = time.time()
        record['val_psnr'], grid = validate(s.ema, s.pairs, s.dev, s.ctx)
        degrade.write_image(os.path.join(out_dir, 'grid.png'), grid)
        print(f"iter {it}: val PSNR {record['val_psnr']:.3f} dB (EMA, {len(s.pairs)} faces, {time.time() - t0:.1f} s)")
    better = record.get('val_psnr', -float('inf')) > s.best
    s.best = max(s.best, record.get('val_psnr', -float('inf')))
    ckpt = {'model': s.g.state_dict(), 'ema': s.ema.state_dict(), 'disc': s.d and s.d.state_dict(),
            'optimizer': s.opt.state_dict(), 'disc_optimizer': s.opt_d and s.opt_d.state_dict(),
            'model_args': asdict(s.g.config), 'disc_args': s.d and asdict(s.d.config), 'iter': it,
            'best_psnr': s.best, 'config': s.config}
    if better:
        degrade.save_atomic(os.path.join(out_dir, 'best.pt'), lambda tmp: torch.save(ckpt, tmp))
    rng = {'torch': torch.get_rng_state(), 'data': s.gen.get_state(), 'degrade': s.dgen.get_state(),
           'cuda': torch.cuda.get_rng_state(s.dev) if s.dev.type == 'cuda' else None}
    ckpt['resume'] = {'rng': rng, 'pool': s.pool.state_dict()}
    degrade.save_atomic(os.path.join(out_dir, 'ckpt.pt'), lambda tmp: torch.save(ckpt, tmp))
    log.append(record)
    write_log(log)
    draw_curves(log, os.path.join(out_dir, 'curves.png'))


def write_log(log):  # rewritten whole, atomically: the file always ends at a complete record
    text = ''.join(json.dumps(r) + '\n' for r in log)
    degrade.save_atomic(os.path.join(out_dir, 'log.jsonl'), lambda tmp: Path(tmp).write_text(text))


def report(s, it, lr, rows, seconds, log):
    """Progress line and log.jsonl record for the last len(rows) iterations; skipped steps by iteration."""
    names = ['loss', 'mse'] if mode == 'psnr' else ['loss', 'l1', 'percep', 'gan', 'd']
    for j, row in enumerate(rows):
        skipped = [net for net, ok in zip('GD', row[len(names):]) if not ok]
        if skipped:
            print(f"iter {it - len(rows) + j + 1}: non-finite loss or gradient, {'+'.join(skipped)} step skipped")
    good = [r for r in rows if all(r[len(names):])]
    means = {n: sum(r[k] for r in good or rows) / len(good or rows) for k, n in enumerate(names)}
    log.append({'iter': it, **means, 'lr': lr, 'skipped': len(rows) - len(good)})
    write_log(log)
    ms, eta = seconds * 1000 / len(rows), (max_iters - it) * seconds / len(rows)
    print(f"iter {it}/{max_iters} | epoch {it * batch_size * s.world / len(s.faces):.2f} | loss {means['loss']:.4g} ("
          + ', '.join(f"{n} {means[n]:.4g}" for n in names[1:]) + f") | lr {lr:.2e} | "
          f"{batch_size * s.world * 1000 / ms:.1f} img/s | {ms:.1f} ms/iter | ETA {int(eta // 60)}m{int(eta % 60):02d}s")


def main():
    sys.stdout.reconfigure(line_buffering=True)  # progress shows up at once in a redirected log
    s = setup()
    master = s.rank == 0
    log = []
    if master:
        print('config:', json.dumps(s.config))
        print(f"{sum(p.numel() for p in s.g.parameters()):,} G parameters, {len(s.faces)} training faces, "
              f"{len(s.pairs)} validation pairs, {s.world} process(es) on {s.dev}, {dtype}")
        os.makedirs(out_dir, exist_ok=True)
        if resume:  # a run killed after its last checkpoint had logged beyond it
            lines = Path(out_dir, 'log.jsonl').read_text().splitlines()
            log = [r for r in map(json.loads, lines) if r['iter'] <= s.start]
        elif s.pairs:
            floor = sum(degrade.psnr(degrade.upscale_bicubic(lq), gt) for lq, gt in s.pairs) / len(s.pairs)
            log = [{'iter': 0, 'bicubic_psnr': floor}]
            print(f"bicubic: {log[0]['bicubic_psnr']:.3f} dB on {val_dir}")
        write_log(log)
    it, hist, t_last = s.start, [], time.time()
    while True:
        if master and (it == max_iters or (it % eval_interval == 0 and it > s.start)):
            evaluate_and_save(s, it, log)
            t_last = time.time()  # the ETA counts training time only
        if it >= max_iters:
            break
        lr = learning_rate * 0.5 * (1 + math.cos(math.pi * it / max_iters))
        for group in [g for opt in (s.opt, s.opt_d) if opt for g in opt.param_groups]:
            group['lr'] = lr
        hist.append(train_step(s, *s.pool.draw(batch_size, refill=it % refill_every == 0)))
        it += 1
        if it % log_interval == 0 or it == max_iters:
            rows, hist = torch.stack(hist).tolist(), []  # the one host sync per log_interval
            if master:
                report(s, it, lr, rows, time.time() - t_last, log)
            t_last = time.time()
    print(f"rank {s.rank}: weights checksum {checksum(*[m for m in (s.g, s.ema, s.d) if m is not None])}")
    if s.world > 1:  # tear down together: a rank leaving while rank 0 still saves can abort gloo's peers
        dist.barrier()
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
