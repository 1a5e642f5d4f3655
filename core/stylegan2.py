"""StyleGAN2 generator (config F, "skip" generator) in pure PyTorch.

Runs on CPU, CUDA and MPS without any compiled extension. The parameters are stored the way both
official implementations store them (raw N(0, 1) weights with equalized-learning-rate gains applied
at run time, mapping weights pre-divided by the lr multiplier, affine biases including their +1), so
official checkpoints load by renaming tensors only (see ``core.checkpoints``).

State-dict names follow the block layout ``mapping.fc{i}``, ``mapping.w_avg``,
``synthesis.b{res}.{const|conv0|conv1|torgb}``; the fixed resampling filter is not stored.

Vocabulary: ``z [N, z_dim]`` -> mapping -> ``ws [N, num_ws, w_dim]`` -> synthesis ->
``img [N, img_channels, H, W]`` (roughly in [-1, 1] for a trained model).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import InvalidCheckpointError

SQRT2 = math.sqrt(2.0)
LRELU_SLOPE = 0.2
NOISE_MODES = ("const", "random", "none")

#: canonical config keys and their defaults (FFHQ-1024 config F unless said otherwise)
CONFIG_DEFAULTS: dict[str, Any] = {
    "resolution": 1024,
    "img_channels": 3,
    "z_dim": 512,
    "w_dim": 512,
    "mapping_layers": 8,
    "mapping_lr_mul": 0.01,
    "channels": None,          # {str(res): channels}; resolved from the table keys below if None
    "conv_clamp": None,        # NVlabs clamps activations at 256; rosinality never clamps
    "w_avg_beta": 0.995,       # EMA decay of w_avg when mapping(..., update_w_avg=True)
    "num_fp16_res": 0,         # highest resolutions that run in fp16 when half precision is on
    "resample_filter": [1, 3, 3, 1],
}
#: accepted spellings from the official constructors -> canonical key
CONFIG_ALIASES = {
    "size": "resolution", "img_resolution": "resolution",
    "n_mlp": "mapping_layers", "num_mapping_layers": "mapping_layers",
    "lr_mlp": "mapping_lr_mul", "lr_multiplier": "mapping_lr_mul",
    "blur_kernel": "resample_filter",
}
#: channel-table keys (resolved into ``channels`` and not kept in the config)
CHANNEL_TABLE_KEYS = ("channel_multiplier", "channel_base", "channel_max")


def rosinality_channels(resolution: int, channel_multiplier: int = 2) -> dict[int, int]:
    """Channel table of rosinality's ``Generator(size, ..., channel_multiplier)``."""
    cm = channel_multiplier
    table = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * cm, 128: 128 * cm, 256: 64 * cm,
             512: 32 * cm, 1024: 16 * cm}
    return {r: table.get(r, max(16 * cm * 1024 // r, 1)) for r in _resolutions(resolution)}


def nvlabs_channels(resolution: int, channel_base: int = 32768, channel_max: int = 512) -> dict[int, int]:
    """Channel table of NVlabs ``SynthesisNetwork(channel_base, channel_max)``."""
    return {r: min(channel_base // r, channel_max) for r in _resolutions(resolution)}


def _resolutions(resolution: int) -> list[int]:
    return [2 ** i for i in range(2, int(math.log2(resolution)) + 1)]


def normalize_config(cfg: Mapping[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    """Return the canonical, JSON-serialisable config for ``cfg``.

    Accepts canonical keys, the official constructor spellings (``size``, ``style_dim``, ``n_mlp``,
    ``lr_mlp``, ``img_resolution``, ...) and one channel table: an explicit ``channels`` dict
    ``{res: channels}``, rosinality ``channel_multiplier`` or NVlabs ``channel_base``/``channel_max``
    (default: NVlabs 32768/512). Unknown keys raise ``InvalidCheckpointError``.
    """
    src = dict(cfg or {})
    src.update(overrides)
    out = dict(CONFIG_DEFAULTS)
    table: dict[str, Any] = {}
    for key, value in src.items():
        if key == "style_dim":
            out["z_dim"] = out["w_dim"] = value
            continue
        key = CONFIG_ALIASES.get(key, key)
        if key in CHANNEL_TABLE_KEYS:
            table[key] = value
        elif key in CONFIG_DEFAULTS:
            out[key] = value
        else:
            raise InvalidCheckpointError(
                f"Unknown StyleGAN2 config key '{key}'. Known keys: {', '.join(sorted(CONFIG_DEFAULTS))} "
                f"(and {', '.join(CHANNEL_TABLE_KEYS)})")
    res = int(out["resolution"])
    if res < 4 or res & (res - 1):
        raise InvalidCheckpointError(f"StyleGAN2 resolution must be a power of two >= 4, got {res}.")
    out["resolution"] = res
    for k in ("img_channels", "z_dim", "w_dim", "mapping_layers", "num_fp16_res"):
        out[k] = int(out[k])
    out["mapping_lr_mul"] = float(out["mapping_lr_mul"])
    out["conv_clamp"] = None if out["conv_clamp"] is None else float(out["conv_clamp"])
    out["w_avg_beta"] = None if out["w_avg_beta"] is None else float(out["w_avg_beta"])
    f = [float(v) for v in out["resample_filter"]]
    if len(f) % 2 or f != f[::-1]:
        raise InvalidCheckpointError(f"Only even-length symmetric resampling filters are supported, got {f}.")
    out["resample_filter"] = [int(v) if v.is_integer() else v for v in f]
    if out["channels"] is not None:
        if table:
            raise InvalidCheckpointError("Give either 'channels' or a channel table, not both.")
        ch = {int(k): int(v) for k, v in dict(out["channels"]).items()}
    elif "channel_multiplier" in table:
        ch = rosinality_channels(res, int(table["channel_multiplier"]))
    else:
        ch = nvlabs_channels(res, int(table.get("channel_base", 32768)), int(table.get("channel_max", 512)))
    missing = [r for r in _resolutions(res) if r not in ch]
    if missing:
        raise InvalidCheckpointError(f"'channels' lacks resolutions {missing}.")
    out["channels"] = {str(r): ch[r] for r in _resolutions(res)}
    return out


# ----------------------------------------------------------------------------------------------
# resampling with a fixed separable FIR filter (upfirdn semantics, written as (transposed) convs)

def _filter_2d(f: Sequence[float], gain: float, channels: int, device=None, dtype=None) -> torch.Tensor:
    k = torch.as_tensor(f, dtype=torch.float64)
    k = torch.outer(k, k)
    k = (k / k.sum() * gain).to(device=device, dtype=dtype or torch.float32)
    return k.expand(channels, 1, *k.shape).contiguous()  # [C, 1, L, L]


class _Resample(nn.Module):
    """Holds the (non-persistent, never stored) filter kernels for one channel count."""

    def __init__(self, f: Sequence[float], channels: int):
        super().__init__()
        self.taps = len(f)
        self.register_buffer("kernel", _filter_2d(f, 4.0, channels), persistent=False)

    def kernel_for(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kernel
        if k.dtype != x.dtype or k.device != x.device:
            k = k.to(device=x.device, dtype=x.dtype)
        return k

    def upsample2x(self, x: torch.Tensor) -> torch.Tensor:
        """2x upsampling: zero-insertion followed by the filter (gain 4); [N,C,H,W] -> [N,C,2H,2W]."""
        return F.conv_transpose2d(x, self.kernel_for(x), stride=2, padding=self.taps // 2 - 1,
                                  groups=x.shape[1])

    def blur_after_transposed_conv(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Filter the [2H+1] output of a stride-2 transposed 3x3 conv down to [2H] (then add ``bias``)."""
        return F.conv2d(x, self.kernel_for(x), bias, padding=self.taps // 2 - 1, groups=x.shape[1])


# ----------------------------------------------------------------------------------------------
# layers

class FullyConnected(nn.Module):
    """Linear layer with equalized learning rate; optional leaky-ReLU (gain sqrt 2)."""

    def __init__(self, in_features: int, out_features: int, lr_mul: float = 1.0, bias_init: float = 0.0,
                 activation: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mul)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init)))
        self.weight_gain = lr_mul / math.sqrt(in_features)
        self.bias_gain = lr_mul
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight * self.weight_gain
        b = self.bias * self.bias_gain if self.bias_gain != 1 else self.bias
        x = F.linear(x, w.to(x.dtype), b.to(x.dtype))
        if self.activation:
            x = F.leaky_relu(x, LRELU_SLOPE) * SQRT2
        return x


class MappingNetwork(nn.Module):
    """z -> w: pixel norm + ``num_layers`` equalized-lr FC layers; owns ``w_avg``."""

    def __init__(self, z_dim: int, w_dim: int, num_ws: int, num_layers: int = 8, lr_mul: float = 0.01,
                 w_avg_beta: float | None = 0.995):
        super().__init__()
        self.z_dim, self.w_dim, self.num_ws, self.num_layers = z_dim, w_dim, num_ws, num_layers
        self.w_avg_beta = w_avg_beta
        self.register_buffer("w_avg", torch.zeros(w_dim))
        for i in range(num_layers):
            setattr(self, f"fc{i}", FullyConnected(z_dim if i == 0 else w_dim, w_dim, lr_mul=lr_mul,
                                                   activation=True))

    def forward(self, z: torch.Tensor, truncation_psi: float = 1.0, truncation_cutoff: int | None = None,
                update_w_avg: bool = False) -> torch.Tensor:  # [N, z_dim] -> [N, num_ws, w_dim]
        """Map z to ws, truncated towards ``w_avg`` (psi, first ``truncation_cutoff`` layers; all if None).

        ``update_w_avg=True`` (training) first moves ``w_avg`` towards this batch's mean w:
        ``w_avg = lerp(mean_w, w_avg, w_avg_beta)``, as the official training code does.
        """
        assert z.ndim == 2 and z.shape[1] == self.z_dim, f"z must be [N, {self.z_dim}], got {list(z.shape)}"
        x = z.float()
        x = x * (x.square().mean(dim=1, keepdim=True) + 1e-8).rsqrt()
        for i in range(self.num_layers):
            x = getattr(self, f"fc{i}")(x)
        if update_w_avg:
            if self.w_avg_beta is None:
                raise ValueError("update_w_avg needs a w_avg_beta in the config")
            with torch.no_grad():
                self.w_avg.copy_(x.detach().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))
        ws = x.unsqueeze(1).expand(-1, self.num_ws, -1)
        return truncate(ws, self.w_avg, truncation_psi, truncation_cutoff)


def truncate(ws: torch.Tensor, w_avg: torch.Tensor, psi: float = 1.0, cutoff: int | None = None) -> torch.Tensor:
    """Truncation trick: ``w_avg + psi * (ws - w_avg)`` on the first ``cutoff`` layers (all if None)."""
    if psi == 1:
        return ws.contiguous()
    w_avg = w_avg.to(ws.dtype)
    if cutoff is None or cutoff >= ws.shape[1]:
        return w_avg.lerp(ws, psi)
    return torch.cat([w_avg.lerp(ws[:, :cutoff], psi), ws[:, cutoff:]], dim=1)


class SynthesisLayer(nn.Module):
    """Modulated 3x3 conv (optionally 2x up) + noise + bias + leaky ReLU (+ clamp)."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, up: bool = False,
                 conv_clamp: float | None = None, resample: _Resample | None = None, kernel_size: int = 3):
        super().__init__()
        self.in_channels, self.out_channels, self.resolution, self.up = in_channels, out_channels, resolution, up
        self.conv_clamp = conv_clamp
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.register_buffer("noise_const", torch.randn(resolution, resolution))
        self.affine = FullyConnected(w_dim, in_channels, bias_init=1.0)
        self._resample = [resample]  # shared, not a submodule: kept out of the state dict

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str = "const",
                noise: torch.Tensor | None = None) -> torch.Tensor:
        # x [N, I, H, W], w [N, w_dim] -> [N, O, H', W']
        dtype = x.dtype
        styles = self.affine(w.float())                                   # [N, I]
        weight = self.weight
        if dtype == torch.float16:  # keep fp16 intermediates in range; the scales cancel in demod
            weight = weight * (1 / weight.abs().amax(dim=[1, 2, 3], keepdim=True).clamp_min(1e-8))
            styles = styles * (1 / styles.abs().amax(dim=1, keepdim=True).clamp_min(1e-8))
        # demodulation 1 / ||w_oik * s_i||_2, times the leaky-ReLU gain (lrelu(a) * g == lrelu(a * g), g > 0)
        dcoefs = (styles.square() @ weight.square().sum(dim=[2, 3]).t() + 1e-8).rsqrt() * SQRT2  # [N, O]
        bias = (self.bias * SQRT2).to(dtype)
        if x.shape[0] == 1:  # modulate/demodulate the weight itself: no extra passes over x
            wmod = (weight * styles[0][None, :, None, None] * dcoefs[0][:, None, None, None]).to(dtype)
            x = self._conv(x, wmod, bias)
        else:  # shared weight: scale the input, then the output
            x = self._conv(x * styles.to(dtype)[:, :, None, None], weight.to(dtype), None)
            x = torch.addcmul(bias[None, :, None, None], x, dcoefs.to(dtype)[:, :, None, None])

        strength = self.noise_strength * SQRT2
        if noise is not None:
            n = noise.to(device=x.device, dtype=dtype)
            n = n.reshape(-1, 1, *n.shape[-2:]) if n.ndim != 2 else n
        elif noise_mode == "const":
            n = self.noise_const.to(dtype)
        elif noise_mode == "random":
            n = torch.randn(x.shape[0], 1, x.shape[2], x.shape[3], device=x.device, dtype=dtype)
        elif noise_mode == "none":
            n = None
        else:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        # in place only where no gradient flows: through x, the weights, the styles (w), the bias, the noise or its
        # strength (leaky_relu_'s backward needs its output, which clamp_ would then change)
        inplace = not (torch.is_grad_enabled() and (x.requires_grad or n is not None and (n.requires_grad
                                                                                           or strength.requires_grad)))
        if inplace:
            if n is not None:
                x.addcmul_(n, strength.to(dtype))
            x = F.leaky_relu_(x, LRELU_SLOPE)
            if self.conv_clamp is not None:
                x.clamp_(-self.conv_clamp, self.conv_clamp)
        else:
            if n is not None:
                x = torch.addcmul(x, n, strength.to(dtype))
            x = F.leaky_relu(x, LRELU_SLOPE)
            if self.conv_clamp is not None:
                x = x.clamp(-self.conv_clamp, self.conv_clamp)
        return x

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.up:  # stride-2 transposed conv [2H+1], then the FIR filter (and bias) -> [2H]
            x = F.conv_transpose2d(x, weight.transpose(0, 1), stride=2)
            return self._resample[0].blur_after_transposed_conv(x, bias)
        return F.conv2d(x, weight, bias, padding=self.padding)


class ToRGB(nn.Module):
    """Modulated 1x1 conv to image channels (no demodulation) + bias (+ clamp)."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, conv_clamp: float | None = None):
        super().__init__()
        self.conv_clamp = conv_clamp
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.affine = FullyConnected(w_dim, in_channels, bias_init=1.0)
        self.weight_gain = 1 / math.sqrt(in_channels)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        styles = self.affine(w.float()) * self.weight_gain
        if x.shape[0] == 1:
            x = F.conv2d(x, (self.weight * styles[0][None, :, None, None]).to(dtype), self.bias.to(dtype))
        else:
            x = F.conv2d(x * styles.to(dtype)[:, :, None, None], self.weight.to(dtype), self.bias.to(dtype))
        if self.conv_clamp is not None:
            x = x.clamp(-self.conv_clamp, self.conv_clamp)
        return x


class SynthesisBlock(nn.Module):
    """One resolution: (const | 2x-up conv0) -> conv1 -> torgb, adding to the upsampled skip image."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, img_channels: int,
                 conv_clamp: float | None, resample_filter: Sequence[float], use_fp16: bool):
        super().__init__()
        self.resolution, self.is_first, self.use_fp16 = resolution, resolution == 4, use_fp16
        self.img_resample = _Resample(resample_filter, img_channels)
        if self.is_first:
            self.const = nn.Parameter(torch.randn(out_channels, 4, 4))
        else:
            self.x_resample = _Resample(resample_filter, out_channels)
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim, resolution, up=True,
                                        conv_clamp=conv_clamp, resample=self.x_resample)
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim, resolution, conv_clamp=conv_clamp)
        self.torgb = ToRGB(out_channels, img_channels, w_dim, conv_clamp=conv_clamp)
        self.num_conv = 1 if self.is_first else 2

    def layers(self) -> list[SynthesisLayer]:
        return [self.conv1] if self.is_first else [self.conv0, self.conv1]

    def forward(self, x: torch.Tensor | None, img: torch.Tensor | None, ws: torch.Tensor, noise_mode: str,
                noise: Sequence[torch.Tensor | None], dtype: torch.dtype,
                memory_format: torch.memory_format = torch.contiguous_format):
        # ws: [N, num_conv + 1, w_dim]
        if self.is_first:
            x = self.const.to(dtype).unsqueeze(0).expand(ws.shape[0], -1, -1, -1)
            x = x.contiguous(memory_format=memory_format)
        else:
            x = self.conv0(x.to(dtype), ws[:, 0], noise_mode, noise[0])
        x = self.conv1(x, ws[:, self.num_conv - 1], noise_mode, noise[-1])
        y = self.torgb(x, ws[:, self.num_conv]).float()
        img = y if img is None else self.img_resample.upsample2x(img) + y
        return x, img


class SynthesisNetwork(nn.Module):
    """ws [N, num_ws, w_dim] -> img [N, img_channels, resolution, resolution]."""

    def __init__(self, w_dim: int, resolution: int, img_channels: int, channels: Mapping[int, int],
                 conv_clamp: float | None = None, resample_filter: Sequence[float] = (1, 3, 3, 1),
                 num_fp16_res: int = 0):
        super().__init__()
        self.w_dim, self.resolution, self.img_channels = w_dim, resolution, img_channels
        self.block_resolutions = _resolutions(resolution)
        fp16_from = 2 ** (int(math.log2(resolution)) + 1 - num_fp16_res) if num_fp16_res > 0 else 4
        for res in self.block_resolutions:
            block = SynthesisBlock(channels[res // 2] if res > 4 else 0, channels[res], w_dim, res, img_channels,
                                   conv_clamp, resample_filter, use_fp16=res >= fp16_from)
            setattr(self, f"b{res}", block)
        self.blocks = [getattr(self, f"b{r}") for r in self.block_resolutions]
        self.noise_layers = [layer for b in self.blocks for layer in b.layers()]
        self.num_layers = len(self.noise_layers)
        self.num_ws = self.num_layers + 1
        #: set by Generator.set_precision; fp16 is used only on these device types
        self.half = False
        self.half_device_types: tuple[str, ...] = ("cuda",)
        #: run convolutions on NHWC activations on these device types (faster with oneDNN and cuDNN)
        self.channels_last_device_types: tuple[str, ...] = ("cpu", "cuda")

    def forward(self, ws: torch.Tensor, noise_mode: str = "const",
                noise: Sequence[torch.Tensor | None] | None = None,
                force_fp32: bool = False) -> torch.Tensor:
        """ws [N, num_ws, w_dim] (or one w [N, w_dim] for all layers) -> img [N, img_channels, H, W].

        ``noise_mode``: 'const' (the stored per-layer noise, deterministic), 'random' (fresh per call,
        from the global torch RNG) or 'none'. ``noise``: optional list with one tensor per conv layer
        ([r, r], [1, 1, r, r] or [N, 1, r, r]; see ``Generator.noise_shapes``) that takes precedence;
        ``None`` entries fall back to ``noise_mode``. Half precision only after
        ``Generator.set_precision('fp16')`` on CUDA, and never with ``force_fp32``.
        """
        if ws.ndim == 2:
            ws = ws.unsqueeze(1).expand(-1, self.num_ws, -1)
        assert ws.ndim == 3 and ws.shape[1:] == (self.num_ws, self.w_dim), \
            f"ws must be [N, {self.num_ws}, {self.w_dim}], got {list(ws.shape)}"
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        if noise is not None and len(noise) != self.num_layers:
            raise ValueError(f"noise must be a list of {self.num_layers} tensors (one per conv layer), "
                             f"got {len(noise)}")
        ws = ws.float()
        half_ok = self.half and not force_fp32 and ws.device.type in self.half_device_types
        fmt = torch.channels_last if ws.device.type in self.channels_last_device_types else torch.contiguous_format
        x = img = None
        w_idx = l_idx = 0
        for block in self.blocks:
            n = [None] * block.num_conv if noise is None else list(noise[l_idx:l_idx + block.num_conv])
            dtype = torch.float16 if (half_ok and block.use_fp16) else torch.float32
            x, img = block(x, img, ws[:, w_idx:w_idx + block.num_conv + 1], noise_mode, n, dtype, fmt)
            w_idx += block.num_conv
            l_idx += block.num_conv
        return img.contiguous()  # [N, C, H, W]


class Generator(nn.Module):
    """StyleGAN2 generator: ``mapping`` (z -> ws) and ``synthesis`` (ws -> img).

    Build it from a config dict with :meth:`from_config`; ``G.config`` round-trips. ``G.w_avg`` is the
    ``mapping.w_avg`` buffer (the truncation centre).
    """

    def __init__(self, **config: Any):
        super().__init__()
        cfg = normalize_config(config)
        self._config = cfg
        channels = {int(k): v for k, v in cfg["channels"].items()}
        self.z_dim, self.w_dim = cfg["z_dim"], cfg["w_dim"]
        self.img_resolution, self.img_channels = cfg["resolution"], cfg["img_channels"]
        synthesis = SynthesisNetwork(cfg["w_dim"], cfg["resolution"], cfg["img_channels"], channels,
                                     cfg["conv_clamp"], cfg["resample_filter"], cfg["num_fp16_res"])
        self.num_ws = synthesis.num_ws
        self.num_layers = synthesis.num_layers
        self.synthesis = synthesis  # registered first: same state-dict order as NVlabs
        self.mapping = MappingNetwork(cfg["z_dim"], cfg["w_dim"], self.num_ws, cfg["mapping_layers"],
                                      cfg["mapping_lr_mul"], cfg["w_avg_beta"])

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "Generator":
        """Build a randomly initialised generator from a (canonical or official-style) config dict."""
        return cls(**dict(cfg))

    @property
    def config(self) -> dict[str, Any]:
        """Canonical JSON-serialisable config; ``Generator.from_config(G.config)`` rebuilds the same shape."""
        return {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v)
                for k, v in self._config.items()}

    @property
    def resolution(self) -> int:
        return self.img_resolution

    @property
    def w_avg(self) -> torch.Tensor:  # [w_dim]
        return self.mapping.w_avg

    @w_avg.setter
    def w_avg(self, value: torch.Tensor) -> None:
        with torch.no_grad():
            self.mapping.w_avg.copy_(value.reshape(self.w_dim))

    def noise_shapes(self) -> list[tuple[int, int]]:
        """Spatial size of each conv layer's noise input, in the order ``synthesis(noise=[...])`` takes."""
        return [(layer.resolution, layer.resolution) for layer in self.synthesis.noise_layers]

    def set_precision(self, precision: str = "fp32") -> "Generator":
        """'fp16' runs the top ``num_fp16_res`` blocks (all blocks if 0) in half precision on CUDA only."""
        if precision not in ("fp32", "fp16"):
            raise ValueError("precision must be 'fp32' or 'fp16'")
        self.synthesis.half = precision == "fp16"
        return self

    def truncate(self, ws: torch.Tensor, truncation_psi: float = 1.0,
                 truncation_cutoff: int | None = None) -> torch.Tensor:
        """Pull ``ws [N, num_ws, w_dim]`` towards ``w_avg`` on the first ``truncation_cutoff`` layers."""
        return truncate(ws, self.w_avg, truncation_psi, truncation_cutoff)

    @staticmethod
    def mix_styles(ws_a: torch.Tensor, ws_b: torch.Tensor, crossover: int) -> torch.Tensor:
        """Style mixing: layers ``< crossover`` from ``ws_a``, the rest from ``ws_b`` (both [N, num_ws, w_dim])."""
        assert ws_a.shape == ws_b.shape, (ws_a.shape, ws_b.shape)
        return torch.cat([ws_a[:, :crossover], ws_b[:, crossover:]], dim=1)

    @torch.no_grad()
    def estimate_w_avg(self, n: int = 10000, seed: int = 0, batch: int = 2000) -> torch.Tensor:
        """Mean of mapping outputs for ``n`` random z (used when a checkpoint carries no w_avg)."""
        gen = torch.Generator().manual_seed(seed)
        dev = self.w_avg.device
        total = torch.zeros(self.w_dim, dtype=torch.float64, device=dev)
        for i in range(0, n, batch):
            z = torch.randn(min(batch, n - i), self.z_dim, generator=gen).to(dev)
            total += self.mapping(z)[:, 0].double().sum(0)
        return (total / n).float()

    def forward(self, z: torch.Tensor, truncation_psi: float = 1.0, truncation_cutoff: int | None = None,
                noise_mode: str = "const", noise: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
        """z [N, z_dim] -> img [N, img_channels, H, W]."""
        ws = self.mapping(z, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff)
        return self.synthesis(ws, noise_mode=noise_mode, noise=noise)
