"""
Restore low-quality faces (or any photo, any size) 4x with a trained SwinIR; score and show them.

    python sample.py photos/                                    # -> results/<stem>.png
    python sample.py photos/ big.jpg --ckpt=gan.pt --tile=256   # bounded memory on big photos
    python sample.py data/val/LQ --gt_dir=data/val/GT           # PSNR/SSIM -> results/metrics.csv
    python sample.py photos/ --compare=True                     # strips + grid (the seed's Fig. 2)
    python sample.py lq/ --ckpt=001_classicalSR_DF2K_s64w8_SwinIR-M_x4.pth   # official weights

The model: --ckpt, else the first of interp.pt, gan.pt, psnr.pt here (what interpolate.py and
train.py write), else weights/default.pt beside this script (the CPU preset that ships). Inputs:
folders or images; gray, RGBA and 16-bit PNGs work; a bad one is skipped (exit status 1).
"""
import csv
import os
import time

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import degrade
from model import load_generator

# ---- data
ckpt = ''  # '' = interp.pt, gan.pt, psnr.pt (the first that exists), then weights/default.pt
out_dir = 'results'  # one PNG per input, same stem
gt_dir = ''  # ground truth, same stems: PSNR/SSIM per image, printed and in out_dir/metrics.csv
compare = False  # also out_dir/compare/<stem>.png (bicubic | restored | GT), compare_grid.png
compare_height = 256  # px per row of the compare grid
# ---- system
tile = 0  # LQ px per tile side (0 = the whole image at once); rounded down to a window multiple
tile_overlap = 32  # LQ px shared by neighbouring tiles; rounded up to a window multiple, <= tile/2
device = ''  # '' = cuda, then mps, then cpu

_CHAIN = ('interp.pt', 'gan.pt', 'psnr.pt')  # in the working directory, best first
_SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'weights', 'default.pt')


def check_settings():
    """Every setting's range, before any work: one line naming the flag, its value, the range."""
    for key, valid, what in (('tile', tile >= 0, 'an int >= 0 (0 = the whole image at once)'),
                             ('tile_overlap', tile_overlap >= 0, 'an int >= 0'),
                             ('compare_height', 0 < compare_height <= 4096, 'an int in [1, 4096]'),
                             ('out_dir', out_dir and not os.path.isfile(out_dir), 'a folder'),
                             ('gt_dir', not gt_dir or os.path.isdir(gt_dir), 'a folder of images')):
        if not valid:
            raise SystemExit(f"error: --{key}={globals()[key]!r}: expected {what}")


def tile_starts(n, size, overlap):
    """Tile origins along one axis: stride size-overlap, the last one ends at n (may be shorter)."""
    return list(range(0, max(n - overlap, 1), size - overlap))


def ramp_weights(n, lo_inner, hi_inner, overlap, scale):
    """Blending weight of n output px of one tile along one axis: across an edge shared with a
    neighbour, 0 on the outer quarter of the overlap (where the tile's own border shows: padding,
    shift mask), then a raised cosine over the middle half, so two neighbours' weights add to 1."""
    t = (torch.arange(n, dtype=torch.float64) + 0.5) / scale  # px centres, LQ px from tile start
    w = torch.ones(n, dtype=torch.float64)
    q = overlap / 4
    for inner, d in ((lo_inner, t), (hi_inner, n / scale - t)):  # d: distance from that edge
        if inner and overlap > 0:
            w *= 0.5 - 0.5 * torch.cos(torch.pi * ((d - q) / (2 * q)).clamp(0, 1))
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
            w = (ramp_weights((y1 - y0) * scale, y0 > 0, y1 < H, overlap, scale)[:, None]
                 * ramp_weights((x1 - x0) * scale, x0 > 0, x1 < W, overlap, scale))  # (sth, stw)
            out[:, y0 * scale:y1 * scale, x0 * scale:x1 * scale] += o * w
            wsum[:, y0 * scale:y1 * scale, x0 * scale:x1 * scale] += w
    return out / wsum


