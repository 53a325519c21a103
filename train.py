"""
Train SwinIR for 4x blind face super-resolution on faces degraded on the fly (degrade.py, the
Real-ESRGAN second order): first for PSNR (MSE), then with L1 + perceptual + GAN losses.

    python train.py --mode=psnr                       # seed recipe: out_psnr/ and psnr.pt
    python train.py --mode=gan --init=psnr.pt         # out_gan/ and gan.pt (needs VGG19 weights)
    python train.py --mode=psnr --resume=True         # continue out_psnr/ where it stopped
    python train.py --preset=cpu --data_dir=faces/ --val_dir=val/   # ~10-15 min on 2 cores
    python train.py --bench=True                      # img/s of the recipe, on synthetic faces
    torchrun --standalone --nproc_per_node=8 train.py --mode=psnr   # DDP, one GPU per process

--out_dir gets ckpt.pt (all that --resume needs), log.jsonl, curves.png and grid.png; --model_file
the best validation EMA weights, read by --init, interpolate.py and sample.py. --help: settings.
"""
import copy
import hashlib
import json
import math
import os
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import get_ema_multi_avg_fn

import degrade
from model import SwinIR, SwinIRConfig, UNetConfig, UNetDiscriminatorSN, VGGFeatures
from model import load_generator, load_torch_file

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
betas = [0.9, 0.999]  # Adam
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
_MODEL_KEYS = [f.name for f in fields(SwinIRConfig) if f.name in globals()]
_WARMUP = 3  # untimed iterations of --bench=True


def check_settings(positional):
    rules = [
        (not positional, f"{positional[:1]}: train.py takes only --key=value settings"),
        (preset in ('', *PRESETS), f"--preset={preset}: expected one of {', '.join(PRESETS)}"),
        (mode in ('psnr', 'gan'), f"--mode={mode}: expected 'psnr' or 'gan'"),
        (dtype in ('float32', 'bfloat16'), f"--dtype={dtype}: expected 'float32' or 'bfloat16'"),
        (gt_size % 4 == 0 and 0 < 4 * patch_size <= gt_size, f"--patch_size={patch_size}: its 4x "
         f"GT crop must fit in --gt_size={gt_size} (a multiple of 4)"),
        (mode == 'psnr' or patch_size % 2 == 0, f"--patch_size={patch_size}: D needs an even one"),
        (0 < batch_size <= pool_size, f"--pool_size={pool_size}: must hold --batch_size"),
        (0 < refill_size <= pool_size, f"--refill_size={refill_size}: expected 1..--pool_size"),
        (len(layer_weights) == 5, f"--layer_weights: expected 5 weights, got {len(layer_weights)}"),
        (min(refill_every, eval_interval, log_interval, bench_iters, learning_rate, adam_eps) > 0,
         "--refill_every, --eval_interval, --log_interval, --bench_iters, --learning_rate, "
         "--adam_eps must be > 0"),
        (min(max_iters, weight_decay, grad_clip, pixel_weight, perceptual_weight, gan_weight) >= 0,
         "--max_iters, --weight_decay, --grad_clip and the loss weights must be >= 0"),
        (len(betas) == 2 and 0 <= min(*betas, ema_decay) <= max(*betas, ema_decay) < 1,
         "--betas (two) and --ema_decay must be in [0, 1)")]
    for ok, message in rules:
        if not ok:
            raise SystemExit(f"error: {message}")


def read_folder(folder):
    """{stem: uint8 (3,H,W)} of every image in folder (alpha dropped), and what could not be read.
    Decoded once, so that no refill or validation waits on image decoding."""
    paths = degrade.list_images(folder)
    bad = [f"{f} (not an image file)" for f in sorted(os.listdir(folder)) if not f.startswith('.')
           and os.path.join(folder, f) not in paths and os.path.isfile(os.path.join(folder, f))]
    images = {}
    for p in paths:
        try:
            images[Path(p).stem] = degrade.to_uint8(degrade.read_image(p)[:3])
        except ValueError:
            bad.append(f"{os.path.basename(p)} (unreadable)")
    return images, bad


