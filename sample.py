"""
Restore low-quality faces (or any photo, any size) 4x with a trained SwinIR; score and show them.

    python sample.py photos/                                    # -> results/<stem>.png
    python sample.py photos/ big.jpg --ckpt=gan.pt --tile=256   # bounded memory on big photos
    python sample.py val/LQ --gt_dir=val/GT                     # PSNR/SSIM -> results/metrics.csv
    python sample.py photos/ --compare=True                     # strips + grid (the seed's Fig. 2)
    python sample.py lq/ --ckpt=001_classicalSR_DF2K_s64w8_SwinIR-M_x4.pth   # official weights

The model: --ckpt, else the first of interp.pt, gan.pt, psnr.pt here (what interpolate.py and
train.py write), else weights/default.pt beside this script (the CPU preset that ships). Inputs:
folders or image files; gray, RGBA (alpha: bicubic) and 16-bit PNGs work; a bad file is skipped
(exit status 1). --tile=N: tiles of N LQ px on window multiples, overlapping by --tile_overlap
(outer quarter context only, middle half blended by a raised cosine), halved on out-of-memory.
"""
import csv
import os
import time
from dataclasses import asdict

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import degrade
from model import SwinIRConfig, load_generator

# ---- data
ckpt = ''  # '' = interp.pt, gan.pt, psnr.pt (first that exists), then weights/default.pt
out_dir = 'results'  # one PNG per input, same stem
gt_dir = ''  # ground truth, same stems: PSNR/SSIM per image, printed and in out_dir/metrics.csv
compare = False  # also out_dir/compare/<stem>.png (bicubic | restored | GT), out_dir/compare_grid.png
compare_height = 256  # px per row of the compare grid
# ---- model: only for files without model_args (official weights); None = inferred from the key
# shapes, any field given here builds SwinIRConfig(given fields, seed defaults for the rest)
upscale = None  # 4 for every model of this project
window_size = None  # 8
img_range = None  # 1.0
depths = None  # [6, 6, 6, 6, 6, 6]
embed_dim = None  # 78
num_heads = None  # [6, 6, 6, 6, 6, 6]
mlp_ratio = None  # 2
upsampler = None  # 'pixelshuffledirect', 'pixelshuffle' or 'nearest+conv'
resi_connection = None  # '1conv' or '3conv'
# ---- system
tile = 0  # LQ px per tile side (0 = the whole image at once); rounded down to a window multiple
tile_overlap = 32  # LQ px shared by neighbouring tiles; rounded up to a window multiple, <= tile/2
device = ''  # '' = cuda, then mps, then cpu

_ARCH = [k for k in asdict(SwinIRConfig()) if k in globals()]  # the model settings above
_CHAIN = ('interp.pt', 'gan.pt', 'psnr.pt')  # in the working directory, best first
_SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'weights', 'default.pt')


def check_settings(config):
    """Every setting's range, before any work: one line naming the flag, its value, what is valid.
    Model settings only when given (SwinIRConfig checks upsampler and resi_connection itself)."""
    rules = [('tile', tile >= 0, 'an int >= 0'), ('tile_overlap', tile_overlap >= 0, 'an int >= 0'),
             ('compare_height', 0 < compare_height <= 4096, 'an int in [1, 4096]'),
             ('out_dir', out_dir != '', 'a folder name')]
    arch = {k: config[k] for k in _ARCH if config[k] is not None}
    for k, v in arch.items():
        kinds = (int, float) if k in ('img_range', 'mlp_ratio') else (int,)  # bool is no count
        items = v if type(v) is list and k in ('depths', 'num_heads') else [v]
        if k not in ('upsampler', 'resi_connection'):
            rules.append((k, len(items) > 0 and all(type(x) in kinds and x > 0 for x in items),
                          f"{'a list of ' if items is v else 'an '}{' or '.join(t.__name__ for t in kinds)}"
                          " > 0"))
    for k, valid, what in rules:
        if not valid:
            raise SystemExit(f"error: --{k}={config[k]!r}: expected {what}")
    return arch