def upscale_rgb(model, img, size, overlap, window, scale, dev):
    """Tile geometry on window multiples; size 0 = the whole image. Out of memory: halve, retry."""
    size = max(window, (size or -(-max(img.shape[1:]) // window) * window) // window * window)
    while True:
        ov = min(-(-overlap // window) * window, size // 2 // window * window)  # <= 2 tiles per px
        try:
            return upscale_tiled(model, img, size, ov, scale, dev)
        except torch.OutOfMemoryError:
            if size <= window:
                raise
            size = max(window, size // 2 // window * window)
            print(f"out of memory: retrying with --tile={size}")
            torch.cuda.empty_cache()  # a no-op without CUDA


def mean(scores, i):
    return sum(r[i] for r in scores) / len(scores)


def write_csv(path, scores):
    """(name, psnr, ssim) per image and their mean -> CSV, written to a temp file then renamed."""
    scores = scores + [('mean', mean(scores, 1), mean(scores, 2))] if scores else []
    def write(tmp):
        with open(tmp, 'w', newline='') as f:
            csv.writer(f).writerows([('name', 'psnr', 'ssim')] +
                                    [(n, f"{p:.4f}", f"{s:.6f}") for n, p, s in scores])
    degrade.save_atomic(path, write)


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
    """Stack the rows (one per input, equally high) into one PNG, left-aligned on white."""
    grid = Image.new('RGB', (max(r.width for r in rows), len(rows) * rows[0].height), 'white')
    for i, r in enumerate(rows):
        grid.paste(r, (0, i * r.height))
    degrade.save_atomic(path, lambda tmp: grid.save(tmp, format='PNG'))


def gather(inputs):
    """Positional args -> image paths; one error line if none, or if an output would replace one."""
    if not inputs:
        raise SystemExit("error: give at least one input folder or image: python sample.py photos/")
    paths = []
    for p in inputs:
        if not os.path.exists(p):
            raise SystemExit(f"error: {p}: no such file or folder")
        paths += degrade.list_images(p) if os.path.isdir(p) else [p]
    if not paths:
        raise SystemExit(f"error: no images ({' '.join(degrade.IMG_EXTS)}) in {' '.join(inputs)}")
    written = {os.path.realpath(os.path.join(out_dir, d)) for d in ('', 'compare')[:1 + compare]}
    read = [os.path.dirname(p) for p in paths] + ([gt_dir] if gt_dir else [])
    if written & {os.path.realpath(d) for d in read}:
        raise SystemExit(f"error: --out_dir={out_dir} holds inputs or ground truth: they would be "
                         "overwritten; give another --out_dir")
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
        return None, f"{gts[stem]} is {gt.shape[2]}x{gt.shape[1]}, the output {shape[2]}x{shape[1]}"
    if min(shape[1:]) < 11:
        return None, "smaller than the 11x11 window of SSIM"
    return gt, ''


def load_model(dev):
    """--ckpt, else the first default that exists -> (SwinIR on dev, its config); says which."""
    path = ckpt or next((p for p in _CHAIN + (_SHIPPED,) if os.path.isfile(p)), '')
    if not path:
        raise SystemExit(f"error: no model: no --ckpt, no {', '.join(_CHAIN)} here, no {_SHIPPED}; "
                         "python train.py --mode=psnr writes psnr.pt (README: Quick start)")
    if not os.path.isfile(path):
        why = 'a folder, not a checkpoint' if os.path.isdir(path) else 'no such file'
        raise SystemExit(f"error: --ckpt={path}: {why} (train.py and interpolate.py write them)")
    try:
        model, cfg = load_generator(path)  # model_args, else the architecture the shapes describe
    except ValueError as e:  # its message starts with the path
        raise SystemExit(f"error: {'--ckpt=' if ckpt else ''}{e}")
    n = sum(t.numel() for t in model.parameters())
    print(f"model: {path} (SwinIR embed {cfg.embed_dim}, depths {cfg.depths}, window "
          f"{cfg.window_size}, {cfg.upsampler} x{cfg.upscale}, {n:,} parameters)")
    return model.to(dev), cfg


def restore(path, stem, model, cfg, dev, gts):
    """Restore one image, write it (and its strip) -> (what to print, cells, score or None, why)."""
    t0 = time.time()
    name = os.path.basename(path)
    img = degrade.read_image(path)  # (3 or 4, H, W)
    s = cfg.upscale
    rgb = upscale_rgb(model, img[:3], tile, tile_overlap, cfg.window_size, s, dev)
    if img.shape[0] == 4:  # the alpha channel is no face: plain bicubic
        alpha = F.interpolate(img[None, 3:], scale_factor=s, mode='bicubic')[0].clamp(0, 1)
        rgb = torch.cat([rgb, alpha])
    degrade.write_image(os.path.join(out_dir, stem + '.png'), rgb)
    H, W = img.shape[1:]
    line = f"{name} {W}x{H} -> {W * s}x{H * s} in {time.time() - t0:.2f}s"
    cells = [degrade.upscale_bicubic(degrade.to_uint8(img[:3]), s), degrade.to_uint8(rgb[:3])]
    score, why = None, ''
    if gt_dir:
        gt, why = read_gt(gts, stem, cells[1].shape)
        if gt is not None:
            score = (name, degrade.psnr(cells[1], gt), degrade.ssim(cells[1], gt))
            line += f"  PSNR {score[1]:.2f} dB  SSIM {score[2]:.4f}"
            cells.append(gt)
    if compare:
        degrade.write_image(os.path.join(out_dir, 'compare', stem + '.png'), torch.cat(cells, 2))
    return line, cells, score, why


if __name__ == '__main__':
    inputs, config = degrade.configure(globals())
    print(config)
    check_settings()
    paths = gather(inputs)
    dev = degrade.pick_device(device)
    model, cfg = load_model(dev)
    gts = {os.path.splitext(os.path.basename(p))[0]: p for p in degrade.list_images(gt_dir)
           } if gt_dir else {}
    try:
        os.makedirs(os.path.join(out_dir, 'compare') if compare else out_dir, exist_ok=True)
    except OSError as e:  # a file on the way, no permission
        raise SystemExit(f"error: --out_dir={out_dir}: cannot make it ({e})")
    if not os.access(out_dir, os.W_OK):
        raise SystemExit(f"error: --out_dir={out_dir}: not writable")
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    problems = []  # names of the inputs skipped or not scored
    scores = []  # (name, psnr, ssim)
    strips = []  # rows of the compare grid
    for i, (path, stem) in enumerate(zip(paths, stems)):
        name = os.path.basename(path)
        try:
            if stems.index(stem) < i:  # its output would overwrite the earlier one's
                raise ValueError(f"an earlier input has the same stem {stem!r}")
            line, cells, score, why = restore(path, stem, model, cfg, dev, gts)
        except (ValueError, RuntimeError, OSError) as e:  # unreadable, too big, disk full: go on
            print(f"skipped {path}: {(str(e).strip().splitlines() or [type(e).__name__])[0]}")
            problems.append(name)
            continue
        print(f"[{i + 1}/{len(paths)}] {line}" + (f"  (not scored: {why})" if why else ''))
        problems += [name] if why else []
        scores += [score] if score else []
        strips += [grid_row(cells, stem, compare_height)] if compare else []
    try:
        if gt_dir:
            write_csv(os.path.join(out_dir, 'metrics.csv'), scores)
        if scores:
            print(f"mean over {len(scores)} images: PSNR {mean(scores, 1):.2f} dB  "
                  f"SSIM {mean(scores, 2):.4f}  -> {os.path.join(out_dir, 'metrics.csv')}")
        if strips:
            write_grid(os.path.join(out_dir, 'compare_grid.png'), strips)
    except OSError as e:
        raise SystemExit(f"error: --out_dir={out_dir}: cannot write ({e})")
    if problems:
        raise SystemExit(f"{len(problems)} of {len(paths)} skipped/unscored: {', '.join(problems)}")
