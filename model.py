"""
The networks: SwinIR (generator, official parameter names), the Real-ESRGAN U-Net discriminator with
spectral norm, frozen VGG19 features for the perceptual loss, and the checkpoint loader.

    python model.py                          # parameter counts of the seed networks
    python model.py --bench                  # SwinIR seed: infer 1x3x128x128, fwd+bwd 2x3x64x64
    python model.py --bench --ref=/tmp/ref/network_swinir.py  # side by side with the official code
"""
import math
import os
import pickle
import statistics
import sys
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F


# ==== SwinIR ====
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
    upsampler: str = 'pixelshuffledirect'  # or 'pixelshuffle', 'nearest+conv' (real-world)
    resi_connection: str = '1conv'  # or '3conv'

    def __post_init__(self):  # a flag or a file's model_args out of range: ValueError naming it
        pos = lambda v, t=int: type(v) in (int, t) and v > 0  # noqa: E731
        ints = lambda v: type(v) in (list, tuple) and len(v) > 0 and all(map(pos, v))  # noqa: E731
        rules = [(f.name, lambda v, t=f.type: pos(v, t), 'a number > 0' if f.type is float else
                  'an int > 0') for f in fields(self) if f.type in (int, float)] + [
            ('depths', ints, 'a list of ints > 0'),
            ('num_heads', lambda v: ints(v) and len(v) == len(self.depths) and not any(
                self.embed_dim % h for h in v), 'ints > 0, one per depth, each dividing embed_dim'),
            ('upsampler', lambda v, s=self.upscale: v == 'pixelshuffledirect' or
             v == 'nearest+conv' and s == 4 or v == 'pixelshuffle' and (s == 3 or s & (s - 1) == 0),
             f"pixelshuffledirect, pixelshuffle (x2^n, x3), nearest+conv (x4) for x{self.upscale}"),
            ('resi_connection', lambda v: v in ('1conv', '3conv'), "'1conv' or '3conv'")]
        for key, valid, expected in rules:  # in order: each may assume the ones before it hold
            if not valid(getattr(self, key)):
                raise ValueError(f"{key}={getattr(self, key)!r}: expected {expected}")


class WindowPlan:
    """Token orders and shift mask of B padded HxW images. Order s (0 or the shift) lists tokens
    window-major, (window, image, token), of the images rolled by -s (official cyclic shift); idx[a,
    b] re-orders a stream from order a to b (None: the images') in one gather. Windows with no shift
    mask come first; mask (M, 1, N, N) bool is the last M's (B x last row, column): True at -100."""
    def __init__(self, B, H, W, ws, shift, device):
        nh, nw, L = H // ws, W // ws, H * W
        h = torch.arange(H, device=device).view(nh, 1, ws, 1)
        w = torch.arange(W, device=device).view(1, nw, 1, ws)
        border = (h[:, :, 0, 0] == H - ws) | (w[:, :, 0, 0] == W - ws)  # (nh, nw) windows
        windows = torch.argsort(border.view(-1).long(), stable=True)  # border windows last
        perm = {None: torch.arange(B * L, device=device)}  # None: the image's own order
        for s in {0, shift}:
            src = (((h + s) % H) * W + (w + s) % W).view(nh * nw, ws * ws)  # image index of a token
            perm[s] = (src[windows, None] + L * torch.arange(B, device=device)[:, None]).view(-1)
        inv = {s: torch.argsort(p) for s, p in perm.items()}
        self.idx = {(a, b): inv[a][perm[b]] for a in perm for b in perm if a != b}
        # region labels of the official mask: the rolled image cut at -ws and -shift on each axis
        lab = 3 * (h >= H - ws) + 3 * (h >= H - shift) + (w >= W - ws) + (w >= W - shift)
        lab = lab.expand(nh, nw, ws, ws).reshape(nh * nw, -1)[windows[(nh - 1) * (nw - 1):]]
        mask = lab[:, None, :, None] != lab[:, None, None, :]  # (border windows, 1, N, N)
        self.mask = mask.expand(-1, B, -1, -1).reshape(-1, 1, ws * ws, ws * ws)  # (M, 1, N, N)


