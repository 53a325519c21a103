"""
Restore low-quality faces (or any photo, any size) 4x with a trained SwinIR; score and show them.

    python sample.py ../shared/data/real_lq                        # out/best.pt -> results/<stem>.png
    python sample.py photos/ big.jpg --ckpt=out/interp.pt --tile=256   # bounded memory on big photos
    python sample.py ../shared/data/faces/val/LQ --gt_dir=../shared/data/faces/val/GT  # PSNR/SSIM csv
    python sample.py ../shared/data/real_lq --compare=True         # strips + grid (the seed's Figure 2)
    python sample.py lq/ --ckpt=001_classicalSR_DF2K_s64w8_SwinIR-M_x4.pth   # official weights

Inputs are folders (png/jpg/jpeg/webp/bmp) or single files. Gray and RGBA inputs become RGB for the
network; an alpha channel is upscaled with bicubic and put back (RGBA PNG out). 16-bit PNGs are read
at full precision. A file that cannot be read is reported and skipped; the exit status is then 1.
With --tile=N the image stays on the CPU and one tile of N LQ px at a time goes to the device; tiles
start on window multiples (so each sees the same attention windows as the whole image) and overlap
by --tile_overlap px: the outer quarter of an overlap is context only, the middle half is blended
with a raised-cosine ramp. On out-of-memory the tile is halved and the image retried.
"""
import csv
import os
import time

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import degrade
from model import SwinIRConfig, load_generator

# ---- data
ckpt = 'out/best.pt'  # our checkpoint (EMA weights when present) or an official SwinIR file
out_dir = 'results'  # one PNG per input, same stem
gt_dir = ''  # ground truth with the same stems: PSNR/SSIM per image, printed and in out_dir/metrics.csv
compare = False  # also out_dir/compare/<stem>.png (bicubic LQ | restored | GT) and out_dir/compare_grid.png
compare_height = 256  # px per row of the compare grid
# ---- model: only for files without model_args (official weights); None = inferred from the key shapes,
# any field given here builds SwinIRConfig(given fields, seed defaults for the rest)
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

_ARCH = ('upscale', 'window_size', 'img_range', 'depths', 'embed_dim', 'num_heads', 'mlp_ratio', 'upsampler',
        'resi_connection')


def tile_starts(n, size, overlap):
    """Tile origins along one axis: stride size-overlap, the last tile ends at n (it may be shorter)."""
    return list(range(0, max(n - overlap, 1), size - overlap))


