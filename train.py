"""
Train SwinIR for 4x blind face super-resolution on faces degraded on the fly (degrade.py, the
Real-ESRGAN second order): first for PSNR (MSE), then with L1 + perceptual + GAN losses.

    python train.py --mode=psnr                         # seed recipe: out_psnr/ and psnr.pt
    python train.py --mode=gan --init=psnr.pt           # out_gan/ and gan.pt (needs VGG19 weights)
    python train.py --mode=psnr --resume=True           # continue out_psnr/ where it stopped
    python train.py --preset=cpu --data_dir=../shared/data/faces/train \\
        --val_dir=../shared/data/faces/val              # 48k parameters, ~10-15 min on 2 cores
    python train.py --bench=True                        # img/s of the recipe, synthetic faces
    torchrun --standalone --nproc_per_node=8 train.py --mode=psnr   # DDP, one GPU per process

The run folder (--out_dir) gets ckpt.pt (everything --resume needs), log.jsonl, curves.png and
grid.png (bicubic LQ | output | GT); --model_file, in the working directory, the best validation
EMA weights (the last EMA without validation): small, read by --init, interpolate.py, sample.py.
Every setting below can be overridden with --key=value; --help lists them.
"""
import copy
import hashlib
import json
import math
import os
import resource
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import get_ema_multi_avg_fn

import degrade
from model import SwinIR, SwinIRConfig, UNetConfig, UNetDiscriminatorSN, VGGFeatures
from model import load_generator

# ---- data
data_dir = 'data/train/GT'  # training faces (png/jpg/webp/bmp), each at least gt_size on both sides
val_dir = 'data/val'  # GT/ and LQ/ pairs sharing file stems; '' = no validation
gt_size = 512  # GT side given to the degradation; larger faces are randomly cropped to it
patch_size = 128  # LQ training crop; 128 = the whole LQ face of a 512 GT, as the seed trains
pool_size = 88  # degraded faces kept on the device (the seed's 22 batches of 4)
refill_size = 32  # fresh faces degraded at once (a GPU wants >= 32), replacing random entries
refill_every = 8  # iterations between refills: 32 fresh per 8 x 4 drawn, one per drawn face
# ---- model (SwinIRConfig fields; the defaults are the seed model, 2,251,758 parameters)
embed_dim = 78  # channels of the transformer body
depths = [6, 6, 6, 6, 6, 6]  # Swin blocks per residual group
num_heads = [6, 6, 6, 6, 6, 6]  # attention heads per residual group
window_size = 8  # attention window side, in LQ pixels
mlp_ratio = 2.0  # MLP hidden width / embed_dim
upsampler = 'pixelshuffledirect'  # or 'pixelshuffle' / 'nearest+conv'
resi_connection = '1conv'  # or '3conv', the end of each residual group
# ---- optim
mode = 'psnr'  # 'psnr': MSE; 'gan': L1 + perceptual + GAN, the discriminator trained alongside
init = ''  # start G from these weights: a checkpoint of ours (EMA preferred) or an official file
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
usm_target = True  # targets USM-sharpened (Real-ESRGAN); False: the plain GT, higher val PSNR
# ---- gan
pixel_weight = 1.0  # L1 to the target
perceptual_weight = 1.0  # L1 between VGG19 features of output and target; 0 = no VGG needed
layer_weights = [0.1, 0.1, 1.0, 1.0, 1.0]  # conv1_2, conv2_2, conv3_4, conv4_4, conv5_4
gan_weight = 0.1  # vanilla GAN (BCE on per-pixel logits); the discriminator sees the plain GT
disc_num_feat = 24  # U-Net SN discriminator width (616,057 parameters at 24)
vgg_path = ''  # torchvision vgg19 state dict file; '' = torch hub's cache, then its download
# ---- system
out_dir = ''  # the run folder; '' = out_<mode>
model_file = ''  # the best EMA weights + model_args; '' = <mode>.pt in the working directory
eval_interval = 2000  # validate and save every this many iterations (and at the end)
log_interval = 100  # one progress line (and log.jsonl record) every this many iterations
seed = 0  # weights, crops and degradations; each DDP rank draws its own streams from it
device = ''  # '' = cuda, then mps, then cpu
dtype = 'bfloat16' if torch.cuda.is_available() else 'float32'  # autocast of G and D
compile = False  # torch.compile G and D
preset = ''  # 'cpu': the small CPU recipe below; explicit flags override its settings
bench = False  # time bench_iters iterations (after 3 warm-up ones), count ops; write nothing
bench_iters = 16  # timed iterations of --bench=True