class WindowAttention(nn.Module):
    def __init__(self, dim, window_size, num_heads):
        super().__init__()
        self.num_heads = num_heads
        n = 2 * window_size - 1
        self.relative_position_bias_table = nn.Parameter(torch.zeros(n * n, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        t = torch.arange(window_size ** 2)  # token t of a window: row t // ws, column t % ws
        d = [(u[:, None] - u + window_size - 1) for u in (t // window_size, t % window_size)]
        self.register_buffer('relative_position_index', (d[0] * n + d[1])[None], persistent=False)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, plan=None):
        """x (B*nW*N, C): tokens image by image, window by window; plan: shifted blocks' mask."""
        (T, C), N, nH = x.shape, self.relative_position_index.shape[-1], self.num_heads
        hd, pad = C // nH, -(C // nH) % 8
        qkv = self.qkv(x).view(-1, N, 3, nH, hd).permute(2, 0, 3, 1, 4)  # (3, B*nW, nH, N, hd)
        if pad:  # fused kernels want a head size that is a multiple of 8 (GPU: required; 13 -> 16
            qkv = F.pad(qkv, (0, pad))  # in the seed): zeros change no score; q, k, v contiguous
        bias = self.relative_position_bias_table[self.relative_position_index].permute(0, 3, 1, 2)
        bias = bias.to(qkv.dtype, memory_format=torch.contiguous_format)  # autocast's; stride 1
        attend = partial(F.scaled_dot_product_attention, scale=hd ** -0.5)
        if plan is None:
            y = attend(*qkv, attn_mask=bias)
        else:  # the last M windows get the shift mask too, the others need none
            i = qkv.shape[1] - plan.mask.shape[0]
            y = attend(*qkv[:, i:], attn_mask=torch.add(bias, plan.mask, alpha=-100))
            y = torch.cat([attend(*qkv[:, :i], attn_mask=bias), y]) if i else y
        return self.proj(y[..., :hd].transpose(1, 2).reshape(T, C))  # (nW*B, N, nH, hd) -> tokens


class SwinTransformerBlock(nn.Module):
    def __init__(self, num_heads, shift, cfg):
        super().__init__()
        dim, hidden = cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio)
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, cfg.window_size, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(dim, hidden), act=nn.GELU(),
                                             fc2=nn.Linear(hidden, dim)))

    def forward(self, x, plan):  # x (B*H*W, C): tokens in this block's window order
        x = x + self.attn(self.norm1(x), plan)
        return x + self.mlp(self.norm2(x))