def load_faces(folder):
    if not os.path.isdir(folder):
        raise SystemExit(f"error: {folder}: not a folder. Put aligned 512x512 training faces "
                         "there (FFHQ, or the challenge's 5,000) or pass --data_dir=FOLDER; on a "
                         "CPU try: python train.py --preset=cpu --data_dir=FOLDER --val_dir=FOLDER")
    faces, bad = read_folder(folder)
    bad += [f"{stem} ({f.shape[2]}x{f.shape[1]} < --gt_size={gt_size})" for stem, f in faces.items()
            if min(f.shape[1:]) < gt_size]
    if bad or not faces:
        why = f"cannot train on {', '.join(bad[:6])}" + (' and more' if bad[6:] else '')
        raise SystemExit(f"error: {folder}: {why if bad else 'no images'} ({degrade.IMG_EXTS})")
    return list(faces.values())


def load_val(folder):
    """[(LQ, GT)] uint8 pairs from folder/LQ and folder/GT, matched by file stem."""
    (lqs, bad), (gts, bad_gt) = (read_folder(os.path.join(folder, side)) for side in ('LQ', 'GT'))
    unpaired = sorted(set(lqs) ^ set(gts))
    if unpaired or not lqs or bad or bad_gt:
        why = f"unpaired: {', '.join(unpaired[:6])}" if unpaired else ', '.join(bad + bad_gt)
        raise SystemExit(f"error: --val_dir={folder}: LQ/ and GT/ must hold readable images with "
                         f"the same stems; {why or 'none'}")
    for stem, lq in lqs.items():
        if gts[stem].shape[1:] != (4 * lq.shape[1], 4 * lq.shape[2]):
            raise SystemExit(f"error: {folder}: LQ/{stem} is {lq.shape[2]}x{lq.shape[1]}, not 1/4 "
                             f"of its GT ({gts[stem].shape[2]}x{gts[stem].shape[1]})")
    return [(lqs[stem], gts[stem]) for stem in sorted(lqs)]


def crop(x, pick, at, size):
    """(P,C,H,W) -> (n,C,size,size): entry pick[i] cut from rows/columns at[i] on, on the device."""
    span = torch.arange(size, device=x.device)
    rows = (at[:, :1] + span)[:, None, :, None]  # (n,1,size,1)
    cols = (at[:, 1:] + span)[:, None, None, :]  # (n,1,1,size)
    chans = torch.arange(x.shape[1], device=x.device)[:, None, None]  # (C,1,1)
    return x[pick[:, None, None, None], chans, rows, cols]