PRESETS = {'cpu': dict(  # 48k parameters that beat bicubic in ~10-15 minutes on 2 cores
    embed_dim=24, depths=[2, 2], num_heads=[2, 2], patch_size=32, batch_size=8, pool_size=300,
    refill_every=400, learning_rate=4e-4, max_iters=8000, eval_interval=2000, log_interval=500,
    usm_target=False)}
_MODEL_KEYS = ('embed_dim', 'depths', 'num_heads', 'window_size', 'mlp_ratio', 'upsampler',
              'resi_connection')
_WARMUP = 3  # untimed iterations of --bench=True


def check_settings():
    rules = [
        (mode in ('psnr', 'gan'), f"--mode={mode}: expected 'psnr' or 'gan'"),
        (dtype in ('float32', 'bfloat16'), f"--dtype={dtype}: expected 'float32' or 'bfloat16'"),
        (gt_size % 4 == 0 and 0 < 4 * patch_size <= gt_size,
         f"--patch_size={patch_size}: its 4x GT crop must fit in --gt_size={gt_size} (a multiple of 4)"),
        (mode == 'psnr' or patch_size % 2 == 0,
         f"--patch_size={patch_size}: the discriminator needs an even one"),
        (0 < batch_size <= pool_size, f"--pool_size={pool_size}: must hold --batch_size={batch_size}"),
        (0 < refill_size <= pool_size, f"--refill_size={refill_size}: expected 1..--pool_size"),
        (len(layer_weights) == 5, f"--layer_weights: expected 5 weights, got {len(layer_weights)}"),
        (min(refill_every, eval_interval, log_interval, bench_iters) > 0 and max_iters >= 0,
         "--refill_every, --eval_interval, --log_interval, --bench_iters must be > 0, --max_iters >= 0"),
        (learning_rate > 0 and adam_eps > 0 and weight_decay >= 0 and grad_clip >= 0,
         "--learning_rate, --adam_eps must be > 0; --weight_decay, --grad_clip >= 0"),
        (0 <= beta1 < 1 and 0 <= beta2 < 1 and 0 <= ema_decay < 1,
         "--beta1, --beta2, --ema_decay must be in [0, 1)")]
    for ok, message in rules:
        if not ok:
            raise SystemExit(f"error: {message}")


def load_faces(folder):
    """Every GT face decoded once into uint8 (3,H,W), so that no refill waits on image decoding."""
    if not os.path.isdir(folder):
        raise SystemExit(f"error: {folder}: not a folder. Put aligned 512x512 training faces there "
                         "(FFHQ, or the challenge's 5,000) or pass --data_dir=FOLDER; to try it on a "
                         "CPU: python train.py --preset=cpu --data_dir=FOLDER --val_dir=FOLDER")
    paths = degrade.list_images(folder)
    names = {os.path.basename(p) for p in paths}
    bad = [f"{f} (not an image file)" for f in sorted(os.listdir(folder)) if f not in names
           and not f.startswith('.') and os.path.isfile(os.path.join(folder, f))]
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
    stems = lambda side: {Path(p).stem: p for p in degrade.list_images(os.path.join(folder, side))}
    lqs, gts = stems('LQ'), stems('GT')
    unpaired = sorted(set(lqs) ^ set(gts))
    if unpaired or not lqs:
        why = f"unpaired: {', '.join(unpaired[:6])}" if unpaired else 'both are empty'
        raise SystemExit(f"error: --val_dir={folder}: LQ/ and GT/ must hold images with the same "
                         f"stems; {why}")
    pairs = []
    for stem in sorted(lqs):
        try:
            lq, gt = (degrade.to_uint8(degrade.read_image(p[stem])[:3]) for p in (lqs, gts))
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        if gt.shape[1:] != (4 * lq.shape[1], 4 * lq.shape[2]):
            raise SystemExit(f"error: {lqs[stem]}: {lq.shape[2]}x{lq.shape[1]} is not 1/4 of its GT "
                             f"({gt.shape[2]}x{gt.shape[1]})")
        pairs.append((lq, gt))
    return pairs


