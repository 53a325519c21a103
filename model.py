"""
The networks: SwinIR (generator, official parameter names), the Real-ESRGAN U-Net discriminator with
spectral norm, frozen VGG19 features for the perceptual loss, and the checkpoint loader.

    python model.py                                       # parameter counts of the seed networks
    python model.py --bench                               # SwinIR seed: fwd+bwd 2x3x64x64, infer 1x3x128x128
    python model.py --bench --ref=/tmp/ref/network_swinir.py   # ... side by side with the official code
"""
import math
import os
import pickle
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

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
    upsampler: str = 'pixelshuffledirect'  # or 'pixelshuffle' (classical), 'nearest+conv' (real-world)
    resi_connection: str = '1conv'  # or '3conv'


class WindowPlan:
    """Token orders and the shift mask for one padded input size, built once and cached.
    Order s (0 or the shift) lists the tokens window by window of the image rolled by -s, as the
    official cyclic shift does; `idx[a, b]` re-orders a (B, L, C) stream from order a to b
    (None = row-major image order) in one gather. In the shifted order the n_inner windows whose
    mask is all zero come first, so that attention can skip the mask there."""

    def __init__(self, H, W, ws, shift, device):
        nh, nw = H // ws, W // ws
        h = torch.arange(H, device=device).view(nh, 1, ws, 1)
        w = torch.arange(W, device=device).view(1, nw, 1, ws)
        border = (torch.arange(nh, device=device)[:, None] == nh - 1) | (torch.arange(nw, device=device) == nw - 1)
        windows = torch.argsort(border.view(-1).long(), stable=True)  # only the last row/column of windows mixes regions
        self.n_inner = (nh - 1) * (nw - 1)
        self.perm, inv = {}, {}
        for s in {0, shift}:
            src = (((h + s) % H) * W + (w + s) % W).view(nh * nw, ws * ws)  # image index of each token
            self.perm[s] = (src[windows] if s else src).reshape(-1)
            inv[s] = torch.argsort(self.perm[s])
        orders = [None, 0, shift]
        self.idx = {(a, b): (self.perm[b] if a is None else inv[a] if b is None else inv[a][self.perm[b]])
                    for a in orders for b in orders if a != b}
        self.mask = None
        if shift:  # official SW-MSA mask: -100 between tokens from different regions of the rolled image
            def region(x, n):
                return (x >= n - ws).long() + (x >= n - shift).long()
            lab = (region(h, H) * 3 + region(w, W)).expand(nh, nw, ws, ws).reshape(nh * nw, ws * ws)[windows]
            self.mask = ((lab[:, :, None] != lab[:, None, :]).float() * -100.0).unsqueeze(1)  # (nW, 1, N, N)


class WindowAttention(nn.Module):
    def __init__(self, dim, window_size, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        c = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing='ij')).flatten(1)
        d = c[:, :, None] - c[:, None, :] + window_size - 1  # (2, N, N) relative offsets, shifted to >= 0
        self.register_buffer('relative_position_index', d[0] * (2 * window_size - 1) + d[1], persistent=False)
        # q's scale folded into the qkv weights: one tiny op per call instead of a pass over q
        scale = torch.ones(3 * dim)
        scale[:dim] = (dim // num_heads) ** -0.5
        self.register_buffer('qkv_scale', scale, persistent=False)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, skip, mask=None, n_inner=0):
        """skip + proj(attention(x)): x (B*nW, N, C) whole windows, skip (B*nW*N, C). mask: the plan's
        (nW, 1, N, N) shift mask, zero on its first n_inner windows."""
        Bw, N, C = x.shape
        nH, hd = self.num_heads, C // self.num_heads
        w, b, pw = self.qkv.weight * self.qkv_scale[:, None], self.qkv.bias * self.qkv_scale, self.proj.weight
        bias = self.relative_position_bias_table.t()[:, self.relative_position_index]  # (nH, N, N)
        if torch.is_grad_enabled() and _cpu_float32(x) and not torch.compiler.is_compiling():
            qkv = _linear(x.view(-1, C), w, b).view(Bw, N, 3, nH, hd)
            x = _CPUWindowAttention.apply(qkv, bias, mask, n_inner).view(Bw * N, C)  # SDPA's CPU backward: ~1.5x slower
            return _linear(x, pw, self.proj.bias, skip=skip)
        p = -hd % 8
        if p:  # heads zero-padded 13 -> 16 in the weights (no pass over tokens): faster attention, same result
            w, b = F.pad(w.view(3 * nH, hd, C), (0, 0, 0, p)).view(-1, C), F.pad(b.view(3 * nH, hd), (0, p)).view(-1)
            pw = F.pad(pw.view(C, nH, hd), (0, p)).view(C, -1)
        q, k, v = _linear(x.view(-1, C), w, b).view(Bw, N, 3, nH, hd + p).permute(2, 0, 3, 1, 4)  # (B*nW, nH, N, hd+p)
        bias, mask = bias[None], None if mask is None else mask.to(bias.dtype)  # SDPA's fast CPU kernels: 4-D mask
        if mask is None:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0).transpose(1, 2)
        elif Bw == mask.shape[0]:  # one image: no mask on the inner windows
            i = n_inner
            x = torch.cat([
                F.scaled_dot_product_attention(q[:i], k[:i], v[:i], attn_mask=bias, scale=1.0).transpose(1, 2),
                F.scaled_dot_product_attention(q[i:], k[i:], v[i:], attn_mask=bias + mask[i:], scale=1.0).transpose(1, 2)])
        else:  # the mask's last stride must be 1, else SDPA takes its slow math path
            bias = (bias + mask).expand(Bw // mask.shape[0], -1, -1, -1, -1).reshape(Bw, nH, N, N)
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0).transpose(1, 2)
        x = x.reshape(Bw * N, -1)  # (B*nW, N, nH, hd + p) -> token rows
        return _linear(x, pw, self.proj.bias, skip=skip)