def ramp_weights(n, lo_inner, hi_inner, overlap, scale):
    """Blending weight of n output px of one tile along one axis. Across an inner edge (one shared with
    a neighbour) it is 0 on the outer quarter of the overlap, where the tile's own border (conv zero
    padding, reflect padding, shifted-window mask) shows, and rises as a raised cosine over the middle
    half; two neighbours' ramps then add up to 1. Image borders keep weight 1."""
    t = (torch.arange(n, dtype=torch.float64) + 0.5) / scale  # pixel centres in LQ px from the tile start
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
    """Tile geometry on window multiples; size 0 = the whole image. Out of memory: halve and retry."""
    size = -(-max(img.shape[1:]) // window) * window if size <= 0 else max(window, size // window * window)
    while True:
        ov = min(-(-overlap // window) * window, size // 2 // window * window)  # <= 2 tiles per pixel
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
    """rows of (name, psnr, ssim) -> CSV with a final mean row, written to a temp file then renamed."""
    def write(tmp):
        with open(tmp, 'w', newline='') as f:
            w = csv.writer(f)
            w.writerow(['name', 'psnr', 'ssim'])
            w.writerows([n, f"{p:.4f}", f"{s:.6f}"] for n, p, s in rows)
            if rows:
                w.writerow(['mean', f"{sum(r[1] for r in rows) / len(rows):.4f}",
                            f"{sum(r[2] for r in rows) / len(rows):.6f}"])
    degrade.save_atomic(path, write)


def grid_row(cells, name, height):
    """uint8 (3,h,w) cells -> one labelled PIL row, each cell resized to `height` px high."""
    labels = [f"{name} bicubic", 'restored', 'ground truth']
    width = max(1, round(height * cells[0].shape[2] / cells[0].shape[1]))
    row = Image.new('RGB', (width * len(cells), height), 'white')
    draw = ImageDraw.Draw(row)
    for i, c in enumerate(cells):
        im = Image.fromarray(c.permute(1, 2, 0).numpy()).resize((width, height), Image.Resampling.LANCZOS)
        row.paste(im, (i * width, 0))
        box = draw.textbbox((i * width + 3, 2), labels[i])
        draw.rectangle(box, fill='black')
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
    """Positional args (folders or files) -> image paths; one clear error when there is nothing to do."""
    if not inputs:
        raise SystemExit("error: give at least one input folder or image: python sample.py photos/")
    paths = []
    for p in inputs:
        if os.path.isdir(p):
            paths += degrade.list_images(p)
        elif os.path.isfile(p):
            paths.append(p)
        else:
            raise SystemExit(f"error: {p}: no such file or folder")
    for p in paths:
        if os.path.realpath(os.path.dirname(p)) == os.path.realpath(out_dir):
            raise SystemExit(f"error: --out_dir={out_dir} holds the input {p}: it would be overwritten")
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
        return None, f"ground truth {gts[stem]} is {gt.shape[2]}x{gt.shape[1]}, output {shape[2]}x{shape[1]}"
    return gt, ''


def load_model(arch, dev):
    if not os.path.isfile(ckpt):
        raise SystemExit(f"error: --ckpt={ckpt}: no such file (train one with train.py, or pass --ckpt=PATH)")
    try:
        model, cfg = load_generator(ckpt, SwinIRConfig(**arch) if arch else None)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    return model.eval().to(dev), cfg


if __name__ == '__main__':
    inputs, config = degrade.configure(globals())
    print(config)
    paths = gather(inputs)
    dev = degrade.pick_device(device)
    model, cfg = load_model({k: config[k] for k in _ARCH if config[k] is not None}, dev)
    s, win = cfg.upscale, cfg.window_size
    gts = {os.path.splitext(os.path.basename(p))[0]: p for p in degrade.list_images(gt_dir)} if gt_dir else {}
    os.makedirs(os.path.join(out_dir, 'compare') if compare else out_dir, exist_ok=True)
    problems, scores, rows, seen = [], [], [], set()
    for i, path in enumerate(paths, 1):
        name = os.path.basename(path)
        stem = os.path.splitext(name)[0]
        if stem in seen:
            print(f"skipped {path}: an earlier input has the same stem {stem!r}")
            problems.append(name)
            continue
        seen.add(stem)
        t0 = time.time()
        try:
            img = degrade.read_image(path)  # (3 or 4, H, W)
            rgb = upscale_rgb(model, img[:3], tile, tile_overlap, win, s, dev)
        except (ValueError, RuntimeError) as e:
            print(f"skipped {path}: {str(e).splitlines()[0]}")
            problems.append(name)
            continue
        if img.shape[0] == 4:  # the alpha channel is no face: plain bicubic
            rgb = torch.cat([rgb, F.interpolate(img[None, 3:], scale_factor=s, mode='bicubic')[0].clamp(0, 1)])
        degrade.write_image(os.path.join(out_dir, stem + '.png'), rgb)
        H, W = img.shape[1:]
        line = f"[{i}/{len(paths)}] {name} {W}x{H} -> {W * s}x{H * s} in {time.time() - t0:.2f}s"
        cells = [degrade.upscale_bicubic(degrade.to_uint8(img[:3]), s), degrade.to_uint8(rgb[:3])]
        if gt_dir:
            gt, why = read_gt(gts, stem, cells[1].shape)
            if gt is None:
                line += f"  (not scored: {why})"
                problems.append(name)
            else:
                scores.append((name, degrade.psnr(cells[1], gt), degrade.ssim(cells[1], gt)))
                line += f"  PSNR {scores[-1][1]:.2f} dB  SSIM {scores[-1][2]:.4f}"
                cells.append(gt)
        print(line)
        if compare:
            degrade.write_image(os.path.join(out_dir, 'compare', stem + '.png'), torch.cat(cells, dim=2))
            rows.append(grid_row(cells, stem, compare_height))
    if gt_dir:
        write_csv(os.path.join(out_dir, 'metrics.csv'), scores)
        if scores:
            print(f"mean over {len(scores)} images: PSNR {sum(r[1] for r in scores) / len(scores):.2f} dB  "
                  f"SSIM {sum(r[2] for r in scores) / len(scores):.4f}  -> {os.path.join(out_dir, 'metrics.csv')}")
    if rows:
        write_grid(os.path.join(out_dir, 'compare_grid.png'), rows)
    if problems:
        raise SystemExit(f"{len(problems)} of {len(paths)} not done or not scored: {', '.join(problems)}")