def synthetic_faces(n, gen):
    """Smooth random uint8 images of gt_size: --bench without training faces."""
    low = torch.rand(n, 3, 16, 16, generator=gen)
    big = F.interpolate(low, size=(gt_size, gt_size), mode='bicubic', align_corners=False)
    return list(degrade.to_uint8(big))


def crop(x, pick, at, size):
    """(P,C,H,W) -> (n,C,size,size): entry pick[i] cut at rows/columns at[i] onwards, on the device."""
    span = torch.arange(size, device=x.device)
    rows = (at[:, :1] + span)[:, None, :, None]  # (n,1,size,1)
    cols = (at[:, 1:] + span)[:, None, None, :]  # (n,1,1,size)
    chans = torch.arange(x.shape[1], device=x.device)[:, None, None]  # (C,1,1)
    return x[pick[:, None, None, None], chans, rows, cols]


class Pool:
    """Degraded faces kept on the device as uint8: LQ, USM-sharpened GT, and the plain GT when a
    loss needs it. A draw takes random entries, a refill replaces random entries with fresh
    degradations, so a batch mixes degradations made at different times (Real-ESRGAN's queue).
    Host RNG (gen): which faces, where cut, flips; device RNG (dgen): all the rest. No host syncs."""

    def __init__(self, faces, dev, gen, dgen, keep_gt, state=None):
        self.faces, self.dev, self.gen, self.dgen, self.keep_gt = faces, dev, gen, dgen, keep_gt
        if state is None:
            lq, usm, gt = zip(*[self.fresh(min(refill_size, pool_size - i))
                                for i in range(0, pool_size, refill_size)])
            state = {'lq': torch.cat(lq), 'usm': torch.cat(usm), 'gt': keep_gt and torch.cat(gt)}
        self.lq, self.usm = state['lq'].to(dev), state['usm'].to(dev)
        self.gt = state['gt'].to(dev) if keep_gt else None

    def state_dict(self):
        gt = self.gt.cpu() if self.keep_gt else None
        return {'lq': self.lq.cpu(), 'usm': self.usm.cpu(), 'gt': gt}

    def fresh(self, n):
        """n faces cut to gt_size at random, flipped half the time, degraded on the device."""
        cuts = []
        for face in torch.randint(len(self.faces), (n,), generator=self.gen).tolist():
            img = self.faces[face]
            y, x = (int(torch.randint(s - gt_size + 1, (), generator=self.gen)) for s in img.shape[1:])
            cut = img[:, y:y + gt_size, x:x + gt_size]
            cuts.append(cut.flip(-1) if torch.rand((), generator=self.gen) < 0.5 else cut)
        gt = torch.stack(cuts)
        if self.dev.type == 'cuda':  # pinned: a copy from pageable memory waits for the GPU's queue
            gt = gt.pin_memory()
        gt = gt.to(self.dev, non_blocking=True)
        lq, usm = degrade.degrade(gt.float() / 255, generator=self.dgen)  # float32, no TF32
        return degrade.to_uint8(lq), degrade.to_uint8(usm), gt if self.keep_gt else None

    def refill(self):
        slots = torch.randperm(pool_size, generator=self.dgen, device=self.dev)[:refill_size]
        lq, usm, gt = self.fresh(refill_size)
        self.lq[slots] = lq
        self.usm[slots] = usm
        if self.keep_gt:
            self.gt[slots] = gt

    def draw(self, n):
        """n random entries, each cut at a random place -> float LQ (n,3,p,p), USM GT and plain GT
        (n,3,4p,4p) (the plain GT None unless kept)."""
        pick = torch.randperm(pool_size, generator=self.dgen, device=self.dev)[:n]
        at = torch.randint(self.lq.shape[-1] - patch_size + 1, (n, 2), generator=self.dgen,
                           device=self.dev)
        lq = crop(self.lq, pick, at, patch_size).float() / 255
        usm = crop(self.usm, pick, 4 * at, 4 * patch_size).float() / 255
        gt = crop(self.gt, pick, 4 * at, 4 * patch_size).float() / 255 if self.keep_gt else None
        return lq, usm, gt


