"""
The UNet that predicts the noise (or v, or x0) from a noisy image x_t and its timestep t.

conv in -> DownBlock per level -> neck -> mirrored UpBlocks -> GroupNorm, SiLU, conv out.
Each level halves the resolution, except the bottom one; every UpBlock concatenates the
output of its DownBlock (the skip connection). The timestep, and the class label when the
model is conditional, enter every ResidualBlock through one embedding vector.
HoUNet wires the same blocks as Ho et al. 2020 did (checkpoint.from_pretrained loads their
published networks, google/ddpm-*, into it).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class UNetConfig:
    in_channels: int = 3
    channels: tuple = (64, 128, 256, 256)  # width per level; the resolution halves between levels
    attention: tuple = (False, False, True, True)  # self-attention at this level?
    num_res: int = 2  # residual blocks per level, on the way down and on the way up
    neck_length: int = 2  # residual blocks between the bottom DownBlock and UpBlock
    time_emb_dim: int = 64  # sinusoidal embedding size; the MLP widens it 4x
    dropout: float = 0.0
    num_classes: int = 0  # 0 = unconditional; else labels 0..num_classes-1 (+1 "no label")
    layout: str = "ours"  # ours (UNet) | ho (HoUNet: Ho et al.'s wiring of the same blocks)

    def __post_init__(self):
        self.channels, self.attention = tuple(self.channels), tuple(bool(a) for a in self.attention)
        if len(self.channels) != len(self.attention):
            raise ValueError(f"channels {self.channels} and attention {self.attention} must have one entry per level")
        if self.layout not in ("ours", "ho"):
            raise ValueError(f"unknown layout {self.layout!r}: use ours or ho")
        for c, attention in zip(self.channels, self.attention):
            if c < 4 or c % 4 or c // 4 > 32 and c % 32:
                raise ValueError(f"channel width {c} must be a multiple of 4 (of 32 above 128)")
            if attention and self.layout == "ours" and c % attention_heads(c):
                raise ValueError(f"channel width {c} does not split into {attention_heads(c)} attention "
                                 "heads: use a multiple of 64 at levels with attention")
        # an UpBlock joins the level below with the skip; Ho's blocks join any two widths
        joined = [(self.channels[min(i + 1, len(self.channels) - 1)], c) for i, c in enumerate(self.channels)]
        for a, b in [(a, b) for a in self.channels for b in self.channels] if self.layout == "ho" else joined:
            if (a + b) % norm_groups(a + b):
                raise ValueError(f"channel widths {a} and {b} join into {a + b} channels, which "
                                 f"GroupNorm's {norm_groups(a + b)} groups do not divide: above 128, "
                                 "joined widths must be multiples of 32")
        if self.num_res < 1 or self.neck_length < 0:
            raise ValueError(f"num_res must be at least 1 and neck_length at least 0, "
                             f"not {self.num_res} and {self.neck_length}")
        if self.time_emb_dim < 2 or self.time_emb_dim % 2:
            raise ValueError(f"time_emb_dim must be even and at least 2, not {self.time_emb_dim}")


def norm_groups(channels):
    return min(32, channels // 4)  # 32 from 128 channels up (as in Ho et al.), 4 channels each below


def attention_heads(channels):
    return max(1, channels // 64)  # of 64 channels each, as in Dhariwal & Nichol 2021


def Norm(channels):
    return nn.GroupNorm(norm_groups(channels), channels)


def norm_silu(norm, x):
    """SiLU(norm(x)). Without autograd (sampling) the SiLU overwrites the norm's output, which
    must be a new tensor (GroupNorm's is): one tensor fewer per call, 4-8% faster forwards for
    small models on the CPU. With autograd an in-place SiLU would only add a copy of its input."""
    return F.silu(norm(x), inplace=not torch.is_grad_enabled())


def timestep_embedding(t, dim, shift=0):
    """Sinusoidal embedding of integer timesteps (Vaswani et al. 2017); Ho et al.'s code spaces
    the frequencies over half - 1 (shift 1)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / (half - shift))
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class ResidualBlock(nn.Module):
    def __init__(self, in_ch, out_ch, emb_dim, dropout):
        super().__init__()
        self.norm1 = Norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2 = Norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity (Ho et al.)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, emb):  # emb: the SiLU'd time (+ label) embedding, (B, emb_dim)
        # the adds go into the convs' outputs, which backward does not need: no new tensor
        # for either (2-4% faster training steps on the CPU)
        h = self.conv1(norm_silu(self.norm1, x)).add_(self.emb(emb)[:, :, None, None])
        h = self.conv2(self.dropout(norm_silu(self.norm2, h)))
        return h.add_(self.skip(x))


