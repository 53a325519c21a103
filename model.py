"""
The networks: SwinIR (generator, official parameter names), the Real-ESRGAN U-Net discriminator with
spectral norm, frozen VGG19 features for the perceptual loss, and the checkpoint loader.

    python model.py                                  # parameter counts of the seed networks
    python model.py --bench                          # SwinIR seed: fwd+bwd 2x3x64x64, infer 1x3x128x128
    python model.py --bench --ref=/tmp/ref/network_swinir.py  # ... side by side with the official code
    python model.py --help                           # the settings
"""
import ast
import math
import os
import pickle
import statistics
import sys
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

# ==== SwinIR ====
PLANS = 4  # window plans kept per model: the most recently used input sizes


@dataclass
class SwinIRConfig:
    upscale: int = 4
    in_chans: int = 3
    img_size: int = 64  # only kept so official kwargs load; any input size works
    window_size: int = 8
    img_range: float = 1.0
    depths: list = field(default_factory=lambda: [6, 6, 6, 6, 6, 6])
    embed_dim: int = 78
    num_heads: list = field(default_factory=lambda: [6, 6, 6, 6, 6, 6])
    mlp_ratio: float = 2.0
    upsampler: str = 'pixelshuffledirect'  # or 'pixelshuffle' (classical), 'nearest+conv' (real-world)
    resi_connection: str = '1conv'  # or '3conv'


class WindowPlan:
    """Token orders and the shift mask for B padded HxW images, built once per size. Order s (0 or
    the shift) lists each image's tokens window after window of the image rolled by -s (the
    official cyclic shift); idx[a, b] re-orders a (B*H*W, C) stream from order a to order b (None:
    row-major image order) in one gather. The n_inner windows whose shift mask is all zero come
    first; mask is that of the others (the last row and column of windows): (M, 1, N, N) bool, True
    where the official SW-MSA mask adds -100 (tokens from different regions)."""

    def __init__(self, B, H, W, ws, shift, device):
        nh, nw = H // ws, W // ws
        h = torch.arange(H, device=device).view(nh, 1, ws, 1)
        w = torch.arange(W, device=device).view(1, nw, 1, ws)
        border = (h[:, :, 0, 0] == H - ws) | (w[:, :, 0, 0] == W - ws)  # (nh, nw) windows
        windows = torch.argsort(border.view(-1).long(), stable=True)  # border windows last
        self.n_inner = (nh - 1) * (nw - 1)
        images = torch.arange(B, device=device).view(B, 1, 1) * (H * W)
        perm, inv = {}, {}
        for s in {0, shift}:
            src = (((h + s) % H) * W + (w + s) % W).view(nh * nw, ws * ws)  # image index of a token
            perm[s] = (images + src[windows]).view(-1)  # (B, nW, N) flattened
            inv[s] = torch.argsort(perm[s])
        orders = [None, 0, shift]
        self.idx = {(a, b): perm[b] if a is None else inv[a] if b is None else inv[a][perm[b]]
                    for a in orders for b in orders if a != b}
        self.mask = None
        if shift:
            def region(x, n):  # the official slices of the rolled image: 0, -ws, -shift
                return (x >= n - ws).long() + (x >= n - shift).long()
            lab = (region(h, H) * 3 + region(w, W)).expand(nh, nw, ws, ws).reshape(nh * nw, -1)
            lab = lab[windows[self.n_inner:]]  # (M, N)
            self.mask = (lab[:, :, None] != lab[:, None, :])[:, None]