def tile_starts(n, size, overlap):
    """Tile origins along one axis: stride size-overlap, the last tile ends at n (may be shorter)."""
    return list(range(0, max(n - overlap, 1), size - overlap))


def ramp_weights(n, lo_inner, hi_inner, overlap, scale):
    """Blending weight of n output px of one tile along one axis. Across an inner edge (one shared
    with a neighbour) it is 0 on the outer quarter of the overlap, where the tile's own border (conv
    zero padding, reflect padding, shifted-window mask) shows, and rises as a raised cosine over the
    middle half; two neighbours' ramps then add up to 1. Image borders keep weight 1."""
    t = (torch.arange(n, dtype=torch.float64) + 0.5) / scale  # px centres, LQ px from tile start
    w = torch.ones(n, dtype=torch.float64)
    if overlap > 0:
        ramp = lambda d: 0.5 - 0.5 * torch.cos(torch.pi * ((d - overlap / 4) / (overlap / 2)).clamp(0, 1))
        if lo_inner:
            w *= ramp(t)
        if hi_inner:
            w *= ramp(n / scale - t)
    return w.float()


def upscale_tiled(model, img, size, overlap, scale, dev):
    """(3,H,W) CPU float -> (3,sH,sW) CPU float, one tile at a time on dev, blended on the CPU."""
    _, H, W = img.shape
    out = torch.zeros(3, H * scale, W * scale)
    wsum = torch.zeros(1, H * scale, W * scale)
    for y0 in tile_starts(H, size, overlap):
        for x0 in tile_starts(W, size, overlap):
            y1, x1 = min(y0 + size, H), min(x0 + size, W)
            with torch.inference_mode():
                o = model(img[None, :, y0:y1, x0:x1].to(dev))[0].float().cpu()  # (3, s*th, s*tw)
            wy = ramp_weights((y1 - y0) * scale, y0 > 0, y1 < H, overlap, scale)
            wx = ramp_weights((x1 - x0) * scale, x0 > 0, x1 < W, overlap, scale)
            w = wy[:, None] * wx[None, :]
            out[:, y0 * scale:y1 * scale, x0 * scale:x1 * scale] += o * w
            wsum[:, y0 * scale:y1 * scale, x0 * scale:x1 * scale] += w
    return out / wsum