class Attention(nn.Module):
    """Multi-head self-attention over all pixels, with a residual connection."""

    def __init__(self, channels, heads=None):
        super().__init__()
        self.heads = heads or attention_heads(channels)
        self.norm = Norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)

    def forward(self, x):
        B, C, H, W = x.shape
        # pixels as tokens; with channels_last memory both reshapes are views, not copies,
        # each head's features are contiguous as the fused attention kernels want, and the
        # backward stacks the q, k, v gradients straight into the qkv layout
        qkv = self.qkv(self.norm(x)).permute(0, 2, 3, 1).reshape(B, H * W, 3, self.heads, C // self.heads)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # each (B, heads, H*W, C // heads)
        h = F.scaled_dot_product_attention(q, k, v)
        return self.out(h.transpose(1, 2).reshape(B, H, W, C).permute(0, 3, 1, 2)).add_(x)


class Level(nn.Module):
    """ResidualBlocks to one width, from each of the widths `ins`, each followed by attention if
    asked, and a resampling conv if given (HoUNet's)."""

    def __init__(self, ins, out_ch, emb_dim, attention, dropout, heads=None, resample=None):
        super().__init__()
        self.res = nn.ModuleList(ResidualBlock(in_ch, out_ch, emb_dim, dropout) for in_ch in ins)
        self.attn = nn.ModuleList(Attention(out_ch, heads) if attention else nn.Identity() for _ in ins)
        self.resample = resample

    def forward(self, x, emb):
        for res, attn in zip(self.res, self.attn):
            x = attn(res(x, emb))
        return x


class DownBlock(Level):
    def __init__(self, in_ch, out_ch, emb_dim, num_res, attention, dropout, downsample):
        super().__init__([in_ch] + [out_ch] * (num_res - 1), out_ch, emb_dim, attention, dropout)
        self.down = nn.Conv2d(out_ch, out_ch, 3, stride=2, padding=1) if downsample else nn.Identity()


class UpBlock(Level):
    def __init__(self, in_ch, skip_ch, out_ch, emb_dim, num_res, attention, dropout, upsample):
        super().__init__([in_ch + skip_ch] + [out_ch] * (num_res - 1), out_ch, emb_dim, attention, dropout)
        self.upsample = upsample


class UNet(nn.Module):
    freq_shift, norm_eps = 0, 1e-5  # the timestep embedding's and GroupNorm's (torch's default)

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        emb_dim = 4 * c.time_emb_dim
        self.time_mlp = nn.Sequential(nn.Linear(c.time_emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # index num_classes is "no label": unconditional samples, classifier-free guidance
        self.label_emb = nn.Embedding(c.num_classes + 1, emb_dim) if c.num_classes else None
        self.conv_in = nn.Conv2d(c.in_channels, c.channels[0], 3, padding=1)
        self.build(c, emb_dim)
        self.norm_out = Norm(c.channels[0])
        self.conv_out = nn.Conv2d(c.channels[0], c.in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        for norm in (m for m in self.modules() if isinstance(m, nn.GroupNorm)):
            norm.eps = self.norm_eps
        # channels_last (NHWC) memory: faster convolutions (oneDNN on CPU, tensor cores on
        # GPU), and attention reads its tokens without a copy
        self.to(memory_format=torch.channels_last)

    def build(self, c, emb_dim):
        levels = len(c.channels)
        widths = (c.channels[0],) + c.channels
        self.downs = nn.ModuleList(
            DownBlock(widths[i], widths[i + 1], emb_dim, c.num_res, c.attention[i], c.dropout,
                      downsample=i < levels - 1) for i in range(levels))
        self.neck = nn.ModuleList(ResidualBlock(c.channels[-1], c.channels[-1], emb_dim, c.dropout)
                                  for _ in range(c.neck_length))
        self.ups = nn.ModuleList(
            UpBlock(c.channels[min(i + 1, levels - 1)], c.channels[i], c.channels[i], emb_dim,
                    c.num_res, c.attention[i], c.dropout, upsample=i < levels - 1)
            for i in reversed(range(levels)))

    def forward(self, x, t, y=None):
        """x: (B, C, H, W) noisy images; t: (B,) timesteps 0..T-1; y: (B,) labels or None."""
        emb = self.time_mlp(timestep_embedding(t, self.config.time_emb_dim, self.freq_shift))
        if self.label_emb is not None:
            if y is None:
                y = torch.full_like(t, self.config.num_classes)
            emb = emb + self.label_emb(y)
        emb = F.silu(emb)  # every block's projection starts with SiLU: do it once here
        x = self.conv_in(x.contiguous(memory_format=torch.channels_last))
        return self.conv_out(norm_silu(self.norm_out, self.body(x, emb)))

    def body(self, x, emb):
        skips = []
        for level in self.downs:  # its output, before the downsampling, is the skip of its UpBlock
            skips.append(level(x, emb))
            x = level.down(skips[-1])
        for res in self.neck:
            x = res(x, emb)
        for level in self.ups:
            if level.upsample:
                x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
                if x.requires_grad:  # its gradient, a channel slice of cat's, made dense: 5x faster backward
                    x.register_hook(lambda grad: grad.contiguous(memory_format=torch.channels_last))
            x = level(torch.cat([x, skips.pop()], dim=1), emb)
        return x


class HoUNet(UNet):
    """Ho et al. 2020's UNet (their code's, and diffusers' UNet2DModel for google/ddpm-*): the
    same blocks, wired otherwise. Every block on the way down (conv_in, each residual block,
    each downsampling) leaves a skip, and each of the num_res + 1 residual blocks per level on
    the way up takes one; the middle is residual block, attention, residual block. One
    attention head, GroupNorm eps 1e-6, and no neck_length."""
    freq_shift, norm_eps = 1, 1e-6

    def build(self, c, emb_dim):
        last = len(c.channels) - 1
        skips, self.downs, self.ups = [c.channels[0]], nn.ModuleList(), nn.ModuleList()  # skips: their widths
        for i, width in enumerate(c.channels):
            self.downs.append(Level([skips[-1]] + [width] * (c.num_res - 1), width, emb_dim, c.attention[i],
                                    c.dropout, 1, nn.Conv2d(width, width, 3, stride=2) if i < last else None))
            skips += [width] * (c.num_res + (i < last))
        width = c.channels[-1]
        self.mid = nn.ModuleList([ResidualBlock(width, width, emb_dim, c.dropout), Attention(width, 1),
                                  ResidualBlock(width, width, emb_dim, c.dropout)])
        for i in reversed(range(last + 1)):
            ins = [c.channels[min(i + 1, last)] + skips.pop()] + [c.channels[i] + skips.pop() for _ in range(c.num_res)]
            self.ups.append(Level(ins, c.channels[i], emb_dim, c.attention[i], c.dropout, 1,
                                  nn.Conv2d(c.channels[i], c.channels[i], 3, padding=1) if i > 0 else None))

    def body(self, x, emb):
        skips = [x]
        for level in self.downs:
            for res, attn in zip(level.res, level.attn):
                x = attn(res(x, emb))
                skips.append(x)
            if level.resample is not None:  # a stride-2 conv, the image padded right and bottom only
                x = level.resample(F.pad(x, (0, 1, 0, 1)))
                skips.append(x)
        x = self.mid[2](self.mid[1](self.mid[0](x, emb)), emb)
        for level in self.ups:
            for res, attn in zip(level.res, level.attn):
                x = attn(res(torch.cat([x, skips.pop()], dim=1), emb))
            if level.resample is not None:  # nearest-neighbour upsampling, then a 3x3 conv
                x = level.resample(F.interpolate(x, scale_factor=2, mode="nearest"))
        return x


def build_unet(config):
    """The network a config describes: a UNet, or a HoUNet for layout "ho"."""
    return (HoUNet if config.layout == "ho" else UNet)(config)


def check_image_size(image_size, levels):
    """Every level but the bottom halves the image: the size must divide by 2^(levels-1)."""
    factor = 2 ** (levels - 1)
    if image_size % factor:
        raise ValueError(f"image size {image_size} cannot be halved {levels - 1} "
                         f"times: use a multiple of {factor}, or fewer levels")