class WindowAttention(nn.Module):
    def __init__(self, dim, window_size, num_heads):
        super().__init__()
        self.num_heads = num_heads
        n = 2 * window_size - 1
        self.relative_position_bias_table = nn.Parameter(torch.zeros(n * n, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        r = torch.arange(window_size)
        c = torch.stack(torch.meshgrid(r, r, indexing='ij')).flatten(1)  # (2, N) token coordinates
        d = c[:, :, None] - c[:, None, :] + window_size - 1  # (2, N, N) offsets, shifted to >= 0
        self.register_buffer('relative_position_index', (d[0] * n + d[1])[None], persistent=False)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, plan=None):
        """x (B*nW*N, C): normalised tokens, image after image, window after window. plan: None, or
        the WindowPlan whose shift mask goes with the bias (the shifted blocks)."""
        T, C = x.shape
        N, nH = self.relative_position_index.shape[-1], self.num_heads
        hd, pad = C // nH, -(C // nH) % 8
        qkv = self.qkv(x).view(-1, N, 3, nH, hd).permute(2, 0, 3, 1, 4)  # (3, B*nW, nH, N, hd)
        if pad:  # the fused GPU kernels need a head size that is a multiple of 8 (13 -> 16 in the
            qkv = F.pad(qkv, (0, pad))  # seed model): zeros leave the scores and outputs as they are
        bias = self.relative_position_bias_table[self.relative_position_index].permute(0, 3, 1, 2)
        # (1, nH, N, N) in the compute dtype (autocast's), last stride 1 as SDPA's fused kernels need
        bias = bias.to(qkv.dtype, memory_format=torch.contiguous_format)
        if plan is not None:  # a mask per window: an image's windows side by side as heads, (B,
            # nW*nH, N, hd), so that one (1, nW*nH, N, N) mask serves the whole batch
            masked = torch.add(bias, plan.mask, alpha=-100)  # (M, nH, N, N): the border windows
            bias = torch.cat([bias.expand(plan.n_inner, -1, -1, -1), masked]).view(1, -1, N, N)
            qkv = qkv.reshape(3, -1, bias.shape[1], N, qkv.shape[-1])
        y = F.scaled_dot_product_attention(*qkv, attn_mask=bias, scale=hd ** -0.5)
        y = y.unflatten(1, (-1, nH))[..., :hd].transpose(-3, -2)  # (B*nW or B, 1 or nW, N, nH, hd)
        return self.proj(y.reshape(T, C))


class SwinTransformerBlock(nn.Module):
    def __init__(self, dim, num_heads, window_size, shift, mlp_ratio):
        super().__init__()
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(dim, hidden), act=nn.GELU(),
                                             fc2=nn.Linear(hidden, dim)))

    def forward(self, x, plan):  # x (B*H*W, C): tokens in this block's window order
        x = x + self.attn(self.norm1(x), plan)
        return x + self.mlp(self.norm2(x))