class _CPUWindowAttention(torch.autograd.Function):
    """softmax(q k^T + bias [+ mask]) v for float32 CPU training, autograd's numbers, ~1.5x faster than autograd
    or SDPA (whose CPU backward with a bias gradient is the slow math path). One head of CHUNK windows at a time:
    its scores stay in L2 cache from bias to product and back, and q, k, v, grad are read in place, as strided
    matrices of the token rows (no head-major copy). Products whose output would be hd = 13 wide are computed
    transposed (64 wide: ~2x faster with MKL) and written back through a transposed view. The shift mask is added
    on the border windows only: the plan puts the n_inner windows whose mask is zero first."""

    @staticmethod
    def forward(ctx, qkv, bias, mask, n_inner):  # qkv (B*nW, N, 3, nH, hd), bias (nH, N, N), mask None or (nW, 1, N, N)
        Bw, N, _, nH, hd = qkv.shape
        nW = Bw if mask is None else mask.shape[0]  # a chunk never crosses images: its mask is one slice
        ctx.chunks = [(i + w, min(CHUNK, nW - w), 0 if mask is None else w)  # (first window, windows, mask offset)
                      for i in range(0, Bw, nW) for w in range(0, nW, CHUNK)]
        spare = _SPARE.get((nH, Bw, N))
        ctx.P = P = spare.pop() if spare else qkv.new_empty(nH, Bw, N, N)  # probabilities, kept for backward
        out = qkv.new_empty(Bw, N, nH, hd)
        for a, n, w in ctx.chunks:
            i = n if mask is None else min(n, max(0, n_inner - w))  # windows without mask, first in the plan's order
            for h in range(nH):
                q, k, v = qkv[a:a + n, :, :, h].unbind(2)  # (n, N, hd) each
                p = P[h, a:a + n]
                p[:i].copy_(bias[h])
                if i < n:
                    torch.add(bias[h], mask[w + i:w + n, 0], out=p[i:])
                p = p.baddbmm_(q, k.transpose(1, 2))
                p = torch.softmax(p, -1, out=p)
                out[a:a + n, :, h] = torch.bmm(v.transpose(1, 2), p.transpose(1, 2)).transpose(1, 2)  # (p v)^T
        ctx.save_for_backward(qkv)
        return out  # (B*nW, N, nH, hd)

    @staticmethod
    @once_differentiable  # a double backward (create_graph) through it raises instead of going wrong
    def backward(ctx, grad):  # grad (B*nW, N, nH, hd)
        (qkv,), P, ctx.P = ctx.saved_tensors, ctx.P, None
        if P is None:
            raise RuntimeError("_CPUWindowAttention: backward twice through the same graph is not supported")
        dqkv, dbias = torch.empty_like(qkv), qkv.new_zeros(P.shape[0], *P.shape[2:])
        for a, n, _ in ctx.chunks:
            for h in range(P.shape[0]):
                q, k, v = qkv[a:a + n, :, :, h].unbind(2)
                g, p, d = grad[a:a + n, :, h], P[h, a:a + n], dqkv[a:a + n, :, :, h]  # d: (n, N, 3, hd) dq, dk, dv
                d[:, :, 2] = torch.bmm(g.transpose(1, 2), p).transpose(1, 2)
                ds = torch._softmax_backward_data(torch.bmm(g, v.transpose(1, 2)), p, -1, p.dtype)  # d scores
                d[:, :, 0] = torch.bmm(k.transpose(1, 2), ds.transpose(1, 2)).transpose(1, 2)
                d[:, :, 1] = torch.bmm(q.transpose(1, 2), ds).transpose(1, 2)
                dbias[h] += ds.sum(0)
        _SPARE.setdefault(tuple(P.shape[:3]), []).append(P)  # for the next forward: P's memory is not handed back
        return dqkv, dbias, None, None