class Pool:
    """Degraded faces on the device, uint8: 'lq', 'usm' (sharpened GT), 'gt' if a loss needs it.
    A draw takes random entries, a refill replaces random entries, so a batch mixes degradations
    made at different times (Real-ESRGAN's queue). gen: faces, cuts, flips; dgen: the rest."""

    def __init__(self, faces, dev, gen, dgen, keep_gt, state=None):
        self.faces, self.dev, self.gen, self.dgen, self.keep_gt = faces, dev, gen, dgen, keep_gt
        if state is None:
            parts = [self.fresh(min(refill_size, pool_size - i))
                     for i in range(0, pool_size, refill_size)]
            state = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        self.entries = {k: v.to(dev) for k, v in state.items()}

    def fresh(self, n):
        """n faces cut to gt_size at random, flipped half the time, degraded on the device."""
        cuts = []
        for face in torch.randint(len(self.faces), (n,), generator=self.gen).tolist():
            img = self.faces[face]
            y, x = (int(torch.randint(side - gt_size + 1, (), generator=self.gen))
                    for side in img.shape[1:])
            cut = img[:, y:y + gt_size, x:x + gt_size]
            cuts.append(cut.flip(-1) if torch.rand((), generator=self.gen) < 0.5 else cut)
        gt = torch.stack(cuts)  # pinned: a copy from pageable memory waits for the GPU's queue
        gt = (gt.pin_memory() if self.dev.type == 'cuda' else gt).to(self.dev, non_blocking=True)
        lq, usm = degrade.degrade(gt.float() / 255, generator=self.dgen)  # float32, no TF32
        fresh = {'lq': degrade.to_uint8(lq), 'usm': degrade.to_uint8(usm)}
        return {**fresh, 'gt': gt} if self.keep_gt else fresh

    def refill(self):
        slots = torch.randperm(pool_size, generator=self.dgen, device=self.dev)[:refill_size]
        for k, v in self.fresh(refill_size).items():
            self.entries[k][slots] = v

    def draw(self, n):
        """n random entries cut at random -> float LQ (n,3,p,p), USM GT, GT (n,3,4p,4p) or None"""
        pick = torch.randperm(pool_size, generator=self.dgen, device=self.dev)[:n]
        side = self.entries['lq'].shape[-1]
        at = torch.randint(side - patch_size + 1, (n, 2), generator=self.dgen, device=self.dev)
        cut = {k: crop(v, pick, at * (v.shape[-1] // side), patch_size * (v.shape[-1] // side))
               for k, v in self.entries.items()}
        return [cut[k].float() / 255 if k in cut else None for k in ('lq', 'usm', 'gt')]


def step(opt, net):
    """Clip, then Adam's step, skipped on the device if the (all-reduced) norm is not finite:
    fused Adam's found_inf (GradScaler's contract) leaves weights, moments, step count -> 1., 0."""
    norm = torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip or math.inf)
    opt.found_inf = (~norm.isfinite()).float()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return 1 - opt.found_inf


@torch.no_grad()
def validate(net, pairs, dev):
    """float32 mean PSNR (the challenge's uint8 RGB, as sample.py), grid: bicubic | output | GT."""
    scores, rows = [], []
    for lq, gt in pairs:
        y = degrade.to_uint8(net(lq[None].to(dev).float() / 255)[0]).cpu()
        scores.append(float(degrade.psnr(y, gt)))
        if len(rows) < 3:
            rows.append(torch.cat([degrade.upscale_bicubic(lq), y, gt], dim=2))
    return sum(scores) / len(scores), torch.cat(rows, dim=1)


def draw_curves(records, path):
    """Training loss (log scale) and validation PSNR (dashed: bicubic) against iterations."""
    img = Image.new('RGB', (1000, 400), 'white')
    draw = ImageDraw.Draw(img)
    bicubic = next((r['bicubic_psnr'] for r in records if 'bicubic_psnr' in r), None)
    panels = [('loss', f"training loss ({mode}, log scale)", None),
              ('val_psnr', "validation PSNR, dB (EMA; dashed: bicubic)", bicubic)]
    for left, (key, title, ref) in zip((70, 570), panels):
        top, right, bottom = 30, left + 410, 360
        draw.rectangle((left, top, right, bottom), outline='black')
        draw.text((left, top - 16), title, fill='black')
        points = [(r['iter'], r[key]) for r in records if 0 < r.get(key, 0) < math.inf]
        ys = [math.log10(y) if key == 'loss' else y for _, y in points]
        if not points:
            continue
        lo, hi = min(ys + [ref or ys[0]]), max(ys + [ref or ys[0]]) + 1e-6
        x0, x1 = points[0][0], max(points[-1][0], points[0][0] + 1)
        at = lambda x, y: (left + (x - x0) / (x1 - x0) * (right - left),  # noqa: E731
                           bottom - (y - lo) / (hi - lo) * (bottom - top))
        for a in range(left, right, 12) if ref else []:
            draw.line([(a, at(x0, ref)[1]), (a + 6, at(x0, ref)[1])], fill='gray')
        xy = [at(x, y) for (x, _), y in zip(points, ys)]
        draw.line(xy + [(xy[-1][0] + 3, xy[-1][1])], fill='blue', width=2)
        labels = [((left - 58, at(0, y)[1] - 6), f"{10 ** y:.3g}" if key == 'loss' else f"{y:.2f}")
                  for y in (lo, hi)] + [((left, bottom + 4), x0), ((right - 60, bottom + 4), x1)]
        for pos, text in labels:
            draw.text(pos, str(text), fill='black')
    degrade.save_atomic(path, lambda tmp: img.save(tmp, format='PNG'))


def write_log(log):  # rewritten whole, atomically: the file always ends at a complete record
    text = ''.join(json.dumps(r) + '\n' for r in log)
    degrade.save_atomic(os.path.join(out_dir, 'log.jsonl'), lambda tmp: Path(tmp).write_text(text))


def build_generator(ckpt):
    """G from the resumed checkpoint, else from --init (its architecture wins over the flags)."""
    flags = SwinIRConfig(**{k: globals()[k] for k in _MODEL_KEYS})
    if ckpt is not None:
        net = SwinIR(SwinIRConfig(**ckpt['model_args']))
        net.load_state_dict(ckpt['model'])
        return net
    if init and not os.path.isfile(init):
        raise SystemExit(f"error: --init={init}: no such file (--mode=psnr writes psnr.pt)")
    try:
        net, cfg = load_generator(init, flags) if init else (SwinIR(flags), flags)
    except ValueError as e:
        raise SystemExit(f"error: --init: {e}") from None
    differ = [f"{k}={v!r}" for k, v in asdict(cfg).items() if v != getattr(flags, k)]
    if differ:
        print(f"--init: the architecture comes from {init}: {', '.join(differ)}")
    return net.train()


@contextmanager
def timed(name):
    """ms of one part of an iteration into timings[name] while timing (--bench): it syncs."""
    sync = getattr(torch, dev.type).synchronize if timing and dev.type != 'cpu' else lambda: None
    sync()
    t0 = time.perf_counter()
    yield
    sync()
    timings[name] += 1000 * (time.perf_counter() - t0) * timing


def report(it, lr, rows, seconds, log, n_faces, world):
    """Progress line and log.jsonl record for the last len(rows) iterations; skipped steps named."""
    names = ['loss', 'mse'] if mode == 'psnr' else ['loss', 'l1', 'percep', 'gan', 'd']
    for i, row in enumerate(rows, it - len(rows) + 1):
        nets = '+'.join(net for net, ok in zip('GD', row[len(names):]) if not ok)
        if nets:
            print(f"iter {i}: non-finite loss or gradient, {nets} step skipped")
    good = [r for r in rows if all(r[len(names):])]
    means = {n: sum(r[k] for r in good or rows) / len(good or rows) for k, n in enumerate(names)}
    log.append({'iter': it, **means, 'lr': lr, 'skipped': len(rows) - len(good)})
    write_log(log)
    ms, eta = seconds * 1000 / len(rows), (max_iters - it) * seconds / len(rows)
    parts = ', '.join(f"{n} {means[n]:.4g}" for n in names[1:])
    print(f"iter {it}/{max_iters} | epoch {it * batch_size * world / n_faces:.2f} | loss "
          f"{means['loss']:.4g} ({parts}) | lr {lr:.2e} | {batch_size * world * 1000 / ms:.1f} "
          f"img/s | {ms:.1f} ms/iter | ETA {int(eta // 60)}m{int(eta % 60):02d}s")


if __name__ == '__main__':
    positional, config = degrade.configure(globals())  # the override line
    if preset in PRESETS:  # then the flags again: explicit flags beat the preset
        globals().update(PRESETS[preset])
        positional, config = degrade.configure(globals())
    check_settings(positional)
    out_dir = out_dir or f'out_{mode}'
    model_file = model_file or f'{mode}.pt'
    config.update(out_dir=out_dir, model_file=model_file)
    sys.stdout.reconfigure(line_buffering=True)  # progress shows up at once in a redirected log
    # ---- processes and data
    ddp = 'RANK' in os.environ
    dev = degrade.pick_device(device)
    if ddp and dev.type == 'cuda':  # one process per GPU
        dev = torch.device('cuda', int(os.environ['LOCAL_RANK']))
        torch.cuda.set_device(dev)
    if ddp:
        dist.init_process_group('nccl' if dev.type == 'cuda' else 'gloo')
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    master = rank == 0
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')
    if not bench and resume != os.path.isfile(ckpt_path):  # never start over a run's checkpoint
        raise SystemExit(f"error: --resume=True: {ckpt_path} not found" if resume else f"error: "
                         f"{ckpt_path} exists: continue it (--resume=True) or pick a new --out_dir")
    faces = load_faces(data_dir) if not bench or os.path.isdir(data_dir) else list(degrade.to_uint8(
        F.interpolate(torch.rand(refill_size, 3, 16, 16), size=gt_size, mode='bicubic')))  # smooth
    if val_dir == 'data/val' and not os.path.isdir(val_dir):
        val_dir = ''  # the default folder is optional; one named by --val_dir is not
    pairs = load_val(val_dir) if val_dir and master and not bench else []
    try:
        ckpt = load_torch_file(ckpt_path, 'a checkpoint') if resume else None
    except ValueError as e:  # a damaged ckpt.pt: one line, and the file is left as it is
        raise SystemExit(f"error: --resume=True: {e}") from None
    if ckpt is not None and ckpt['config']['mode'] != mode:
        raise SystemExit(f"error: --mode={mode}: {ckpt_path} is a {ckpt['config']['mode']} run")
    # ---- networks and optimizers
    torch.manual_seed(seed)  # the same initial weights on every rank (DDP broadcasts rank 0's)
    g = build_generator(ckpt).to(dev)
    config.update({k: getattr(g.config, k) for k in _MODEL_KEYS})
    ema = copy.deepcopy(g).eval().requires_grad_(False)
    ema_update = get_ema_multi_avg_fn(ema_decay)
    ema_params, g_params = list(ema.parameters()), list(g.parameters())  # once, not per step
    adam = dict(lr=learning_rate, betas=betas, eps=adam_eps, weight_decay=weight_decay,
                fused=True)
    opt_g = torch.optim.Adam(g.parameters(), **adam)
    d = vgg = opt_d = None
    if mode == 'gan':
        d_args = ckpt['disc_args'] if ckpt else {'num_feat': disc_num_feat}
        d = UNetDiscriminatorSN(UNetConfig(**d_args)).to(dev)
        opt_d = torch.optim.Adam(d.parameters(), **adam)
        try:
            vgg = VGGFeatures(vgg_path).to(dev) if perceptual_weight else None
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"error: --vgg_path: {e}") from None
    states = {'ema': ema, 'disc': d, 'optimizer': opt_g, 'disc_optimizer': opt_d}
    for key in [k for k, m in states.items() if m is not None and ckpt is not None]:
        states[key].load_state_dict(ckpt[key])
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
    if saved and dev.type == 'cuda':
        torch.cuda.set_rng_state(saved['rng']['cuda'], dev)
    pool = Pool(faces, dev, gen, dgen, mode == 'gan' or not usm_target, saved and saved['pool'])
    if dev.type == 'cuda':  # TF32 for the networks' float32 parts; degrade() keeps it off
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    for net in [net for net in (g, d) if compile and net is not None]:
        net.compile()  # in place: the same module, the same state_dict keys
    ids = [dev.index] if dev.type == 'cuda' else None  # broadcast_buffers=False: every rank
    wrap = lambda net: DDP(net, device_ids=ids, broadcast_buffers=False)  # noqa: E731
    g_run, d_run = (wrap(g), d and wrap(d)) if ddp else (g, d)  # updates D's buffers alike
    ctx = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == 'bfloat16')
    timing, timings, prof = False, defaultdict(float), torch.profiler.profile()

    if master:
        print('config:', json.dumps(config))
        print(f"{sum(p.numel() for p in g.parameters()):,} G parameters, {len(faces)} training "
              f"faces, {len(pairs)} validation pairs, {world} process(es) on {dev}, {dtype}")
    log = []
    if resume and master:  # a run killed after its last checkpoint had logged beyond it
        lines = Path(out_dir, 'log.jsonl').read_text().splitlines()
        log = [r for r in map(json.loads, lines) if r['iter'] <= start]
    elif pairs:
        bicubic = [degrade.psnr(degrade.upscale_bicubic(lq), gt) for lq, gt in pairs]
        log = [{'iter': 0, 'bicubic_psnr': sum(bicubic) / len(bicubic)}]
        print(f"bicubic: {log[0]['bicubic_psnr']:.3f} dB on {val_dir}")
    if master and not bench:
        os.makedirs(out_dir, exist_ok=True)
        write_log(log)
    if bench:
        max_iters = start + _WARMUP + bench_iters + refill_every  # warm up, time, count ops
    # ---- the loop
    it, hist, t_last = start, [], time.time()
    while True:
        if master and not bench and (it == max_iters or it % eval_interval == 0 and it > start):
            record = {'iter': it}
            if pairs:
                record['val_psnr'], grid = validate(ema, pairs, dev)
                degrade.write_image(os.path.join(out_dir, 'grid.png'), grid)
                print(f"iter {it}: val PSNR {record['val_psnr']:.3f} dB (EMA, {len(pairs)} faces)")
            small = {'model': ema.state_dict(), 'model_args': asdict(g.config), 'iter': it,
                     'val_psnr': record.get('val_psnr'), 'config': config}
            if not pairs or record['val_psnr'] > best:  # the small file the other scripts read
                degrade.save_atomic(model_file, lambda tmp: torch.save(small, tmp))
                print(f"iter {it}: {model_file} updated")
                best = record.get('val_psnr', best)
            rng = {'torch': torch.get_rng_state(), 'data': gen.get_state(), 'degrade':
                   dgen.get_state(), 'cuda': dev.type == 'cuda' and torch.cuda.get_rng_state(dev)}
            ckpt = {**small, 'model': g.state_dict(), 'ema': small['model'], 'best_psnr': best,
                    'disc': d and d.state_dict(), 'disc_args': d and asdict(d.config),
                    'optimizer': opt_g.state_dict(), 'disc_optimizer': opt_d and opt_d.state_dict(),
                    'resume': {'rng': rng, 'pool': {k: v.cpu() for k, v in pool.entries.items()}}}
            degrade.save_atomic(ckpt_path, lambda tmp: torch.save(ckpt, tmp))
            log.append(record)
            write_log(log)
            draw_curves(log, os.path.join(out_dir, 'curves.png'))
            t_last = time.time()  # the ETA counts training time only
        if it >= max_iters:
            break
        timing = bench and start + _WARMUP <= it < start + _WARMUP + bench_iters
        if bench and it == start + _WARMUP + bench_iters:  # then count refill_every's ops
            prof.start()
        lr = learning_rate * 0.5 * (1 + math.cos(math.pi * it / max_iters))
        for group in [gr for opt in (opt_g, opt_d) if opt for gr in opt.param_groups]:
            group['lr'] = lr
        lq, usm, gt = pool.draw(batch_size)
        target = usm if usm_target else gt
        with timed('G fwd+bwd'):
            with ctx:
                out = g_run(lq)
            if mode == 'psnr':
                parts = [F.mse_loss(out.float(), target)]
            else:  # G's adversarial term goes through the plain D: no D grads, no DDP hooks
                d.requires_grad_(False)
                with ctx:  # output and target through VGG as one batch
                    features = vgg(torch.cat([out, target])) if vgg is not None else []
                    fake = d(out).float()
                percep = sum((w * F.l1_loss(*f.float().chunk(2)) for w, f in
                              zip(layer_weights, features)), torch.zeros((), device=dev))
                adv = F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))
                parts = [pixel_weight * F.l1_loss(out.float(), target), perceptual_weight * percep,
                         gan_weight * adv]
            loss = sum(parts)
            loss.backward()
        with timed('optimizer+EMA'):
            oks = [step(opt_g, g)]
            ema_update(ema_params, g_params, None)  # after a skipped step G is unchanged
        if mode == 'gan':
            with timed('D'):
                d.requires_grad_(True)
                with ctx:  # real and fake in one forward: one all-reduce, one spectral-norm update
                    real, fake = d_run(torch.cat([gt, out.detach().float()])).float().chunk(2)
                    loss_d = (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
                              + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))
                loss_d.backward()
                parts.append(loss_d)
                oks.append(step(opt_d, d))
        if (it + 1) % refill_every == 0:
            with timed('degrade'):
                pool.refill()
        hist.append(torch.stack([loss.detach(), *(p.detach() for p in parts), *oks]).float())
        it += 1
        hours = (time.time() - t_last) * (max_iters - it) / 3600
        if it == start + 1 and dev.type == 'cpu' and hours > 1 and master:
            print(f"note: no GPU here: the next {max_iters - it} iterations would take {hours:.1f} "
                  "h at this first one's speed; --preset=cpu trains a small model in ~15 min")
        if not bench and (it % log_interval == 0 or it == max_iters):
            rows, hist = torch.stack(hist).tolist(), []  # the one host sync per log_interval
            if master:
                report(it, lr, rows, time.time() - t_last, log, len(faces), world)
            t_last = time.time()
    if bench:
        prof.stop()
        ms = sum(timings.values()) / bench_iters
        aten = lambda e: e is not None and e.name.startswith('aten::')  # noqa: E731
        ops = sum(aten(e) and not aten(e.cpu_parent) for e in prof.events()) / refill_every
        peak = torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == 'cuda' else None
        print(f"bench: {mode}, batch {batch_size} x {world} of {patch_size}x{patch_size} LQ, "
              f"{dtype}, compile {'on' if compile else 'off'}, {dev}, {torch.get_num_threads()} "
              f"threads\nbench: {batch_size * world * 1000 / ms:.1f} img/s, {ms:.1f} ms/iter: "
              + ', '.join(f"{k} {v / bench_iters:.1f}" for k, v in timings.items()) + f"\nbench: "
              f"{ops:.0f} top-level aten ops per iteration (refills amortised), peak device "
              f"memory {f'{peak:.2f} GiB' if peak is not None else 'n/a (not a CUDA device)'}")
    digest = hashlib.sha256()  # equal on every DDP rank when the ranks are in step
    for k, t in [kt for m in (g, ema, d) if m is not None for kt in m.state_dict().items()]:
        digest.update(k.encode() + t.cpu().contiguous().view(-1).view(torch.uint8).numpy().data)
    print(f"rank {rank}: weights checksum {digest.hexdigest()[:16]}")
    if world > 1:  # tear down together: a rank leaving while rank 0 still saves can abort gloo's
        dist.barrier()
        dist.destroy_process_group()
