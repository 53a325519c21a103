"""
Train SwinIR for 4x blind face super-resolution on faces degraded on the fly (degrade.py, the
Real-ESRGAN second order): first for PSNR (MSE), then with L1 + perceptual + GAN losses.

    python train.py --mode=psnr                       # seed recipe: out_psnr/ and psnr.pt
    python train.py --mode=gan --init=psnr.pt         # out_gan/ and gan.pt (needs VGG19 weights)
    python train.py --mode=psnr --resume=True         # continue out_psnr/ where it stopped
    python train.py --preset=cpu_hour --data_dir=faces/ --val_dir=val/  # ~1 h on 2 cores
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
first_order_prob = 0.0  # per face: degrade.py's milder first-order chain instead (mild photos)
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
preset = ''  # CPU recipes below: 'cpu' (~15 min), 'cpu_hour' (~1 h); explicit flags override
bench = False  # time bench_iters iterations (after 3 warm-up ones), count ops; write nothing
bench_iters = 16  # timed iterations of --bench=True

PRESETS = {'cpu': dict(  # 48k parameters that beat bicubic in ~10-15 minutes on 2 cores
    embed_dim=24, depths=[2, 2], num_heads=[2, 2], patch_size=32, batch_size=8, pool_size=300,
    refill_every=400, learning_rate=4e-4, max_iters=8000, eval_interval=2000, log_interval=500,
    usm_target=False)}
PRESETS['cpu_hour'] = dict(PRESETS['cpu'], embed_dim=36, depths=[2, 2, 2], num_heads=[3, 3, 3],
                           max_iters=16000, first_order_prob=0.25, log_interval=1000)  # 132k, 1 h
_MODEL_KEYS = [f.name for f in fields(SwinIRConfig) if f.name in globals()]
_WARMUP = 3  # untimed iterations of --bench=True
_FACES = f"aligned faces ({' '.join(degrade.IMG_EXTS)}), sides >= --gt_size; on a CPU: --preset=cpu"


def check_settings(positional):  # before any work, one line each -> SwinIRConfig of the flags
    num = lambda v: type(v) in (int, float) and 0 <= v < math.inf  # noqa: E731
    flag = lambda k: f"--{k}={globals()[k]}: expected"  # noqa: E731
    rules = [(not positional, f"{' '.join(positional)}: train.py takes only --key=value settings")]
    rules += [(globals()[k] in v, f"{flag(k)} one of {v}") for k, v in [('preset', ('', *PRESETS)),
              ('mode', ('psnr', 'gan')), ('dtype', ('float32', 'bfloat16'))]]
    rules += [(0 < globals()[k] < math.inf, f"{flag(k)} > 0") for k in 'gt_size patch_size '
              'batch_size refill_size refill_every learning_rate adam_eps disc_num_feat '
              'eval_interval log_interval bench_iters'.split()]
    rules += [(num(globals()[k]), f"{flag(k)} >= 0") for k in 'max_iters weight_decay '
              'grad_clip pixel_weight perceptual_weight gan_weight seed'.split()]
    writable = lambda folder: os.path.isdir(folder) and os.access(folder, os.W_OK)  # noqa: E731
    out_in = out_dir if os.path.exists(out_dir) else os.path.dirname(os.path.abspath(out_dir))
    file_in = os.path.realpath(os.path.dirname(os.path.abspath(model_file)))  # may be out_dir
    inputs = {os.path.realpath(os.path.join(folder, side)) for folder in (data_dir, val_dir)
              if folder for side in ('', 'GT', 'LQ')} | {init and os.path.realpath(init)}
    rules += [
        (0 <= first_order_prob <= 1, f"{flag('first_order_prob')} a probability in [0, 1]"),
        (gt_size % 4 == 0, f"{flag('gt_size')} a multiple of 4"),
        (4 * patch_size <= gt_size, f"{flag('patch_size')} at most --gt_size / 4 (its GT crop)"),
        (mode == 'psnr' or patch_size % 2 == 0, f"{flag('patch_size')} an even one (for D)"),
        (batch_size <= pool_size, f"{flag('pool_size')} at least --batch_size={batch_size}"),
        (refill_size <= pool_size, f"{flag('refill_size')} at most --pool_size={pool_size}"),
        (0 <= ema_decay < 1, f"{flag('ema_decay')} a value in [0, 1)"),
        (len(betas) == 2 and all(num(b) and b < 1 for b in betas), f"{flag('betas')} 2 in [0, 1)"),
        (len(layer_weights) == 5 and all(map(num, layer_weights)),
         f"{flag('layer_weights')} 5 weights >= 0"),
        (not init or os.path.isfile(init), f"{flag('init')} a file (--mode=psnr writes psnr.pt)"),
        (bench or writable(out_in), f"{flag('out_dir')} a writable folder, or a new one in one"),
        (bench or (writable(file_in) or file_in == os.path.realpath(out_dir)) and not
         os.path.isdir(model_file), f"{flag('model_file')} a file in a writable folder"),
        (bench or os.path.realpath(out_dir) not in inputs, f"{flag('out_dir')} no input folder"),
        (bench or os.path.realpath(model_file) not in inputs, f"{flag('model_file')} not --init"),
        (bench or resume or not os.path.exists(ckpt_path), f"{ckpt_path} exists: continue it "
         "(--resume=True) or pick a new --out_dir")]
    for ok, message in rules:
        if not ok:
            raise SystemExit(f"error: {message}")
    try:
        return SwinIRConfig(**{k: globals()[k] for k in _MODEL_KEYS})
    except ValueError as e:
        raise SystemExit(f"error: --{e}") from None


def read_folder(folder, flag, expected, min_side=1):  # {stem: uint8 (3,H,W)}, decoded once
    bad = [] if os.path.isdir(folder) else [f"{folder} is not a folder"]
    images = {}
    for name in [] if bad else sorted(f for f in os.listdir(folder) if not f.startswith('.')):
        path = os.path.join(folder, name)
        if not name.lower().endswith(degrade.IMG_EXTS):
            bad += [f"{name} (not an image file)"] if os.path.isfile(path) else []
            continue
        try:
            images[Path(name).stem] = degrade.to_uint8(degrade.read_image(path)[:3])
        except ValueError:
            bad.append(f"{name} (unreadable)")
    bad += [f"{stem} ({f.shape[2]}x{f.shape[1]} < --gt_size={min_side})"
            for stem, f in images.items() if min(f.shape[1:]) < min_side]
    if bad or not images:  # anything else in it, or nothing: one line, a few named
        some = ', '.join(bad[:6]) + (f' and {len(bad) - 6} more' if bad[6:] else '')
        raise SystemExit(f"error: {flag}: {some or 'no images'}; expected {expected}")
    return images


def load_val(folder):  # [(LQ, GT)] uint8 pairs from folder/LQ and folder/GT, the same stems
    flag = f"--val_dir={folder}"
    expected = "LQ/ and GT/ of readable images, the same stems, each LQ 1/4 of its GT"
    lqs, gts = (read_folder(os.path.join(folder, side), flag, expected) for side in ('LQ', 'GT'))
    bad = [f"unpaired: {stem}" for stem in sorted(set(lqs) ^ set(gts))] or [
        f"LQ/{s} is {lq.shape[2]}x{lq.shape[1]}, GT/{s} {gts[s].shape[2]}x{gts[s].shape[1]}"
        for s, lq in lqs.items() if gts[s].shape[1:] != (4 * lq.shape[1], 4 * lq.shape[2])]
    if bad:
        raise SystemExit(f"error: {flag}: {', '.join(bad[:6])}; expected {expected}")
    return [(lqs[stem], gts[stem]) for stem in sorted(lqs)]


def load_run():  # --resume=True: ckpt.pt and log.jsonl; damaged, another mode's: one line
    try:
        ckpt = load_torch_file(ckpt_path, 'a checkpoint')
    except ValueError as e:
        raise SystemExit(f"error: --resume=True: {e}") from None
    keys = {'model', 'model_args', 'ema', 'optimizer', 'iter', 'best_psnr', 'config', 'resume'}
    if not isinstance(ckpt, dict) or not keys <= set(ckpt) or ckpt['config'].get('mode') != mode:
        raise SystemExit(f"error: --resume=True: {ckpt_path} is no checkpoint of a {mode} run")
    try:
        with open(os.path.join(out_dir, 'log.jsonl')) as f:  # it may have logged past ckpt.pt
            return ckpt, [r for r in map(json.loads, f) if r['iter'] <= ckpt['iter']]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: --resume=True: {out_dir}/log.jsonl: not a log ({e!r})")


def fresh(n):  # n faces for the pool, cut at random, flipped half the time, degraded: uint8
    cuts = []
    for img in [faces[i] for i in torch.randint(len(faces), (n,), generator=gen).tolist()]:
        y, x = (int(torch.randint(side - gt_size + 1, (), generator=gen)) for side in img.shape[1:])
        cut = img[:, y:y + gt_size, x:x + gt_size]
        cuts.append(cut.flip(-1) if torch.rand((), generator=gen) < 0.5 else cut)
    gt = torch.stack(cuts)  # pinned: a copy from pageable memory waits for the GPU's queue
    gt = (gt.pin_memory() if dev.type == 'cuda' else gt).to(dev, non_blocking=True)
    lq, usm = degrade.degrade(gt.float() / 255, dgen, first_order_prob=first_order_prob)
    made = {'lq': degrade.to_uint8(lq), 'usm': degrade.to_uint8(usm)}
    return {**made, 'gt': gt} if mode == 'gan' or not usm_target else made  # if a loss needs it


def draw_batch(pool, n):  # n random entries, cut at random -> float LQ (n,3,p,p), USM, GT or None
    pick = torch.randperm(pool_size, generator=dgen, device=dev)[:n]
    side = pool['lq'].shape[-1]
    at = torch.randint(side - patch_size + 1, (n, 2), generator=dgen, device=dev)
    cut = {}
    for k, v in pool.items():  # the same place in each entry, at its own scale, on the device
        top_left = at * (v.shape[-1] // side)
        span = torch.arange(patch_size * (v.shape[-1] // side), device=dev)
        rows = (top_left[:, :1] + span)[:, None, :, None]  # (n,1,size,1)
        cols = (top_left[:, 1:] + span)[:, None, None, :]  # (n,1,1,size)
        chans = torch.arange(v.shape[1], device=dev)[:, None, None]  # (C,1,1)
        cut[k] = v[pick[:, None, None, None], chans, rows, cols].float() / 255
    return [cut.get(k) for k in ('lq', 'usm', 'gt')]


def step(opt, net):  # clip, Adam's step: skipped on the device if the norm is not finite -> 1., 0.
    norm = torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip or math.inf)  # all-reduced
    opt.found_inf = (~norm.isfinite()).float()  # fused Adam (GradScaler's contract): no update
    opt.step()
    opt.zero_grad(set_to_none=True)
    return 1 - opt.found_inf


@torch.no_grad()
def validate(net, pairs, dev):  # -> float32 mean PSNR (uint8 RGB, as sample.py), PIL grid
    scores, rows = [], []
    for lq, gt in pairs:
        y = degrade.to_uint8(net(lq[None].to(dev).float() / 255)[0]).cpu()
        scores.append(float(degrade.psnr(y, gt)))
        if len(rows) < 3:
            rows.append(torch.cat([degrade.upscale_bicubic(lq), y, gt], dim=2))
    grid = torch.cat(rows, dim=1).permute(1, 2, 0).numpy()  # bicubic | output | GT, 3 faces
    return sum(scores) / len(scores), Image.fromarray(grid)


def draw_curves(records, path):  # training loss (log scale), validation PSNR against iterations
    img = Image.new('RGB', (1000, 400), 'white')
    pen = ImageDraw.Draw(img)
    for left, key, title in ((70, 'loss', f"training loss ({mode}, log scale)"),
                             (570, 'val_psnr', "validation PSNR (EMA; gray: bicubic)")):
        pen.rectangle((left, 30, left + 410, 360), outline='black')
        pen.text((left, 14), title, fill='black')
        xy = [(r['iter'], math.log10(r[key]) if key == 'loss' else r[key]) for r in records
              if 0 < r.get(key, 0) < math.inf]
        ref = [r['bicubic_psnr'] for r in records if 'bicubic_psnr' in r and key == 'val_psnr']
        if not xy:
            continue
        x0, x1 = xy[0][0], max(xy[-1][0], xy[0][0] + 1)  # the iterations shown
        lo, hi = min([y for _, y in xy] + ref), max([y for _, y in xy] + ref) + 1e-6  # the values
        height = lambda y: 350 - 310 * (y - lo) / (hi - lo)  # noqa: E731  (10 px inside)
        for y in ref[:1]:  # the bicubic PSNR, the floor to beat
            pen.line([(left, height(y)), (left + 410, height(y))], fill='gray')
        line = [(left + 410 * (x - x0) / (x1 - x0), height(y)) for x, y in xy]
        pen.line(line + [(line[-1][0] + 3, line[-1][1])], fill='blue', width=2)  # 1 point: a dash
        span = f"{10 ** lo:.3g} to {10 ** hi:.3g}" if key == 'loss' else f"{lo:.2f} to {hi:.2f} dB"
        pen.text((left, 364), f"iterations {x0} to {x1}; {span}", fill='black')
    save(path, lambda tmp: img.save(tmp, format='PNG'))


def save(path, write):  # atomic (degrade.save_atomic); a full disk: one line, the old file kept
    try:
        degrade.save_atomic(path, write)
    except OSError as e:
        raise SystemExit(f"error: cannot write {path} ({e}); its last complete version is kept")


def write_log(log):  # rewritten whole, atomically: the file always ends at a complete record
    text = ''.join(json.dumps(r) + '\n' for r in log)
    save(os.path.join(out_dir, 'log.jsonl'), lambda tmp: Path(tmp).write_text(text))


@contextmanager
def timed(name):  # ms of one part of an iteration into timings[name] while timing: it syncs
    sync = getattr(torch, dev.type).synchronize if timing and dev.type != 'cpu' else lambda: None
    sync()
    t0 = time.perf_counter()
    yield
    sync()
    timings[name] = timings.get(name, 0) + 1000 * (time.perf_counter() - t0) * timing


if __name__ == '__main__':
    positional, config = degrade.configure(globals())  # the override line
    if preset in PRESETS:  # then the flags again: explicit flags beat the preset
        globals().update(PRESETS[preset])
        positional, config = degrade.configure(globals())
    out_dir = out_dir or f'out_{mode}'
    model_file = model_file or f'{mode}.pt'
    config.update(out_dir=out_dir, model_file=model_file)
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')
    flags = check_settings(positional)
    sys.stdout.reconfigure(line_buffering=True)  # progress shows up at once in a redirected log
    # ---- processes
    ddp = 'RANK' in os.environ
    dev = degrade.pick_device(device)
    if ddp and dev.type == 'cuda':  # one process per GPU
        dev = torch.device('cuda', int(os.environ['LOCAL_RANK']))
        torch.cuda.set_device(dev)
    if ddp:
        dist.init_process_group('nccl' if dev.type == 'cuda' else 'gloo')
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    master = rank == 0
    # ---- networks and optimizers, from the run to resume, --init or the settings
    ckpt, log = load_run() if resume else (None, [])
    torch.manual_seed(seed)  # the same initial weights on every rank (DDP broadcasts rank 0's)
    source = {'model': ckpt['model'], 'model_args': ckpt['model_args']} if ckpt else init  # not EMA
    try:
        g, cfg = load_generator(source) if source else (SwinIR(flags), flags)
    except ValueError as e:
        raise SystemExit(f"error: {'--resume=True' if ckpt else '--init'}: {e}") from None
    differ = [f"{k}={v!r}" for k, v in asdict(cfg).items() if v != getattr(flags, k)]
    if differ:  # their architecture wins over the flags
        print(f"the architecture comes from {ckpt_path if ckpt else init}: {', '.join(differ)}")
    g = g.train().to(dev)
    config.update({k: getattr(g.config, k) for k in _MODEL_KEYS})
    ema = copy.deepcopy(g).eval().requires_grad_(False)
    ema_update = get_ema_multi_avg_fn(ema_decay)
    ema_params, g_params = list(ema.parameters()), list(g.parameters())  # once, not per step
    adam = dict(lr=learning_rate, betas=betas, eps=adam_eps, weight_decay=weight_decay, fused=True)
    opt_g = torch.optim.Adam(g.parameters(), **adam)
    d = vgg = opt_d = None
    if mode == 'gan':
        d = UNetDiscriminatorSN(UNetConfig(**ckpt['disc_args'] if ckpt else
                                           {'num_feat': disc_num_feat})).to(dev)
        opt_d = torch.optim.Adam(d.parameters(), **adam)
        try:
            vgg = VGGFeatures(vgg_path).to(dev) if perceptual_weight else None
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"error: --vgg_path: {str(e).splitlines()[0]}") from None
    states = {'ema': ema, 'disc': d, 'optimizer': opt_g, 'disc_optimizer': opt_d}
    for key in [k for k, m in states.items() if m is not None and ckpt is not None]:
        states[key].load_state_dict(ckpt[key])
    # ---- data: decoded once, last, after the cheap checks
    faces = list(read_folder(data_dir, f"--data_dir={data_dir}", _FACES, gt_size).values()) if (
        not bench or os.path.isdir(data_dir)) else list(degrade.to_uint8(F.interpolate(
            torch.rand(refill_size, 3, 16, 16), size=gt_size, mode='bicubic')))  # smooth, made up
    if val_dir == 'data/val' and not os.path.isdir(val_dir):
        val_dir = ''  # the default folder is optional; one named by --val_dir is not
    pairs = load_val(val_dir) if val_dir and master and not bench else []
    start = ckpt['iter'] if ckpt else 0
    best = ckpt['best_psnr'] if ckpt else -math.inf
    # ---- random streams and the pool: each rank its own; rank 0's are saved, the others restart
    seeds = [hash((seed, rank, start if rank else 0, k)) & (2 ** 63 - 1) for k in range(3)]
    torch.manual_seed(seeds[0])
    gen = torch.Generator().manual_seed(seeds[1])  # which faces, where cut, flips
    dgen = torch.Generator(dev).manual_seed(seeds[2])  # pool draws and refills, degradations
    streams = {'torch': torch.default_generator, 'data': gen, 'degrade': dgen}
    saved = ckpt['resume'] if ckpt is not None and master else None
    for name, stream in streams.items() if saved else []:
        stream.set_state(saved['rng'][name])
    if saved and dev.type == 'cuda':
        torch.cuda.set_rng_state(saved['rng']['cuda'], dev)
    if saved:
        pool = {k: v.to(dev) for k, v in saved['pool'].items()}
    else:  # made refill_size at a time, as the refills make them
        parts = [fresh(min(refill_size, pool_size - i)) for i in range(0, pool_size, refill_size)]
        pool = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    if dev.type == 'cuda':  # TF32 for the networks' float32 parts; degrade() keeps it off
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    for net in [net for net in (g, d) if compile and net is not None]:
        net.compile()  # in place: the same module, the same state_dict keys
    ids = [dev.index] if dev.type == 'cuda' else None  # broadcast_buffers=False: every rank
    wrap = lambda net: DDP(net, device_ids=ids, broadcast_buffers=False)  # noqa: E731
    g_run, d_run = (wrap(g), d and wrap(d)) if ddp else (g, d)  # updates D's buffers alike
    ctx = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == 'bfloat16')
    timings = {}  # --bench: ms per part of an iteration
    prof = torch.profiler.profile()  # --bench: the ops of one iteration and a refill

    if master:
        print('config:', json.dumps(config))
        print(f"{sum(p.numel() for p in g.parameters()):,} G parameters, {len(faces)} training "
              f"faces, {len(pairs)} validation pairs, {world} process(es) on {dev}, {dtype}")
        if dev.type == 'cpu' and g.config == SwinIRConfig():  # up front: it may run out of memory
            print("note: no GPU: the seed model is a GPU's (batch 4 of 128x128 on 2 CPU cores: ~20 "
                  "s and ~23 GB an iteration); --preset=cpu trains in ~15 min, cpu_hour in ~1 h")
    if pairs and not resume:
        bicubic = [degrade.psnr(degrade.upscale_bicubic(lq), gt) for lq, gt in pairs]
        log = [{'iter': 0, 'bicubic_psnr': sum(bicubic) / len(bicubic)}]
        print(f"bicubic: {log[0]['bicubic_psnr']:.3f} dB on {val_dir}")
    if master and not bench:
        os.makedirs(out_dir, exist_ok=True)  # check_settings found it, or its folder, writable
        write_log(log)
    max_iters = start + _WARMUP + bench_iters + 1 if bench else max_iters  # warm up, time, count
    # ---- the loop
    names = ['loss', 'mse'] if mode == 'psnr' else ['loss', 'l1', 'percep', 'gan', 'd']
    it = start
    hist = []  # per iteration: loss, its parts, G (and D) stepped; read once per log_interval
    t_last = time.time()
    while True:
        if master and not bench and (it == max_iters or it % eval_interval == 0 and it > start):
            record = {'iter': it}
            if pairs:
                record['val_psnr'], grid = validate(ema, pairs, dev)
                save(os.path.join(out_dir, 'grid.png'), lambda tmp: grid.save(tmp, format='PNG'))
                print(f"iter {it}: val PSNR {record['val_psnr']:.3f} dB (EMA, {len(pairs)} faces)")
            small = {'model': ema.state_dict(), 'model_args': asdict(g.config), 'iter': it,
                     'val_psnr': record.get('val_psnr'), 'config': config}
            if not pairs or record['val_psnr'] > best:  # the small file the other scripts read
                save(model_file, lambda tmp: torch.save(small, tmp))
                print(f"iter {it}: {model_file} updated")
                best = record.get('val_psnr', best)
            rng = {name: stream.get_state() for name, stream in streams.items()}
            rng['cuda'] = dev.type == 'cuda' and torch.cuda.get_rng_state(dev)
            ckpt = {**small, **{k: m and m.state_dict() for k, m in states.items()},
                    'model': g.state_dict(), 'best_psnr': best, 'disc_args': d and asdict(d.config),
                    'resume': {'rng': rng, 'pool': {k: v.cpu() for k, v in pool.items()}}}
            save(ckpt_path, lambda tmp: torch.save(ckpt, tmp))
            log.append(record)
            write_log(log)
            draw_curves(log, os.path.join(out_dir, 'curves.png'))
            t_last = time.time()  # the ETA counts training time only
        if it >= max_iters:
            break
        timing = bench and start + _WARMUP <= it < start + _WARMUP + bench_iters
        if bench and it + 1 == max_iters:  # then count the ops of one iteration and a refill
            prof.start()
        lr = learning_rate * 0.5 * (1 + math.cos(math.pi * it / max_iters))
        for group in [gr for opt in (opt_g, opt_d) if opt for gr in opt.param_groups]:
            group['lr'] = lr
        lq, usm, gt = draw_batch(pool, batch_size)
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
        if (it + 1) % refill_every == 0 or bench and it + 1 == max_iters:  # Real-ESRGAN's queue
            with timed('degrade'), torch.profiler.record_function('refill'):  # fresh faces in
                slots = torch.randperm(pool_size, generator=dgen, device=dev)[:refill_size]
                for k, v in fresh(refill_size).items():
                    pool[k][slots] = v
        hist.append(torch.stack([loss.detach(), *(p.detach() for p in parts), *oks]).float())
        it += 1
        if bench or it % log_interval and it < max_iters:
            continue
        rows, hist = torch.stack(hist).tolist(), []  # the one host sync per log_interval
        if not master:
            continue
        for i, row in enumerate(rows, it - len(rows) + 1):  # the steps skipped, named
            nets = '+'.join(net for net, ok in zip('GD', row[len(names):]) if not ok)
            if nets:
                print(f"iter {i}: non-finite loss or gradient, {nets} step skipped")
        good = [r for r in rows if all(r[len(names):])]
        kept = good or rows  # all skipped: their mean all the same
        means = {n: sum(r[k] for r in kept) / len(kept) for k, n in enumerate(names)}
        log.append({'iter': it, **means, 'lr': lr, 'skipped': len(rows) - len(good)})
        write_log(log)
        ms = (time.time() - t_last) * 1000 / len(rows)
        eta = time.strftime('%H:%M:%S', time.gmtime(ms * (max_iters - it) / 1000))
        terms = ', '.join(f"{n} {means[n]:.4g}" for n in names[1:])
        print(f"iter {it}/{max_iters} | epoch {it * batch_size * world / len(faces):.2f} | loss "
              f"{means['loss']:.4g} ({terms}) | lr {lr:.2e} | {batch_size * world * 1000 / ms:.1f} "
              f"img/s | {ms:.1f} ms/iter | ETA {eta}")
        t_last = time.time()
    if bench:
        prof.stop()
        ms = sum(timings.values()) / bench_iters
        aten = lambda e: e is not None and e.name.startswith('aten::')  # noqa: E731
        ops = sum(1 / refill_every if e.cpu_parent and e.cpu_parent.name == 'refill' else 1
                  for e in prof.events() if aten(e) and not aten(e.cpu_parent))  # top-level
        peak = (f"{torch.cuda.max_memory_allocated(dev) / 2 ** 30:.2f} GiB" if dev.type == 'cuda'
                else 'n/a (not a CUDA device)')
        print(f"bench: {mode}, batch {batch_size} x {world} of {patch_size}x{patch_size} LQ, "
              f"{dtype}, compile {'on' if compile else 'off'}, {dev}, {torch.get_num_threads()} "
              f"threads\nbench: {batch_size * world * 1000 / ms:.1f} img/s, {ms:.1f} ms/iter: "
              + ', '.join(f"{k} {v / bench_iters:.1f}" for k, v in timings.items()) + "\nbench: "
              f"{ops:.0f} top-level aten ops per iteration (refills amortised), peak memory {peak}")
    digest = hashlib.sha256()  # equal on every DDP rank when the ranks are in step
    for k, t in [kt for m in (g, ema, d) if m is not None for kt in m.state_dict().items()]:
        digest.update(k.encode() + t.cpu().contiguous().view(-1).view(torch.uint8).numpy().data)
    print(f"rank {rank}: weights checksum {digest.hexdigest()[:16]}")
    if world > 1:  # tear down together: a rank leaving while rank 0 still saves can abort gloo's
        dist.barrier()
        dist.destroy_process_group()