# Probability buffers whose backward is done, by (nH, B*nW, N), reused by the next forwards: a fresh buffer
# (12 MB a block for 2 64x64 crops) is zeroed by the OS page by page at first touch, costly on a loaded machine.
# They stay allocated (at most one per block and input shape); _SPARE.clear() frees them.
_SPARE = {}
CHUNK = 64  # windows per chunk of _CPUWindowAttention: 64 x 64 x 64 floats = 1 MB of scores per head


def _cpu_float32(x):  # where the CPU-specific paths apply: float32 on the CPU, outside autocast
    return x.device.type == 'cpu' and x.dtype == torch.float32 and not torch.is_autocast_enabled('cpu')


ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, '_linear_pointwise')  # once: compile


def _linear(x, weight, bias, gelu=False, skip=None):
    """[skip +] [gelu] linear(x) on (T, C) rows. CPU float32 goes through oneDNN (per call 2.2x (fwd+bwd) to
    2.5x (fwd) faster than F.linear's MKL GEMM on the AMD dev CPU, for these thin shapes): with autograd as a
    1x1 conv of a channels_last view (no copy), without as one GEMM with GELU / skip fused. Else (or under
    autocast) the plain form."""
    if not (_cpu_float32(x) and ONEDNN):
        y = F.linear(x, weight, bias)
    elif not torch.is_grad_enabled() and not torch.compiler.is_compiling():  # private ops: no fake tensor impl
        if skip is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, skip, weight, bias, 'add')
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, 'gelu' if gelu else 'none', [], 'none')
    else:
        y = F.conv2d(x.view(1, -1, 1, x.shape[-1]).permute(0, 3, 1, 2), weight[:, :, None, None], bias)
        y = y.permute(0, 2, 3, 1).view(-1, weight.shape[0])  # (1, C_out, T, 1) channels_last -> (T, C_out)
    y = F.gelu(y) if gelu else y
    return y if skip is None else skip + y


class SwinTransformerBlock(nn.Module):
    def __init__(self, dim, num_heads, window_size, shift, mlp_ratio):
        super().__init__()
        self.shift, self.window_size = shift, window_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Module()  # official names: mlp.fc1, mlp.fc2
        self.mlp.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.mlp.fc2 = nn.Linear(int(dim * mlp_ratio), dim)

    def forward(self, x, mask, n_inner):  # x (B, L, C), tokens in this block's window order
        B, L, C = x.shape
        x = self.attn(self.norm1(x).view(-1, self.window_size ** 2, C), x.view(-1, C), mask, n_inner)
        h = _linear(self.norm2(x), self.mlp.fc1.weight, self.mlp.fc1.bias, gelu=True)
        return _linear(h, self.mlp.fc2.weight, self.mlp.fc2.bias, skip=x).view(B, L, C)