def step(opt, net):
    """Clip net's gradient norm, then Adam's step, skipped on the device if the norm is not finite
    (fused Adam's found_inf, GradScaler's contract: weights, moments and step count stay as they
    were) -> 1.0 if stepped, else 0.0. The norm is taken after DDP's all-reduce: every rank agrees."""
    norm = torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip or math.inf)
    opt.found_inf = (~norm.isfinite()).float()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return 1 - opt.found_inf


@torch.no_grad()
def validate(net, pairs, dev):
    """Mean PSNR in float32 as sample.py computes it, in the challenge convention (uint8 RGB, all
    pixels, mean over images), and a grid of the first faces: bicubic LQ | output | GT."""
    scores, rows = [], []
    for lq, gt in pairs:
        y = degrade.to_uint8(net(lq[None].to(dev).float() / 255)[0]).cpu()
        scores.append(float(degrade.psnr(y, gt)))
        if len(rows) < 3:
            rows.append(torch.cat([degrade.upscale_bicubic(lq), y, gt], dim=2))
    return sum(scores) / len(scores), torch.cat(rows, dim=1)


def plot(draw, box, points, title, log_y=False, ref=None):
    """One panel: (x, y) points as a polyline in box, min/max labels, a dashed line at y=ref."""
    left, top, right, bottom = box
    draw.rectangle(box, outline='black')
    draw.text((left, top - 16), title, fill='black')
    if not points:
        return
    ys = [math.log10(y) if log_y else y for _, y in points]
    lo = min(ys + [ref or ys[0]])
    hi = max(max(ys + [ref or ys[0]]), lo + 1e-6)
    x0, x1 = points[0][0], max(points[-1][0], points[0][0] + 1)

    def at(x, y):
        return (left + (x - x0) / (x1 - x0) * (right - left),
                bottom - (y - lo) / (hi - lo) * (bottom - top))
    for a in range(left, right, 12) if ref else []:
        draw.line([(a, at(x0, ref)[1]), (a + 6, at(x0, ref)[1])], fill='gray')
    xy = [at(x, y) for (x, _), y in zip(points, ys)]
    draw.line(xy if len(xy) > 1 else [xy[0], (xy[0][0] + 3, xy[0][1])], fill='blue', width=2)
    for y in (lo, hi):
        label = f"{10 ** y:.3g}" if log_y else f"{y:.2f}"
        draw.text((left - 58, at(0, y)[1] - 6), label, fill='black')
    draw.text((left, bottom + 4), str(x0), fill='black')
    draw.text((right - 60, bottom + 4), f"{x1} iter", fill='black')


def draw_curves(records, path):
    img = Image.new('RGB', (1000, 400), 'white')
    draw = ImageDraw.Draw(img)
    loss = [(r['iter'], r['loss']) for r in records if 0 < r.get('loss', 0) < float('inf')]
    val = [(r['iter'], r['val_psnr']) for r in records if 'val_psnr' in r]
    ref = next((r['bicubic_psnr'] for r in records if 'bicubic_psnr' in r), None)
    plot(draw, (70, 30, 480, 360), loss, f"training loss ({mode}, log scale)", log_y=True)
    plot(draw, (570, 30, 980, 360), val, "validation PSNR, dB (EMA; dashed: bicubic)", ref=ref)
    degrade.save_atomic(path, lambda tmp: img.save(tmp, format='PNG'))