def upscale_rgb(model, img, size, overlap, window, scale, dev):
    """Tile geometry on window multiples; size 0 = the whole image. Out of memory: halve, retry."""
    if size <= 0:
        size = -(-max(img.shape[1:]) // window) * window
    size = max(window, size // window * window)
    while True:
        ov = min(-(-overlap // window) * window, size // 2 // window * window)  # <= 2 tiles per px
        try:
            return upscale_tiled(model, img, size, ov, scale, dev)
        except torch.OutOfMemoryError:
            if size <= window:
                raise
            size = max(window, size // 2 // window * window)
            print(f"out of memory: retrying with --tile={size}")
            if dev.type == 'cuda':
                torch.cuda.empty_cache()


def write_csv(path, rows):
    """rows of (name, psnr, ssim) -> CSV with a final mean row, written to a temp file, renamed."""
    def write(tmp):
        with open(tmp, 'w', newline='') as f:
            w = csv.writer(f)
            w.writerow(['name', 'psnr', 'ssim'])
            w.writerows([n, f"{p:.4f}", f"{s:.6f}"] for n, p, s in rows)
            if rows:
                w.writerow(['mean', f"{mean(rows, 1):.4f}", f"{mean(rows, 2):.6f}"])
    degrade.save_atomic(path, write)


def mean(rows, i):
    return sum(r[i] for r in rows) / len(rows)


def grid_row(cells, name, height):
    """uint8 (3,h,w) cells -> one labelled PIL row, each cell resized to `height` px high."""
    labels = [f"{name} bicubic", 'restored', 'ground truth']
    width = max(1, round(height * cells[0].shape[2] / cells[0].shape[1]))
    row = Image.new('RGB', (width * len(cells), height), 'white')
    draw = ImageDraw.Draw(row)
    for i, c in enumerate(cells):
        im = Image.fromarray(c.permute(1, 2, 0).numpy())
        row.paste(im.resize((width, height), Image.Resampling.LANCZOS), (i * width, 0))
        draw.rectangle(draw.textbbox((i * width + 3, 2), labels[i]), fill='black')
        draw.text((i * width + 3, 2), labels[i], fill='white')
    return row


def write_grid(path, rows):
    """Stack the rows (one per input) into one PNG, left-aligned on white; temp file then rename."""
    grid = Image.new('RGB', (max(r.width for r in rows), sum(r.height for r in rows)), 'white')
    y = 0
    for r in rows:
        grid.paste(r, (0, y))
        y += r.height
    degrade.save_atomic(path, lambda tmp: grid.save(tmp, format='PNG'))


def gather(inputs):
    """Positional args (folders or files) -> image paths; one error line when there is nothing to
    do or when an output would overwrite an input or a ground truth."""
    if not inputs:
        raise SystemExit("error: give at least one input folder or image: python sample.py photos/")
    paths = []
    for p in inputs:
        if not os.path.exists(p):
            raise SystemExit(f"error: {p}: no such file or folder")
        paths += degrade.list_images(p) if os.path.isdir(p) else [p]
    if not paths:
        raise SystemExit(f"error: no images ({', '.join(degrade.IMG_EXTS)}) in {' '.join(inputs)}")
    if gt_dir and not os.path.isdir(gt_dir):
        raise SystemExit(f"error: --gt_dir={gt_dir}: not a folder")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise SystemExit(f"error: --out_dir={out_dir} is a file, not a folder")
    written = {os.path.realpath(out_dir)}  # the folders that get our PNGs
    if compare:
        written.add(os.path.realpath(os.path.join(out_dir, 'compare')))
    for p in paths:
        if os.path.realpath(os.path.dirname(p)) in written:
            raise SystemExit(f"error: --out_dir={out_dir} holds the input {p}: it would be overwritten")
    if gt_dir and os.path.realpath(gt_dir) in written:
        raise SystemExit(f"error: --out_dir={out_dir} is --gt_dir: the ground truth would be overwritten")
    return paths


def read_gt(gts, stem, shape):
    """-> (uint8 (3,H,W) ground truth, '') or (None, why it cannot be scored)."""
    if stem not in gts:
        return None, f"no ground truth named {stem}.* in {gt_dir}"
    try:
        gt = degrade.to_uint8(degrade.read_image(gts[stem])[:3])
    except ValueError as e:
        return None, str(e)
    if gt.shape != shape:
        return None, f"ground truth {gts[stem]} is {gt.shape[2]}x{gt.shape[1]}, not {shape[2]}x{shape[1]}"
    return gt, ''


def load_model(arch, dev):
    """--ckpt or the first default that exists -> (SwinIR on dev, config); prints which file."""
    path = ckpt or next((p for p in _CHAIN + (_SHIPPED,) if os.path.isfile(p)), '')
    if not path:
        raise SystemExit(f"error: no model: no --ckpt, none of {', '.join(_CHAIN)} here, no {_SHIPPED}"
                         " (python train.py --mode=psnr writes psnr.pt; see README, Quick start)")
    if not os.path.isfile(path):
        raise SystemExit(f"error: --ckpt={path}: {'a folder' if os.path.isdir(path) else 'no such file'}"
                         " (give a checkpoint: psnr.pt, gan.pt, interp.pt or an official SwinIR file)")
    try:
        model, cfg = load_generator(path, SwinIRConfig(**arch) if arch else None)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    n = sum(t.numel() for t in model.parameters())
    print(f"model: {path} (SwinIR embed {cfg.embed_dim}, depths {cfg.depths}, window {cfg.window_size},"
          f" {cfg.upsampler} x{cfg.upscale}, {n:,} parameters)")
    ignored = [f"--{k}={v!r}" for k, v in arch.items() if getattr(cfg, k) != v]
    if ignored:
        print(f"note: {path} names its architecture (model_args): ignored {' '.join(ignored)}")
    return model.eval().to(dev), cfg


def make_out_dir():
    try:
        os.makedirs(os.path.join(out_dir, 'compare') if compare else out_dir, exist_ok=True)
    except OSError as e:  # a file on the way, no permission
        raise SystemExit(f"error: --out_dir={out_dir}: cannot make it ({e})")
    if not os.access(out_dir, os.W_OK):
        raise SystemExit(f"error: --out_dir={out_dir}: not writable")


def restore_one(path, model, cfg, dev, gts):
    """Restore one image and write it (and its strip) -> (printed line, cells, score or None, why)."""
    img = degrade.read_image(path)  # (3 or 4, H, W)
    s = cfg.upscale
    rgb = upscale_rgb(model, img[:3], tile, tile_overlap, cfg.window_size, s, dev)
    if img.shape[0] == 4:  # the alpha channel is no face: plain bicubic
        alpha = F.interpolate(img[None, 3:], scale_factor=s, mode='bicubic')[0].clamp(0, 1)
        rgb = torch.cat([rgb, alpha])
    stem = os.path.splitext(os.path.basename(path))[0]
    degrade.write_image(os.path.join(out_dir, stem + '.png'), rgb)
    H, W = img.shape[1:]
    line = f"{os.path.basename(path)} {W}x{H} -> {W * s}x{H * s}"
    cells = [degrade.upscale_bicubic(degrade.to_uint8(img[:3]), s), degrade.to_uint8(rgb[:3])]
    score, why = None, ''
    if gt_dir:
        gt, why = read_gt(gts, stem, cells[1].shape)
        if gt is not None:
            score = (os.path.basename(path), degrade.psnr(cells[1], gt), degrade.ssim(cells[1], gt))
            line += f"  PSNR {score[1]:.2f} dB  SSIM {score[2]:.4f}"
            cells.append(gt)
    if compare:
        degrade.write_image(os.path.join(out_dir, 'compare', stem + '.png'), torch.cat(cells, 2))
    return line, cells, score, why


if __name__ == '__main__':
    inputs, config = degrade.configure(globals())
    print(config)
    arch = check_settings(config)
    paths = gather(inputs)
    dev = degrade.pick_device(device)
    model, cfg = load_model(arch, dev)
    gts = {os.path.splitext(os.path.basename(p))[0]: p for p in degrade.list_images(gt_dir)
           } if gt_dir else {}
    make_out_dir()
    problems, scores, rows, seen = [], [], [], set()
    for i, path in enumerate(paths, 1):
        name = os.path.basename(path)
        t0 = time.time()
        try:
            if os.path.splitext(name)[0] in seen:
                raise ValueError(f"an earlier input has the same stem {os.path.splitext(name)[0]!r}")
            seen.add(os.path.splitext(name)[0])
            line, cells, score, why = restore_one(path, model, cfg, dev, gts)
        except (ValueError, RuntimeError, OSError) as e:  # unreadable, too big, disk full: go on
            print(f"skipped {path}: {(str(e).strip().splitlines() or [type(e).__name__])[0]}")
            problems.append(name)
            continue
        print(f"[{i}/{len(paths)}] {line} in {time.time() - t0:.2f}s" + (why and f"  (not scored: {why})"))
        problems += [name] if why else []
        scores += [score] if score else []
        rows += [grid_row(cells, os.path.splitext(name)[0], compare_height)] if compare else []
    try:
        if gt_dir:
            write_csv(os.path.join(out_dir, 'metrics.csv'), scores)
        if scores:
            print(f"mean over {len(scores)} images: PSNR {mean(scores, 1):.2f} dB  "
                  f"SSIM {mean(scores, 2):.4f}  -> {os.path.join(out_dir, 'metrics.csv')}")
        if rows:
            write_grid(os.path.join(out_dir, 'compare_grid.png'), rows)
    except OSError as e:
        raise SystemExit(f"error: --out_dir={out_dir}: cannot write ({e})")
    if problems:
        raise SystemExit(f"{len(problems)} of {len(paths)} not done or not scored: "
                         f"{', '.join(problems)}")