def _resi_conv(dim, kind):
    if kind == '1conv':
        return nn.Conv2d(dim, dim, 3, 1, 1)
    if kind == '3conv':  # official: fewer parameters
        return nn.Sequential(nn.Conv2d(dim, dim // 4, 3, 1, 1), nn.LeakyReLU(0.2, True),
                             nn.Conv2d(dim // 4, dim // 4, 1, 1, 0), nn.LeakyReLU(0.2, True),
                             nn.Conv2d(dim // 4, dim, 3, 1, 1))
    raise ValueError(f"resi_connection: expected '1conv' or '3conv', got {kind!r}")


class RSTB(nn.Module):
    """Residual Swin Transformer block: `depth` blocks, a conv, a skip. Official names: the blocks
    live in `residual_group.blocks`."""

    def __init__(self, dim, depth, num_heads, window_size, mlp_ratio, resi_connection):
        super().__init__()
        self.residual_group = nn.Module()
        self.residual_group.blocks = nn.ModuleList(
            SwinTransformerBlock(dim, num_heads, window_size, i % 2 * (window_size // 2), mlp_ratio)
            for i in range(depth))
        self.conv = _resi_conv(dim, resi_connection)

    def forward(self, x, plan):  # x (B, H, W, C)
        y, order = x.view(-1, x.shape[-1]), None  # (B*H*W, C) tokens in image order
        for blk in self.residual_group.blocks:
            y, order = y.index_select(0, plan.idx[order, blk.shift]), blk.shift
            y = blk(y, plan if blk.shift else None)
        y = y.index_select(0, plan.idx[order, None]).view(x.shape)
        return self.conv(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1) + x


class SwinIR(nn.Module):
    def __init__(self, config=None):
        super().__init__()
        cfg = self.config = config or SwinIRConfig()
        dim, out_ch, num_feat = cfg.embed_dim, cfg.in_chans, 64
        mean = (0.4488, 0.4371, 0.4040) if cfg.in_chans == 3 else (0.0,)
        self.register_buffer('mean', torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.conv_first = nn.Conv2d(cfg.in_chans, dim, 3, 1, 1)
        self.patch_embed = nn.Module()
        self.patch_embed.norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(RSTB(dim, d, h, cfg.window_size, cfg.mlp_ratio, cfg.resi_connection)
                                    for d, h in zip(cfg.depths, cfg.num_heads))
        self.norm = nn.LayerNorm(dim)
        self.conv_after_body = _resi_conv(dim, cfg.resi_connection)
        if cfg.upsampler == 'pixelshuffledirect':
            self.upsample = nn.Sequential(nn.Conv2d(dim, cfg.upscale ** 2 * out_ch, 3, 1, 1),
                                          nn.PixelShuffle(cfg.upscale))
        elif cfg.upsampler in ('pixelshuffle', 'nearest+conv'):
            self.conv_before_upsample = nn.Sequential(nn.Conv2d(dim, num_feat, 3, 1, 1),
                                                      nn.LeakyReLU(inplace=True))
            if cfg.upsampler == 'pixelshuffle':
                steps = [3] if cfg.upscale == 3 else [2] * (cfg.upscale.bit_length() - 1)
                if 2 ** len(steps) != cfg.upscale != 3:
                    raise ValueError(f"upscale: pixelshuffle supports 2^n and 3, got {cfg.upscale}")
                self.upsample = nn.Sequential(*[m for s in steps for m in (
                    nn.Conv2d(num_feat, s * s * num_feat, 3, 1, 1), nn.PixelShuffle(s))])
            else:
                if cfg.upscale != 4:
                    raise ValueError(f"upscale: nearest+conv supports only 4, got {cfg.upscale}")
                self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
                self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
                self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
            self.conv_last = nn.Conv2d(num_feat, out_ch, 3, 1, 1)
        else:
            raise ValueError("upsampler: expected pixelshuffledirect, pixelshuffle or nearest+conv, "
                             f"got {cfg.upsampler!r}")
        self.apply(self._init_weights)
        self._plans = {}  # (B, H, W, device) -> WindowPlan, the PLANS most recently used

    @staticmethod
    def _init_weights(m):  # official init
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    @torch.compiler.disable  # built and looked up eagerly: a compiled forward has no guard on it
    def plan(self, B, H, W, device):
        """The WindowPlan of B padded HxW images on device, from the cache of recent sizes."""
        key = (B, H, W, str(device))
        ws = self.config.window_size
        plan = self._plans.pop(key, None) or WindowPlan(B, H, W, ws, ws // 2, device)
        self._plans[key] = plan  # the most recent last
        if len(self._plans) > PLANS:
            del self._plans[next(iter(self._plans))]
        return plan

    def forward(self, x):
        cfg = self.config
        B, _, H, W = x.shape
        ph, pw = -H % cfg.window_size, -W % cfg.window_size
        plan = self.plan(B, H + ph, W + pw, x.device)
        if ph or pw:  # official: reflect-pad to a window multiple, crop the output
            x = F.pad(x, (0, pw, 0, ph), 'reflect' if ph < H and pw < W else 'replicate')
        x = ((x - self.mean) * cfg.img_range).contiguous(memory_format=torch.channels_last)
        x = self.conv_first(x)
        t = self.patch_embed.norm(x.permute(0, 2, 3, 1))  # (B, H, W, C)
        for layer in self.layers:
            t = layer(t, plan)
        x = self.conv_after_body(self.norm(t).permute(0, 3, 1, 2)) + x
        if cfg.upsampler == 'pixelshuffledirect':
            x = self.upsample(x)
        elif cfg.upsampler == 'pixelshuffle':
            x = self.conv_last(self.upsample(self.conv_before_upsample(x)))
        else:
            x = self.conv_before_upsample(x)
            x = F.leaky_relu(self.conv_up1(F.interpolate(x, scale_factor=2, mode='nearest')), 0.2)
            x = F.leaky_relu(self.conv_up2(F.interpolate(x, scale_factor=2, mode='nearest')), 0.2)
            x = self.conv_last(F.leaky_relu(self.conv_hr(x), 0.2))
        x = x / cfg.img_range + self.mean
        return x[:, :, :H * cfg.upscale, :W * cfg.upscale].contiguous()


# ==== checkpoints ====
DERIVED = ('relative_position_index', 'attn_mask')  # official buffers rebuilt from the config
TABLE0 = 'layers.0.residual_group.blocks.0.attn.relative_position_bias_table'


def extract_state_dict(obj):
    """Our checkpoint ('ema', then 'model'; 'model_args'), an official file ('params_ema', then
    'params') or a plain state dict -> (state_dict without 'module.'/'_orig_mod.' prefixes,
    model_args or None)."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a dict, got {type(obj).__name__}")
    sd = next((obj[k] for k in ('ema', 'model', 'params_ema', 'params')
               if isinstance(obj.get(k), dict)), obj)
    if not sd or not all(isinstance(t, torch.Tensor) for t in sd.values()):
        raise ValueError("no state dict found (expected a plain state dict or one under 'ema', "
                         "'model', 'params_ema' or 'params')")
    def strip(k):
        return strip(k.split('.', 1)[1]) if k.startswith(('module.', '_orig_mod.')) else k
    args = obj.get('model_args')
    return {strip(k): t for k, t in sd.items()}, (dict(args) if isinstance(args, dict) else None)


def infer_config(sd):
    """The SwinIRConfig that a SwinIR state dict's key shapes describe (img_size, img_range:
    defaults)."""
    try:
        dim, in_chans = sd['conv_first.weight'].shape[:2]
        depths, heads, i = [], [], 0
        while TABLE0.replace('layers.0', f'layers.{i}') in sd:
            tables = [t for k, t in sd.items() if k.startswith(f'layers.{i}.residual_group.blocks.')
                      and k.endswith('.attn.relative_position_bias_table')]
            depths.append(len(tables))
            heads.append(tables[0].shape[1])
            i += 1
        ws = (math.isqrt(sd[TABLE0].shape[0]) + 1) // 2
        mlp_ratio = sd['layers.0.residual_group.blocks.0.mlp.fc1.weight'].shape[0] / dim
        resi = '1conv' if 'conv_after_body.weight' in sd else '3conv'
        if 'conv_up1.weight' in sd:
            upsampler, upscale = 'nearest+conv', 4
        elif 'conv_before_upsample.0.weight' in sd:
            ups = [t.shape[0] // t.shape[1] for k, t in sd.items()
                   if k.startswith('upsample.') and k.endswith('weight')]
            upsampler, upscale = 'pixelshuffle', math.prod(math.isqrt(u) for u in ups)
        else:
            upsampler = 'pixelshuffledirect'
            upscale = math.isqrt(sd['upsample.0.weight'].shape[0] // in_chans)
    except (KeyError, IndexError) as e:
        raise ValueError(f"not a SwinIR state dict (no {e})") from None
    return SwinIRConfig(upscale=upscale, in_chans=int(in_chans), window_size=ws, depths=depths,
                        embed_dim=int(dim), num_heads=heads, mlp_ratio=mlp_ratio,
                        upsampler=upsampler, resi_connection=resi)


def _mismatch(name, sd, expected):
    """One line per problem: missing / unexpected / wrong-shape keys (first few of each) + a config
    that fits."""
    def few(keys):
        return ', '.join(keys[:5]) + (f', ... ({len(keys)} in all)' if len(keys) > 5 else '')
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f'{k} {tuple(sd[k].shape)} vs {tuple(t.shape)}' for k, t in expected.items()
              if k in sd and sd[k].shape != t.shape]
    lines = [f"{name}: the weights do not fit the SwinIR config"]
    lines += [f"  {what} ({len(ks)}): {few(ks)}" for what, ks in (
        ('missing', missing), ('unexpected', unexpected), ('wrong shape file vs model', shapes)) if ks]
    if not (missing or unexpected or shapes):
        return None
    try:
        lines.append(f"  a config that would fit: {asdict(infer_config(sd))}")
    except ValueError as e:
        lines.append(f"  no SwinIR config fits: {e}")
    return '\n'.join(lines)


def load_torch_file(path, what):
    """torch.load(path, weights_only=True) on the CPU; any failure -> ValueError, one line naming
    path."""
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        # torch's unpickling message is a page of advice about weights_only=False, beside the point
        why = '' if isinstance(e, pickle.UnpicklingError) else ': ' + (
            str(e).strip().splitlines() or [''])[0]
        raise ValueError(f"{path}: cannot read {what} ({type(e).__name__}{why})") from None


def load_generator(path_or_obj, config=None):
    """Checkpoint path or loaded dict -> (SwinIR in eval mode, SwinIRConfig). Config: model_args in
    the file, else `config`, else inferred from the key shapes. Any problem -> ValueError starting
    with the path."""
    name = path_or_obj if isinstance(path_or_obj, str) else '<checkpoint>'
    what = 'a SwinIR checkpoint'
    obj = load_torch_file(path_or_obj, what) if isinstance(path_or_obj, str) else path_or_obj
    try:
        sd, args = extract_state_dict(obj)
    except ValueError as e:
        raise ValueError(f"{name}: cannot read {what} ({e})") from None
    sd = {k: t for k, t in sd.items() if not k.endswith(DERIVED)}
    try:
        cfg = config if args is None else args
        cfg = infer_config(sd) if cfg is None else cfg if isinstance(cfg, SwinIRConfig) else (
            SwinIRConfig(**cfg))
        model = SwinIR(cfg)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: bad SwinIR config ({e})") from None
    problem = _mismatch(name, sd, model.state_dict())
    if problem:
        raise ValueError(problem)
    model.load_state_dict(sd)
    return model.eval(), cfg


# ==== U-Net discriminator with spectral norm (Real-ESRGAN) ====


@dataclass
class UNetConfig:
    num_in_ch: int = 3
    num_feat: int = 64
    skip_connection: bool = True


class UNetDiscriminatorSN(nn.Module):
    """Per-pixel real/fake logits (B, 1, H, W); H and W must be multiples of 8."""

    def __init__(self, config=None):
        super().__init__()
        cfg = self.config = config or UNetConfig()
        nf, sn = cfg.num_feat, nn.utils.spectral_norm
        self.conv0 = nn.Conv2d(cfg.num_in_ch, nf, 3, 1, 1)
        for i, (a, b) in enumerate([(1, 2), (2, 4), (4, 8)], 1):  # downsample
            setattr(self, f'conv{i}', sn(nn.Conv2d(nf * a, nf * b, 4, 2, 1, bias=False)))
        for i, (a, b) in enumerate([(8, 4), (4, 2), (2, 1), (1, 1), (1, 1)], 4):  # up + extra convs
            setattr(self, f'conv{i}', sn(nn.Conv2d(nf * a, nf * b, 3, 1, 1, bias=False)))
        self.conv9 = nn.Conv2d(nf, 1, 3, 1, 1)

    def forward(self, x):
        act = partial(F.leaky_relu, negative_slope=0.2)
        up = partial(F.interpolate, scale_factor=2, mode='bilinear', align_corners=False)
        skip = self.config.skip_connection
        x0 = act(self.conv0(x))
        x1 = act(self.conv1(x0))
        x2 = act(self.conv2(x1))
        x3 = act(self.conv3(x2))
        x4 = act(self.conv4(up(x3))) + (x2 if skip else 0)
        x5 = act(self.conv5(up(x4))) + (x1 if skip else 0)
        x6 = act(self.conv6(up(x5))) + (x0 if skip else 0)
        return self.conv9(act(self.conv8(act(self.conv7(x6)))))


# ==== VGG19 features for the perceptual loss ====
VGG_FILE = 'vgg19-dcbb9e9d.pth'  # torchvision's vgg19 ImageNet weights
VGG_URL = 'https://download.pytorch.org/models/' + VGG_FILE
VGG_TAPS = (2, 7, 16, 25, 34)  # conv1_2, conv2_2, conv3_4, conv4_4, conv5_4 in torchvision's features


def _vgg_state_dict(weights_path):
    """weights_path, else torch hub's cache, else torch hub's download; one clear error otherwise."""
    if weights_path:
        if not os.path.isfile(weights_path):
            raise FileNotFoundError(f"{weights_path}: VGG19 weights file not found")
        path = weights_path
    else:
        path = os.path.join(torch.hub.get_dir(), 'checkpoints', VGG_FILE)
        if not os.path.isfile(path):
            try:
                return torch.hub.load_state_dict_from_url(VGG_URL, progress=False, weights_only=True)
            except Exception as e:
                raise FileNotFoundError(
                    f"VGG19 weights not found and the download failed ({type(e).__name__}): put "
                    f"torchvision's {VGG_FILE} ({VGG_URL}) at {path} or pass its path, or train "
                    "with --perceptual_weight=0") from None
    return load_torch_file(path, 'VGG19 weights')


class VGGFeatures(nn.Module):
    """Frozen VGG19: x in [0,1] (B,3,H,W) -> [conv1_2, conv2_2, conv3_4, conv4_4, conv5_4] before
    ReLU."""

    def __init__(self, weights_path=''):
        super().__init__()
        layers, c_in = [], 3
        for block, (n, c) in enumerate([(2, 64), (2, 128), (4, 256), (4, 512), (4, 512)]):
            if block:
                layers.append(nn.MaxPool2d(2, 2))
            for _ in range(n):
                layers += [nn.Conv2d(c_in, c, 3, 1, 1), nn.ReLU()]
                c_in = c
        self.features = nn.Sequential(*layers[:VGG_TAPS[-1] + 1])
        sd = {k: t for k, t in _vgg_state_dict(weights_path).items()
              if k.startswith('features.') and int(k.split('.')[1]) <= VGG_TAPS[-1]}
        try:
            self.features.load_state_dict({k[len('features.'):]: t for k, t in sd.items()})
        except RuntimeError as e:
            raise ValueError(f"{weights_path or VGG_FILE}: not torchvision vgg19 weights ({e})") from None
        self.register_buffer('mean', torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer('std', torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1),
                             persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):  # always eval: frozen
        return super().train(False)

    def forward(self, x):
        x, out = (x - self.mean) / self.std, []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in VGG_TAPS:
                out.append(x)
        return out


# ==== python model.py [--bench] [--ref=PATH] [--repeats=N] ====


def bench(ref='', repeats=5):
    """Median seconds, interleaved so that load from other processes hits both implementations
    alike. ref: the official network_swinir.py / basicsr swinir_arch.py, kept outside the repo."""
    torch.manual_seed(0)
    nets = {'ours': SwinIR()}
    if ref:
        sys.path.insert(0, os.path.dirname(os.path.abspath(ref)))
        official = __import__(os.path.splitext(os.path.basename(ref))[0]).SwinIR
        nets['official'] = official(**asdict(nets['ours'].config), drop_path_rate=0.0)  # no drop
        nets['official'].load_state_dict(nets['ours'].state_dict(), strict=False)  # same weights
    x_train, x_infer = torch.rand(2, 3, 64, 64), torch.rand(1, 3, 128, 128)

    def train_step(m):
        m.zero_grad(set_to_none=True)
        m(x_train).square().mean().backward()
    infer = torch.no_grad()(lambda m: m(x_infer))
    tasks = {'fwd+bwd 2x3x64x64': train_step, 'inference 1x3x128x128': infer}
    times = {(n, t): [] for n in nets for t in tasks}
    for r in range(repeats + 1):  # the first round warms up
        for (n, t), ts in times.items():
            t0 = time.perf_counter()
            tasks[t](nets[n])
            if r:
                ts.append(time.perf_counter() - t0)
    print(f"SwinIR seed config, {torch.get_num_threads()} threads, median of {repeats}:")
    for t in tasks:
        med = {n: statistics.median(times[n, t]) for n in nets}
        print(f"  {t:24s} " + '  '.join(f"{n} {s:.3f} s" for n, s in med.items())
              + (f"  speedup {med['official'] / med['ours']:.2f}x" if ref else ''))
    if ref:
        diff = (infer(nets['ours']) - infer(nets['official'])).abs().max()
        print(f"  max abs output difference, same weights: {diff.item():.2e}")


def main(argv):
    # model.py imports nothing of ours, so degrade.configure's conventions for its three settings
    # in a few lines: --key=value, a Python literal or a bare string, unknown keys are an error
    opts = {'bench': False, 'ref': '', 'repeats': 5}
    if '-h' in argv or '--help' in argv:
        print(__doc__.strip() + '\n\nsettings (--key=value):\n' +
              '\n'.join(f"  --{k}={v!r}" for k, v in opts.items()))
        raise SystemExit(0)
    for arg in ['--bench=True' if a == '--bench' else a for a in argv]:
        key, eq, text = arg[2:].partition('=')
        if not (arg.startswith('--') and eq and key in opts):
            raise SystemExit(f"error: unknown argument {arg} (known: --bench, --ref=PATH, "
                             "--repeats=N)")
        try:
            value = text if isinstance(opts[key], str) else ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare word: the type check below names it
        if type(value) is not type(opts[key]) or key == 'repeats' and value < 1:
            raise SystemExit(f"error: --{key} expects {type(opts[key]).__name__} (like "
                             f"{opts[key]!r}), got {text!r}")
        opts[key] = value
    print('config:', opts)
    if opts['ref'] and not os.path.isfile(opts['ref']):
        raise SystemExit(f"error: --ref={opts['ref']}: no such file (the official SwinIR code)")
    for name, net in (('SwinIR', SwinIR()), ('UNetDiscriminatorSN', UNetDiscriminatorSN(
            UNetConfig(num_feat=24)))):
        print(f"{name} {asdict(net.config)}: {sum(p.numel() for p in net.parameters()):,} parameters")
    if opts['bench']:
        bench(opts['ref'], opts['repeats'])


if __name__ == '__main__':
    main(sys.argv[1:])