def write_log(log):  # rewritten whole, atomically: the file always ends at a complete record
    text = ''.join(json.dumps(r) + '\n' for r in log)
    degrade.save_atomic(os.path.join(out_dir, 'log.jsonl'), lambda tmp: Path(tmp).write_text(text))


def save(path, obj):
    degrade.save_atomic(path, lambda tmp: torch.save(obj, tmp))


def checksum(*modules):
    """A short hash of the weights: equal on every DDP rank when the ranks are in step."""
    h = hashlib.sha256()
    for k, t in ((k, t) for m in modules for k, t in m.state_dict().items()):
        h.update(k.encode() + t.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def build_generator(ckpt):
    """G from the resumed checkpoint, else from --init (its architecture wins over the flags)."""
    flags = SwinIRConfig(**{k: globals()[k] for k in _MODEL_KEYS})
    if ckpt is not None:
        net = SwinIR(SwinIRConfig(**ckpt['model_args']))
        net.load_state_dict(ckpt['model'])
        return net
    if not init:
        return SwinIR(flags)
    if not os.path.isfile(init):
        made_by = " (python train.py --mode=psnr writes it)" if init == 'psnr.pt' else ''
        raise SystemExit(f"error: --init={init}: no such file{made_by}")
    try:
        net, cfg = load_generator(init, flags)
    except ValueError as e:
        raise SystemExit(f"error: --init: {e}") from None
    differ = [f"{k}={getattr(cfg, k)!r}" for k in _MODEL_KEYS if getattr(cfg, k) != getattr(flags, k)]
    if differ:
        print(f"--init: the architecture comes from {init}: {', '.join(differ)}")
    return net.train()


class Stopwatch:
    """ms per named part of the iterations; it synchronises the device, so it runs only when on."""

    def __init__(self, dev):
        self.on, self.ms = False, defaultdict(float)
        self.sync = getattr(torch, dev.type).synchronize if dev.type in ('cuda', 'mps') else None

    @contextmanager
    def __call__(self, name):
        if self.on and self.sync:
            self.sync()
        t0 = time.perf_counter()
        yield
        if self.on:
            if self.sync:
                self.sync()
            self.ms[name] += 1000 * (time.perf_counter() - t0)


def top_level_ops(prof):
    """aten ops dispatched from Python or autograd (not those inside another aten op)."""
    aten = lambda e: e is not None and e.name.startswith('aten::')
    return sum(1 for e in prof.events() if aten(e) and not aten(e.cpu_parent))


def report(it, lr, rows, seconds, log, n_faces, world):
    """Progress line and log.jsonl record for the last len(rows) iterations; skipped steps named."""
    names = ['loss', 'mse'] if mode == 'psnr' else ['loss', 'l1', 'percep', 'gan', 'd']
    for j, row in enumerate(rows):
        skipped = [net for net, ok in zip('GD', row[len(names):]) if not ok]
        if skipped:
            print(f"iter {it - len(rows) + j + 1}: non-finite loss or gradient, "
                  f"{'+'.join(skipped)} step skipped")
    good = [r for r in rows if all(r[len(names):])] or rows
    means = {n: sum(r[k] for r in good) / len(good) for k, n in enumerate(names)}
    log.append({'iter': it, **means, 'lr': lr, 'skipped': sum(not all(r[len(names):]) for r in rows)})
    write_log(log)
    ms = seconds * 1000 / len(rows)
    eta = (max_iters - it) * seconds / len(rows)
    parts = ', '.join(f"{n} {means[n]:.4g}" for n in names[1:])
    print(f"iter {it}/{max_iters} | epoch {it * batch_size * world / n_faces:.2f} | "
          f"loss {means['loss']:.4g} ({parts}) | lr {lr:.2e} | "
          f"{batch_size * world * 1000 / ms:.1f} img/s | {ms:.1f} ms/iter | "
          f"ETA {int(eta // 60)}m{int(eta % 60):02d}s")


def bench_report(watch, ops, dev, world):
    total = sum(watch.ms.values())
    peak = (f"{torch.cuda.max_memory_allocated(dev) / 2 ** 30:.2f} GiB on {dev}" if dev.type == 'cuda'
            else f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB RSS")
    print(f"bench: {mode}, batch {batch_size} x {world} of {patch_size}x{patch_size} LQ, {dtype}, "
          f"compile {'on' if compile else 'off'}, {dev}, {torch.get_num_threads()} threads")
    print(f"bench: {bench_iters * batch_size * world / total * 1000:.1f} img/s, "
          f"{total / bench_iters:.1f} ms/iter: "
          + ', '.join(f"{k} {v / bench_iters:.1f}" for k, v in watch.ms.items()))
    print(f"bench: {ops / refill_every:.0f} top-level aten ops per iteration (refills amortised), "
          f"peak memory {peak}")


if __name__ == '__main__':
    positional, config = degrade.configure(globals())  # the override line
    if preset:
        if preset not in PRESETS:
            raise SystemExit(f"error: --preset={preset}: expected one of {', '.join(PRESETS)}")
        globals().update(PRESETS[preset])
        positional, config = degrade.configure(globals())  # again: explicit flags beat the preset
    if positional:
        raise SystemExit(f"error: {positional[0]}: train.py takes only --key=value settings")
    out_dir = out_dir or f'out_{mode}'
    model_file = model_file or f'{mode}.pt'
    config.update(out_dir=out_dir, model_file=model_file)
    check_settings()
    sys.stdout.reconfigure(line_buffering=True)  # progress shows up at once in a redirected log

    # ---- processes and data
    ddp = 'RANK' in os.environ
    dev = degrade.pick_device(device)
    if ddp:
        dist.init_process_group('nccl' if dev.type == 'cuda' else 'gloo')
        if dev.type == 'cuda':
            dev = torch.device('cuda', int(os.environ['LOCAL_RANK']))
            torch.cuda.set_device(dev)
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    master = rank == 0
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')
    if not bench and resume != os.path.isfile(ckpt_path):  # never start over a run's checkpoint
        raise SystemExit(f"error: --resume=True: {ckpt_path} not found" if resume else
                         f"error: {ckpt_path} exists: continue it with --resume=True, "
                         "or pick another --out_dir")
    if bench and not os.path.isdir(data_dir):
        faces = synthetic_faces(max(refill_size, 8), torch.Generator().manual_seed(seed))
    else:
        faces = load_faces(data_dir)
    if val_dir == 'data/val' and not os.path.isdir(val_dir):
        val_dir = ''  # the default folder is optional; one named by --val_dir is not
    pairs = load_val(val_dir) if val_dir and master and not bench else []
    ckpt = torch.load(ckpt_path, map_location='cpu', weights_only=True) if resume else None
    if ckpt is not None and ckpt['config']['mode'] != mode:
        raise SystemExit(f"error: --mode={mode}: {ckpt_path} is a {ckpt['config']['mode']} run")

    # ---- networks and optimizers
    torch.manual_seed(seed)  # the same initial weights on every rank (DDP broadcasts rank 0's)
    g = build_generator(ckpt).to(dev)
    config.update({k: getattr(g.config, k) for k in _MODEL_KEYS})
    ema = copy.deepcopy(g).eval().requires_grad_(False)
    ema_update = get_ema_multi_avg_fn(ema_decay)
    adam = dict(lr=learning_rate, betas=(beta1, beta2), eps=adam_eps, weight_decay=weight_decay,
                fused=True)
    opt_g = torch.optim.Adam(g.parameters(), **adam)
    d = vgg = opt_d = None
    if mode == 'gan':
        d = UNetDiscriminatorSN(UNetConfig(**ckpt['disc_args']) if ckpt else
                                UNetConfig(num_feat=disc_num_feat)).to(dev)
        opt_d = torch.optim.Adam(d.parameters(), **adam)
        try:
            vgg = VGGFeatures(vgg_path).to(dev) if perceptual_weight else None
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"error: --vgg_path: {e}") from None
    if ckpt is not None:
        for module, key in ((ema, 'ema'), (d, 'disc'), (opt_g, 'optimizer'), (opt_d, 'disc_optimizer')):
            if module is not None:
                module.load_state_dict(ckpt[key])
    start = ckpt['iter'] if ckpt else 0
    best = ckpt['best_psnr'] if ckpt else -math.inf

    # ---- random streams and the pool: each rank its own; rank 0's are saved, the others restart
    seeds = [hash((seed, rank, start if rank else 0, k)) & (2 ** 63 - 1) for k in range(3)]
    torch.manual_seed(seeds[0])
    gen = torch.Generator().manual_seed(seeds[1])  # which faces, where cut, flips
    dgen = torch.Generator(dev).manual_seed(seeds[2])  # pool draws and refills, degradations
    saved = ckpt['resume'] if ckpt is not None and master else None
    if saved:
        torch.set_rng_state(saved['rng']['torch'])
        gen.set_state(saved['rng']['data'])
        dgen.set_state(saved['rng']['degrade'])
        if saved['rng']['cuda'] is not None and dev.type == 'cuda':
            torch.cuda.set_rng_state(saved['rng']['cuda'], dev)
    keep_gt = mode == 'gan' or not usm_target
    pool = Pool(faces, dev, gen, dgen, keep_gt, saved['pool'] if saved else None)
    if dev.type == 'cuda':  # TF32 for the networks' float32 parts; degrade() turns it off for itself
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    g_run, d_fwd = (torch.compile(g), d and torch.compile(d)) if compile else (g, d)
    d_run = d_fwd
    if ddp:  # broadcast_buffers=False: every rank updates D's spectral-norm vectors identically
        ids = [dev.index] if dev.type == 'cuda' else None
        g_run = DDP(g_run, device_ids=ids, broadcast_buffers=False)
        d_run = d and DDP(d_fwd, device_ids=ids, broadcast_buffers=False)
    ctx = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == 'bfloat16')
    watch, prof = Stopwatch(dev), None

    log = []
    if master:
        print('config:', json.dumps(config))
        print(f"{sum(p.numel() for p in g.parameters()):,} G parameters, {len(faces)} training "
              f"faces, {len(pairs)} validation pairs, {world} process(es) on {dev}, {dtype}")
        if not bench:
            os.makedirs(out_dir, exist_ok=True)
        if resume:  # a run killed after its last checkpoint had logged beyond it
            lines = Path(out_dir, 'log.jsonl').read_text().splitlines()
            log = [r for r in map(json.loads, lines) if r['iter'] <= start]
        elif pairs:
            bicubic = [degrade.psnr(degrade.upscale_bicubic(lq), gt) for lq, gt in pairs]
            log = [{'iter': 0, 'bicubic_psnr': sum(bicubic) / len(bicubic)}]
            print(f"bicubic: {log[0]['bicubic_psnr']:.3f} dB on {val_dir}")
        if not bench:
            write_log(log)
    if bench:
        max_iters = start + _WARMUP + bench_iters + refill_every  # warm up, time, count ops

    # ---- the loop
    it, hist, t_last = start, [], time.time()
    while True:
        if master and not bench and (it == max_iters or it % eval_interval == 0 and it > start):
            record = {'iter': it}
            if pairs:
                t0 = time.time()
                record['val_psnr'], grid = validate(ema, pairs, dev)
                degrade.write_image(os.path.join(out_dir, 'grid.png'), grid)
                print(f"iter {it}: val PSNR {record['val_psnr']:.3f} dB (EMA, {len(pairs)} faces, "
                      f"{time.time() - t0:.1f} s)")
            ckpt = {'model': g.state_dict(), 'ema': ema.state_dict(), 'model_args': asdict(g.config),
                    'disc': d and d.state_dict(), 'disc_args': d and asdict(d.config),
                    'optimizer': opt_g.state_dict(), 'disc_optimizer': opt_d and opt_d.state_dict(),
                    'iter': it, 'best_psnr': max(best, record.get('val_psnr', -math.inf)),
                    'config': config}
            if not pairs or record['val_psnr'] > best:  # the small file the other scripts read
                save(model_file, {'model': ckpt['ema'], 'model_args': ckpt['model_args'], 'iter': it,
                                  'val_psnr': record.get('val_psnr'), 'config': config})
                print(f"iter {it}: {model_file} updated")
            best = ckpt['best_psnr']
            rng = {'torch': torch.get_rng_state(), 'data': gen.get_state(),
                   'degrade': dgen.get_state(),
                   'cuda': torch.cuda.get_rng_state(dev) if dev.type == 'cuda' else None}
            ckpt['resume'] = {'rng': rng, 'pool': pool.state_dict()}
            save(ckpt_path, ckpt)
            log.append(record)
            write_log(log)
            draw_curves(log, os.path.join(out_dir, 'curves.png'))
            t_last = time.time()  # the ETA counts training time only
        if it >= max_iters:
            break
        if bench:
            watch.on = start + _WARMUP <= it < start + _WARMUP + bench_iters
            if it == start + _WARMUP + bench_iters:
                prof = torch.profiler.profile()
                prof.start()
        lr = learning_rate * 0.5 * (1 + math.cos(math.pi * it / max_iters))
        for group in [gr for opt in (opt_g, opt_d) if opt for gr in opt.param_groups]:
            group['lr'] = lr
        lq, usm, gt = pool.draw(batch_size)
        target = usm if usm_target else gt
        with watch('G fwd+bwd'):
            with ctx:
                out = g_run(lq)
            if mode == 'psnr':
                parts = [F.mse_loss(out.float(), target)]
            else:  # G's adversarial term goes through the plain D: no D grads, no DDP hooks
                d.requires_grad_(False)
                with ctx:
                    parts = [pixel_weight * F.l1_loss(out.float(), target)]
                    percep = torch.zeros((), device=dev)
                    if vgg is not None:
                        with torch.no_grad():
                            features = vgg(target)
                        percep = sum(w * F.l1_loss(a.float(), b.float())
                                     for w, a, b in zip(layer_weights, vgg(out), features))
                    fake = d_fwd(out).float()
                    adv = F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))
                    parts += [perceptual_weight * percep, gan_weight * adv]
            loss = sum(parts)
            loss.backward()
        with watch('optimizer+EMA'):
            oks = [step(opt_g, g)]
            ema_update(list(ema.parameters()), list(g.parameters()), None)  # skipped: G unchanged
        if mode == 'gan':
            with watch('D'):
                d.requires_grad_(True)
                with ctx:  # real and fake in one forward: one all-reduce, one spectral-norm update
                    real, fake = d_run(torch.cat([gt, out.detach().float()])).float().chunk(2)
                    loss_d = (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
                              + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))
                loss_d.backward()
                parts.append(loss_d)
                oks.append(step(opt_d, d))
        if (it + 1) % refill_every == 0:
            with watch('degrade'):
                pool.refill()
        hist.append(torch.stack([loss.detach(), *(p.detach() for p in parts), *oks]).float())
        it += 1
        cost = time.time() - t_last
        if it == start + 1 and dev.type == 'cpu' and cost * (max_iters - it) > 3600 and master:
            print(f"note: no GPU here: one iteration of this recipe took {cost:.1f} s, "
                  f"{max_iters - it} more would take {cost * (max_iters - it) / 3600:.1f} h; "
                  "--preset=cpu trains a small model in ~10-15 minutes")
        if not bench and (it % log_interval == 0 or it == max_iters):
            rows, hist = torch.stack(hist).tolist(), []  # the one host sync per log_interval
            if master:
                report(it, lr, rows, time.time() - t_last, log, len(faces), world)
            t_last = time.time()
    if prof is not None:
        prof.stop()
        bench_report(watch, top_level_ops(prof), dev, world)
    print(f"rank {rank}: weights checksum {checksum(*[m for m in (g, ema, d) if m is not None])}")
    if world > 1:  # tear down together: a rank leaving while rank 0 still saves can abort gloo's
        dist.barrier()
        dist.destroy_process_group()