def _resi_conv(dim, kind):
    if kind == '1conv':
        return nn.Conv2d(dim, dim, 3, 1, 1)
    if kind == '3conv':  # official: fewer parameters
        return nn.Sequential(nn.Conv2d(dim, dim // 4, 3, 1, 1), nn.LeakyReLU(0.2, True),
                             nn.Conv2d(dim // 4, dim // 4, 1, 1, 0), nn.LeakyReLU(0.2, True),
                             nn.Conv2d(dim // 4, dim, 3, 1, 1))
    raise ValueError(f"resi_connection: expected '1conv' or '3conv', got {kind!r}")


class _Reorder(torch.autograd.Function):
    """(B, L, C) tokens from the plan's order a to order b; backward gathers with the inverse permutation
    (~2x faster than index_select's scatter-add backward)."""

    @staticmethod
    def forward(ctx, x, idx, inv):
        ctx.save_for_backward(inv)
        return x.index_select(1, idx)

    @staticmethod
    def backward(ctx, grad):
        return grad.index_select(1, ctx.saved_tensors[0]), None, None


class RSTB(nn.Module):
    """Residual Swin Transformer block: `depth` blocks, a conv, a skip. Official names: the blocks
    live in `residual_group.blocks`."""

    def __init__(self, dim, depth, num_heads, window_size, mlp_ratio, resi_connection):
        super().__init__()
        self.residual_group = nn.Module()
        self.residual_group.blocks = nn.ModuleList(
            SwinTransformerBlock(dim, num_heads, window_size, 0 if i % 2 == 0 else window_size // 2, mlp_ratio)
            for i in range(depth))
        self.conv = _resi_conv(dim, resi_connection)

    def forward(self, x, plan):  # x (B, H, W, C)
        B, H, W, C = x.shape
        y, order = x.reshape(B, H * W, C), None
        for blk in self.residual_group.blocks:
            y, order = _Reorder.apply(y, plan.idx[order, blk.shift], plan.idx[blk.shift, order]), blk.shift
            y = blk(y, plan.mask if blk.shift else None, plan.n_inner)
        y = _Reorder.apply(y, plan.idx[order, None], plan.idx[None, order]).view(B, H, W, C)
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
            self.upsample = nn.Sequential(nn.Conv2d(dim, cfg.upscale ** 2 * out_ch, 3, 1, 1), nn.PixelShuffle(cfg.upscale))
        elif cfg.upsampler in ('pixelshuffle', 'nearest+conv'):
            self.conv_before_upsample = nn.Sequential(nn.Conv2d(dim, num_feat, 3, 1, 1), nn.LeakyReLU(inplace=True))
            if cfg.upsampler == 'pixelshuffle':
                steps = [3] if cfg.upscale == 3 else [2] * (cfg.upscale.bit_length() - 1)
                if 2 ** len(steps) != cfg.upscale != 3:
                    raise ValueError(f"upscale: pixelshuffle supports 2^n and 3, got {cfg.upscale}")
                self.upsample = nn.Sequential(*[m for s in steps for m in (nn.Conv2d(num_feat, s * s * num_feat, 3, 1, 1),
                                                                           nn.PixelShuffle(s))])
            else:
                if cfg.upscale != 4:
                    raise ValueError(f"upscale: nearest+conv supports only 4, got {cfg.upscale}")
                self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
                self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
                self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
            self.conv_last = nn.Conv2d(num_feat, out_ch, 3, 1, 1)
        else:
            raise ValueError(f"upsampler: expected pixelshuffledirect, pixelshuffle or nearest+conv, got {cfg.upsampler!r}")
        self.apply(self._init_weights)
        self._plans = {}

    @staticmethod
    def _init_weights(m):  # official init
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    def plan(self, H, W, device):
        """Cached token orders + shift mask for a padded size (one build per size and device)."""
        key = (H, W, str(device))
        if key not in self._plans:
            ws = self.config.window_size
            self._plans[key] = WindowPlan(H, W, ws, ws // 2, device)
        return self._plans[key]

    def forward_features(self, x):  # (B, C, H, W) channels_last -> same
        plan = self.plan(x.shape[2], x.shape[3], x.device)
        t = self.patch_embed.norm(x.permute(0, 2, 3, 1))  # (B, H, W, C)
        for layer in self.layers:
            t = layer(t, plan)
        return self.norm(t).permute(0, 3, 1, 2)

    def forward(self, x):
        cfg = self.config
        H, W = x.shape[2:]
        ph, pw = -H % cfg.window_size, -W % cfg.window_size
        if ph or pw:  # official: reflect-pad to a window multiple, crop the output
            x = F.pad(x, (0, pw, 0, ph), 'reflect' if ph < H and pw < W else 'replicate')
        x = ((x - self.mean) * cfg.img_range).contiguous(memory_format=torch.channels_last)
        x = self.conv_first(x)
        x = self.conv_after_body(self.forward_features(x)) + x
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


def extract_state_dict(obj):
    """Our checkpoint ('ema', then 'model'; 'model_args'), an official file ('params_ema', then
    'params') or a plain state dict -> (state_dict without 'module.'/'_orig_mod.' prefixes, model_args or None)."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a dict, got {type(obj).__name__}")
    sd = next((obj[k] for k in ('ema', 'model', 'params_ema', 'params') if isinstance(obj.get(k), dict)), obj)
    if not sd or not all(isinstance(t, torch.Tensor) for t in sd.values()):
        raise ValueError("no state dict found (expected a plain state dict or one under 'ema', 'model', "
                         "'params_ema' or 'params')")
    def strip(k):
        return strip(k.split('.', 1)[1]) if k.startswith(('module.', '_orig_mod.')) else k
    args = obj.get('model_args')
    return {strip(k): t for k, t in sd.items()}, (dict(args) if isinstance(args, dict) else None)


def infer_config(sd):
    """The SwinIRConfig that a SwinIR state dict's key shapes describe (img_size, img_range: defaults)."""
    try:
        dim, in_chans = sd['conv_first.weight'].shape[:2]
        depths, heads, i = [], [], 0
        while f'layers.{i}.residual_group.blocks.0.attn.relative_position_bias_table' in sd:
            tables = [t for k, t in sd.items() if k.startswith(f'layers.{i}.residual_group.blocks.')
                      and k.endswith('.attn.relative_position_bias_table')]
            depths.append(len(tables))
            heads.append(tables[0].shape[1])
            i += 1
        ws = (math.isqrt(sd['layers.0.residual_group.blocks.0.attn.relative_position_bias_table'].shape[0]) + 1) // 2
        mlp_ratio = sd['layers.0.residual_group.blocks.0.mlp.fc1.weight'].shape[0] / dim
        resi = '1conv' if 'conv_after_body.weight' in sd else '3conv'
        if 'conv_up1.weight' in sd:
            upsampler, upscale = 'nearest+conv', 4
        elif 'conv_before_upsample.0.weight' in sd:
            ups = [t.shape[0] // t.shape[1] for k, t in sd.items() if k.startswith('upsample.') and k.endswith('weight')]
            upsampler, upscale = 'pixelshuffle', math.prod(math.isqrt(u) for u in ups)
        else:
            upsampler, upscale = 'pixelshuffledirect', math.isqrt(sd['upsample.0.weight'].shape[0] // in_chans)
    except (KeyError, IndexError) as e:
        raise ValueError(f"not a SwinIR state dict (no {e})") from None
    return SwinIRConfig(upscale=upscale, in_chans=int(in_chans), window_size=ws, depths=depths, embed_dim=int(dim),
                        num_heads=heads, mlp_ratio=mlp_ratio, upsampler=upsampler, resi_connection=resi)


def _mismatch(name, sd, expected):
    """One line per problem: missing / unexpected / wrong-shape keys (first few of each) + a config that fits."""
    def few(keys):
        return ', '.join(keys[:5]) + (f', ... ({len(keys)} in all)' if len(keys) > 5 else '')
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f'{k} {tuple(sd[k].shape)} vs {tuple(t.shape)}' for k, t in expected.items()
              if k in sd and sd[k].shape != t.shape]
    lines = [f"{name}: the weights do not fit the SwinIR config"]
    lines += [f"  {what} ({len(ks)}): {few(ks)}" for what, ks in
              (('missing', missing), ('unexpected', unexpected), ('wrong shape file vs model', shapes)) if ks]
    if not (missing or unexpected or shapes):
        return None
    try:
        lines.append(f"  a config that would fit: {asdict(infer_config(sd))}")
    except ValueError as e:
        lines.append(f"  no SwinIR config fits: {e}")
    return '\n'.join(lines)


def load_torch_file(path, what):
    """torch.load(path, weights_only=True) on the CPU; any failure -> ValueError, one line naming path."""
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        # torch's unpickling message is a page of advice about weights_only=False, unsafe and beside the point
        why = '' if isinstance(e, pickle.UnpicklingError) else ': ' + (str(e).strip().splitlines() or [''])[0]
        raise ValueError(f"{path}: cannot read {what} ({type(e).__name__}{why})") from None


def load_generator(path_or_obj, config=None):
    """Checkpoint path or loaded dict -> (SwinIR in eval mode, SwinIRConfig). Config: model_args in the
    file, else `config`, else inferred from the key shapes. Any problem -> ValueError starting with the path."""
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
        cfg = infer_config(sd) if cfg is None else cfg if isinstance(cfg, SwinIRConfig) else SwinIRConfig(**cfg)
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
        for i, (a, b) in enumerate([(8, 4), (4, 2), (2, 1), (1, 1), (1, 1)], 4):  # upsample + extra convs
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
VGG_TAPS = (2, 7, 16, 25, 34)  # conv1_2, conv2_2, conv3_4, conv4_4, conv5_4 in torchvision's `features`


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
                    f"VGG19 weights not found and the download failed ({type(e).__name__}): put torchvision's "
                    f"{VGG_FILE} ({VGG_URL}) at {path} or pass its path, or train with --perceptual_weight=0") from None
    return load_torch_file(path, 'VGG19 weights')


class VGGFeatures(nn.Module):
    """Frozen VGG19: x in [0,1] (B,3,H,W) -> [conv1_2, conv2_2, conv3_4, conv4_4, conv5_4] before ReLU."""

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
        self.register_buffer('mean', torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)
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


# ==== python model.py [--bench [--ref=PATH] [--repeats=N]] ====


def bench(ref='', repeats=5):
    """Median seconds, interleaved so that load from other processes hits both implementations alike.
    ref: the official network_swinir.py / basicsr swinir_arch.py, kept outside the repo."""
    torch.manual_seed(0)
    nets = {'ours': SwinIR()}
    if ref:
        sys.path.insert(0, os.path.dirname(os.path.abspath(ref)))
        official = __import__(os.path.splitext(os.path.basename(ref))[0]).SwinIR
        nets['official'] = official(**asdict(nets['ours'].config), drop_path_rate=0.0)  # no stochastic depth
        nets['official'].load_state_dict(nets['ours'].state_dict(), strict=False)  # same weights
    x_train, x_infer = torch.rand(2, 3, 64, 64), torch.rand(1, 3, 128, 128)

    def train_step(m):
        m.zero_grad(set_to_none=True)
        m(x_train).square().mean().backward()
    tasks = {'fwd+bwd 2x3x64x64': train_step, 'inference 1x3x128x128': torch.no_grad()(lambda m: m(x_infer))}
    times = {(n, t): [] for n in nets for t in tasks}
    for r in range(repeats + 1):  # the first round warms up
        for (n, t), ts in times.items():
            t0 = time.perf_counter()
            tasks[t](nets[n])
            if r:
                ts.append(time.perf_counter() - t0)
    print(f"SwinIR seed config, {torch.get_num_threads()} threads, median of {repeats}:")
    for t, fn in tasks.items():
        med = {n: statistics.median(times[n, t]) for n in nets}
        print(f"  {t:24s} " + '  '.join(f"{n} {s:.3f} s" for n, s in med.items())
              + (f"  speedup {med['official'] / med['ours']:.2f}x" if ref else ''))
    if ref:
        diff = (tasks['inference 1x3x128x128'](nets['ours']) - tasks['inference 1x3x128x128'](nets['official'])).abs().max()
        print(f"  max abs output difference, same weights: {diff.item():.2e}")


if __name__ == '__main__':
    opts = dict(a[2:].split('=', 1) if '=' in a else (a[2:], '1') for a in sys.argv[1:] if a.startswith('--'))
    bad = set(opts) - {'bench', 'ref', 'repeats'} or [a for a in sys.argv[1:] if not a.startswith('--')]
    if bad or not opts.get('repeats', '1').isdigit() or not os.path.isfile(opts.get('ref', __file__)):
        sys.exit("error: usage: python model.py [--bench [--ref=OFFICIAL_SWINIR.py] [--repeats=N]]; "
                 f"got {' '.join(sys.argv[1:])}")
    for name, net in (('SwinIR', SwinIR()), ('UNetDiscriminatorSN', UNetDiscriminatorSN(UNetConfig(num_feat=24)))):
        print(f"{name} {asdict(net.config)}: {sum(p.numel() for p in net.parameters()):,} parameters")
    if 'bench' in opts:
        bench(opts.get('ref', ''), int(opts.get('repeats', 5)))