def _resi_conv(dim, kind):
    if kind == '1conv':
        return nn.Conv2d(dim, dim, 3, 1, 1)
    return nn.Sequential(nn.Conv2d(dim, dim // 4, 3, 1, 1), nn.LeakyReLU(0.2, True),  # '3conv'
                         nn.Conv2d(dim // 4, dim // 4, 1, 1, 0), nn.LeakyReLU(0.2, True),
                         nn.Conv2d(dim // 4, dim, 3, 1, 1))  # official: fewer parameters


class RSTB(nn.Module):
    """Residual Swin Transformer block: `depth` blocks (residual_group.blocks), a conv, a skip."""
    def __init__(self, depth, num_heads, cfg):
        super().__init__()
        shifts = [i % 2 * (cfg.window_size // 2) for i in range(depth)]  # every other one shifted
        self.residual_group = nn.ModuleDict({'blocks': nn.ModuleList(
            SwinTransformerBlock(num_heads, s, cfg) for s in shifts)})
        self.conv = _resi_conv(cfg.embed_dim, cfg.resi_connection)

    def forward(self, x, plan):  # x (B, H, W, C)
        y, order = x.view(-1, x.shape[-1]), None  # (B*H*W, C) tokens in image order
        for blk in self.residual_group.blocks:
            y, order = y.index_select(0, plan.idx[order, blk.shift]), blk.shift
            y = blk(y, plan if blk.shift else None)
        y = y.index_select(0, plan.idx[order, None]).view(x.shape)
        return self.conv(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1) + x


class SwinIR(nn.Module):
    PLANS = 4  # window plans kept: the most recently used input sizes

    def __init__(self, config=None):
        super().__init__()
        cfg = self.config = config or SwinIRConfig()
        dim, out_ch, num_feat = cfg.embed_dim, cfg.in_chans, 64
        mean = (0.4488, 0.4371, 0.4040) if cfg.in_chans == 3 else (0.0,)
        self.register_buffer('mean', torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.conv_first = nn.Conv2d(cfg.in_chans, dim, 3, 1, 1)
        self.patch_embed = nn.ModuleDict({'norm': nn.LayerNorm(dim)})  # official names
        self.layers = nn.ModuleList(RSTB(d, h, cfg) for d, h in zip(cfg.depths, cfg.num_heads))
        self.norm = nn.LayerNorm(dim)
        self.conv_after_body = _resi_conv(dim, cfg.resi_connection)
        steps = [3] if cfg.upscale == 3 else [2] * (cfg.upscale.bit_length() - 1)  # pixelshuffle
        if cfg.upsampler == 'pixelshuffledirect':
            self.upsample = nn.Sequential(nn.Conv2d(dim, cfg.upscale ** 2 * out_ch, 3, 1, 1),
                                          nn.PixelShuffle(cfg.upscale))
        else:
            self.conv_before_upsample = nn.Sequential(nn.Conv2d(dim, num_feat, 3, 1, 1),
                                                      nn.LeakyReLU(inplace=True))
            if cfg.upsampler == 'pixelshuffle':
                self.upsample = nn.Sequential(*[m for s in steps for m in (
                    nn.Conv2d(num_feat, s * s * num_feat, 3, 1, 1), nn.PixelShuffle(s))])
            else:
                self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
                self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
                self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
            self.conv_last = nn.Conv2d(num_feat, out_ch, 3, 1, 1)
        for m in self.modules():  # official init
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self._plans = {}  # (B, H, W, device) -> WindowPlan, the most recently used last

    @torch.compiler.disable  # cached plans, built and looked up eagerly: no guard when compiled
    def plan(self, B, H, W, device):
        key, ws = (B, H, W, str(device)), self.config.window_size
        plan = self._plans.pop(key, None) or WindowPlan(B, H, W, ws, ws // 2, device)
        self._plans[key] = plan  # the most recent last
        if len(self._plans) > self.PLANS:
            del self._plans[next(iter(self._plans))]
        return plan

    def forward(self, x):
        (B, _, H, W), cfg = x.shape, self.config
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
TABLE0 = 'layers.0.residual_group.blocks.0.attn.relative_position_bias_table'


def extract_state_dict(obj):
    """Our checkpoint ('ema', then 'model'; 'model_args'), an official file ('params_ema', then
    'params') or a plain state dict -> (state dict minus module./_orig_mod., model_args or None)."""
    sd = isinstance(obj, dict) and next((obj[k] for k in ('ema', 'model', 'params_ema', 'params')
                                         if isinstance(obj.get(k), dict)), obj)
    if not sd or not all(isinstance(t, torch.Tensor) for t in sd.values()):
        raise ValueError("no state dict found (expected a plain state dict or one under 'ema', "
                         "'model', 'params_ema' or 'params')")
    def strip(k):
        return strip(k.split('.', 1)[1]) if k.startswith(('module.', '_orig_mod.')) else k
    args = obj.get('model_args')
    return {strip(k): t for k, t in sd.items()}, (dict(args) if isinstance(args, dict) else None)


def infer_config(sd):
    """The SwinIRConfig that a state dict's key shapes describe (img_size, img_range: defaults)."""
    try:
        dim, in_chans = sd['conv_first.weight'].shape[:2]
        layer = [k.split('.')[1] for k in sd if k.endswith('.attn.relative_position_bias_table')]
        depths = [layer.count(str(i)) for i in range(len(set(layer)))]  # tables per layer
        heads = [sd[TABLE0.replace('layers.0', f'layers.{i}')].shape[1] for i in range(len(depths))]
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
            upscale = math.isqrt(len(sd['upsample.0.weight']) // in_chans)
    except (KeyError, IndexError) as e:
        raise ValueError(f"not a SwinIR state dict (no {e})") from None
    return SwinIRConfig(upscale=upscale, in_chans=int(in_chans), window_size=ws, depths=depths,
                        embed_dim=int(dim), num_heads=heads, mlp_ratio=mlp_ratio,
                        upsampler=upsampler, resi_connection=resi)


def _check_fit(name, sd, expected):
    """ValueError, a line per problem: missing, unexpected, wrong-shape keys; a config to fit."""
    missing, unexpected = [k for k in expected if k not in sd], [k for k in sd if k not in expected]
    shapes = [f'{k} {tuple(sd[k].shape)} vs {tuple(t.shape)}' for k, t in expected.items()
              if k in sd and sd[k].shape != t.shape]
    found = ('missing', missing), ('unexpected', unexpected), ('wrong shape file vs model', shapes)
    lines = [f"  {what} ({len(ks)}): {', '.join(ks[:5])}{', ...' if len(ks) > 5 else ''}"
             for what, ks in found if ks]
    if not lines:
        return
    try:
        lines.append(f"  a config that would fit: {asdict(infer_config(sd))}")
    except ValueError as e:
        lines.append(f"  no SwinIR config fits: {e}")
    raise ValueError('\n'.join([f"{name}: the weights do not fit the SwinIR config", *lines]))


def load_torch_file(path, what):
    """torch.load(path, weights_only=True) on the CPU; any failure -> ValueError, one line."""
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        # torch's unpickling message is a page of advice about weights_only=False, beside the point
        why = '' if isinstance(e, pickle.UnpicklingError) else ': ' + str(e).strip().split('\n')[0]
        raise ValueError(f"{path}: cannot read {what} ({type(e).__name__}{why})") from None


def load_generator(ckpt):
    """Checkpoint path or loaded dict -> (SwinIR in eval mode, SwinIRConfig). Config: model_args in
    the file, else inferred from the key shapes. Any problem: ValueError, the path first."""
    name = ckpt if isinstance(ckpt, str) else '<checkpoint>'
    obj = load_torch_file(name, 'a SwinIR checkpoint') if isinstance(ckpt, str) else ckpt
    try:  # TypeError: an unknown model_args key; RuntimeError: a model too big to build
        sd, args = extract_state_dict(obj)
        cfg = SwinIRConfig(**args) if args is not None else infer_config(sd)
        model = SwinIR(cfg)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{name}: cannot read a SwinIR checkpoint ({e})") from None
    sd = {k: t for k, t in sd.items() if not k.endswith(('relative_position_index', 'attn_mask'))}
    _check_fit(name, sd, model.state_dict())
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
        x0 = act(self.conv0(x))
        x1 = act(self.conv1(x0))
        x2 = act(self.conv2(x1))
        x = act(self.conv3(x2))
        for conv, skip in ((self.conv4, x2), (self.conv5, x1), (self.conv6, x0)):  # back up
            x = act(conv(up(x))) + (skip if self.config.skip_connection else 0)
        return self.conv9(act(self.conv8(act(self.conv7(x)))))


# ==== VGG19 features for the perceptual loss ====
VGG_FILE = 'vgg19-dcbb9e9d.pth'  # torchvision's vgg19 ImageNet weights
VGG_URL = 'https://download.pytorch.org/models/' + VGG_FILE
VGG_TAPS = (2, 7, 16, 25, 34)  # conv1_2, conv2_2, conv3_4, conv4_4, conv5_4 in vgg19's features


def _vgg_state_dict(weights_path):
    """weights_path, else torch hub's cache, else its download; one clear error otherwise."""
    path = weights_path or os.path.join(torch.hub.get_dir(), 'checkpoints', VGG_FILE)
    if weights_path and not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: VGG19 weights file not found")
    if not os.path.isfile(path):
        try:
            return torch.hub.load_state_dict_from_url(VGG_URL, progress=False, weights_only=True)
        except Exception as e:
            raise FileNotFoundError(f"VGG19 weights not found ({type(e).__name__} downloading): "
                                    f"put torchvision's {VGG_FILE} ({VGG_URL}) at {path} or pass "
                                    "its path, or train with --perceptual_weight=0") from None
    return load_torch_file(path, 'VGG19 weights')


class VGGFeatures(nn.Module):
    """Frozen VGG19: x in [0,1] (B,3,H,W) -> [conv1_2, ..., conv5_4] (VGG_TAPS), before ReLU."""
    def __init__(self, weights_path=''):
        super().__init__()
        layers, c_in = [], 3
        for c in [64, 64, 0, 128, 128, 0] + [256] * 4 + [0] + [512] * 4 + [0] + [512] * 4:
            layers += [nn.Conv2d(c_in, c, 3, 1, 1), nn.ReLU()] if c else [nn.MaxPool2d(2, 2)]  # 0
            c_in = c or c_in
        self.features = nn.Sequential(*layers[:VGG_TAPS[-1] + 1])
        sd = {k: t for k, t in _vgg_state_dict(weights_path).items()
              if k.startswith('features.') and int(k.split('.')[1]) <= VGG_TAPS[-1]}
        try:
            self.features.load_state_dict({k[len('features.'):]: t for k, t in sd.items()})
        except RuntimeError as e:
            raise ValueError(f"{weights_path or VGG_FILE}: not torchvision vgg19 ({e})") from None
        for name, v in (('mean', [0.485, 0.456, 0.406]), ('std', [0.229, 0.224, 0.225])):
            self.register_buffer(name, torch.tensor(v).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

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
bench = False  # time SwinIR's seed config: inference 1x3x128x128, fwd+bwd 2x3x64x64, inference
ref = ''  # the official network_swinir.py (basicsr's swinir_arch.py): timed side by side
repeats = 5  # timed runs per task, the median reported


def run_bench():
    """Median seconds: ours, and the official code when ref names its network_swinir.py."""
    torch.manual_seed(0)
    nets = {'ours': SwinIR()}
    if ref:
        sys.path.insert(0, os.path.dirname(os.path.abspath(ref)))
        official = __import__(os.path.splitext(os.path.basename(ref))[0]).SwinIR
        nets['official'] = official(**asdict(nets['ours'].config), drop_path_rate=0.0)  # no drop
        nets['official'].load_state_dict(nets['ours'].state_dict(), strict=False)  # same weights
    x_train, x_infer = torch.rand(2, 3, 64, 64), torch.rand(1, 3, 128, 128)
    infer = torch.no_grad()(lambda m: m(x_infer))
    # inference first, in the state of sample.py's process: after a backward the heap keeps its
    # training peak, and first touches of fresh memory (page faults) drop out of the timing
    tasks = {'inference 1x3x128x128': infer,
             'fwd+bwd 2x3x64x64': lambda m: m(x_train).square().mean().backward(),
             'inference after fwd+bwd': infer}
    print(f"SwinIR seed config, {torch.get_num_threads()} threads, median of {repeats}:")
    for t, task in tasks.items():
        times = {n: [] for n in nets}
        for _ in range(repeats + 1):  # interleaved: outside load hits all alike; 1st: warm-up
            for n, ts in times.items():
                t0 = time.perf_counter()
                task(nets[n])
                ts.append(time.perf_counter() - t0)
        med = {n: statistics.median(ts[1:]) for n, ts in times.items()}
        print(f"  {t:24s} " + '  '.join(f"{n} {s:.3f} s" for n, s in med.items())
              + (f"  speedup {med['official'] / med['ours']:.2f}x" if ref else ''))
    if ref:
        diff = (infer(nets['ours']) - infer(nets['official'])).abs().max()
        print(f"  max abs output difference, same weights: {diff.item():.2e}")


if __name__ == '__main__':
    from degrade import configure  # the scripts' one parser; `import model` imports nothing of ours
    args, config = configure(globals())
    if args:
        raise SystemExit(f"error: {args[0]}: model.py takes --key=value settings only (--help)")
    if repeats < 1 or ref and not os.path.isfile(ref):
        bad = f"--repeats={repeats}: expected N >= 1" if repeats < 1 else f"--ref={ref}: not a file"
        raise SystemExit(f"error: {bad} (--ref: the official network_swinir.py)")
    print('config:', config)
    for net in (SwinIR(), UNetDiscriminatorSN(UNetConfig(num_feat=24))):
        n = sum(p.numel() for p in net.parameters())
        print(f"{type(net).__name__} {asdict(net.config)}: {n:,} parameters")
    if bench:
        run_bench()
