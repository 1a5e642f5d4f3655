"""AnyFace Cross Modal Distillation (CMD): a SET of CLIP embeddings -> a W+ code.

Architecture (AnyFace, CVPR 2022): the k CLIP features of a sample (k captions, or one image) are stacked
as a sequence and passed through transformer encoder layers (paper: 6), then 3 linear layers map the
result to ``num_ws x w_dim``. There is no positional encoding and the sequence is pooled with a masked
mean, so the output does not depend on the order of the captions (a set). The pooled transformer output
``h`` is what the two streams align with the cross-modal transfer loss (KL between softmax(h_t) and
softmax(h_i)).

Also here: the paper's losses as plain functions (``diverse_triplet_loss``, ``cmt_kl_loss``, ``clip_loss``)
and ``pad_sets`` to batch caption sets of different sizes.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import InvalidCheckpointError
from core.latents import read_safetensors, save_safetensors

FORMAT = "anyface-cmd"


def pad_sets(sets: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack embedding sets of different sizes: list of [k_i, D] -> (emb [B, k_max, D], mask [B, k_max]) with
    ``mask`` True for real entries and False for padding."""
    if not sets:
        raise ValueError("pad_sets needs at least one set")
    k_max = max(int(s.shape[0]) for s in sets)
    if min(int(s.shape[0]) for s in sets) < 1:
        raise ValueError("every set needs at least one embedding")
    d = int(sets[0].shape[-1])
    ref = sets[0]
    emb = ref.new_zeros(len(sets), k_max, d)
    mask = torch.zeros(len(sets), k_max, dtype=torch.bool, device=ref.device)
    for i, s in enumerate(sets):
        emb[i, : s.shape[0]] = s
        mask[i, : s.shape[0]] = True
    return emb, mask


class CMD(nn.Module):
    """Cross Modal Distillation: CLIP embedding set [B, k, D] -> ws [B, num_ws, w_dim].

    ``forward(emb, mask=None, return_hidden=False)``: ``emb`` [B, k, D] (a 2-D [k, D] is one set; for single
    image embeddings [B, D] pass ``emb[:, None]``); ``mask`` [B, k] bool, True for real entries (None: all). Returns ``ws`` and, with ``return_hidden``, also ``h`` [B, d_model] (the pooled
    transformer output used by :func:`cmt_kl_loss`).

    With ``predict_offset`` the head predicts ``ws - w_avg`` (buffer ``w_avg`` [w_dim], set it with
    :meth:`set_w_avg` from the generator before training) so an untrained model starts at the average face.
    """

    def __init__(self, embed_dim: int, num_ws: int, w_dim: int, *, d_model: int = 512, num_layers: int = 6,
                 num_heads: int = 8, ff_dim: int | None = None, hidden_dim: int = 1024, dropout: float = 0.1,
                 predict_offset: bool = True, sample_spread: float = 0.0, condition_bank_k: int = 0,
                 layer_detail: float = 1.0):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        self.config = dict(embed_dim=int(embed_dim), num_ws=int(num_ws), w_dim=int(w_dim), d_model=int(d_model),
                           num_layers=int(num_layers), num_heads=int(num_heads),
                           ff_dim=int(ff_dim or 4 * d_model), hidden_dim=int(hidden_dim), dropout=float(dropout),
                           predict_offset=bool(predict_offset))
        # How far the engine spreads the faces of one caption set, a property of the file (0, the paper: one code
        # per caption set; the faces differ only in the first layers, from random z). s > 0: face i's text layers
        # are ``code + diversity * s * (mapping(z_i) - w_avg)``, a random generator face's offset from the average
        # face, scaled. For a generator whose random first layers carry little of the face (the tiny pack's 1 of
        # 10), chosen after training on held-out validation captions (`python -m training.val_presence`).
        self.sample_spread = sample_spread
        # 0 (the paper): the caption set goes in as it is. k > 0: the engine adds one member to the set, the set's
        # direction carried to CLIP's image side through the pack's KNN bank (the mean image embedding of its k
        # nearest entries, ``LatentBank.image_side``). The reconstruction stream trained the model on image
        # embeddings and the cross-modal loss aligned the two, so the member stays in its domain; it helps wordings
        # the captions of training never used (a small CLIP's text and image embeddings lie far apart). Training is
        # unchanged; chosen like ``sample_spread``.
        self.condition_bank_k = condition_bank_k
        # 1 (the paper): the engine uses the W+ code as the head gives it, a code per layer. a < 1: each layer's
        # difference from the code's mean over the layers is scaled by a (0: one w for every layer). A generator's
        # random faces have one w for every layer; where the head's per-layer differences leave that set (the tiny
        # pack's 64 px generator renders some of them as no face at all), a smaller a keeps the face. Chosen like
        # ``sample_spread``.
        self.layer_detail = layer_detail
        self.embed_dim, self.num_ws, self.w_dim = int(embed_dim), int(num_ws), int(w_dim)
        self.d_model = int(d_model)
        self.predict_offset = bool(predict_offset)
        self.in_proj = nn.Linear(embed_dim, d_model)
        layer = nn.TransformerEncoderLayer(d_model, num_heads, self.config["ff_dim"], dropout=dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, num_layers, norm=nn.LayerNorm(d_model),
                                                 enable_nested_tensor=False)
        self.head = nn.Sequential(  # the paper's 3 linear layers
            nn.Linear(d_model, hidden_dim), nn.LeakyReLU(0.2),
            nn.Linear(hidden_dim, hidden_dim), nn.LeakyReLU(0.2),
            nn.Linear(hidden_dim, num_ws * w_dim),
        )
        if predict_offset:  # start at the average face: a small last layer
            nn.init.normal_(self.head[-1].weight, std=1e-3)
            nn.init.zeros_(self.head[-1].bias)
        self.register_buffer("w_avg", torch.zeros(w_dim))

    @property
    def sample_spread(self) -> float:
        return self._sample_spread

    @sample_spread.setter
    def sample_spread(self, value: float) -> None:
        value = float(value)
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"sample_spread must be a finite number >= 0, got {value}")
        self._sample_spread = value
        if value:  # kept out of the config at 0, so files written before it existed keep their bytes
            self.config["sample_spread"] = value
        else:
            self.config.pop("sample_spread", None)

    @property
    def layer_detail(self) -> float:
        return self._layer_detail

    @layer_detail.setter
    def layer_detail(self, value: float) -> None:
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"layer_detail must be a number in [0, 1], got {value!r}") from None
        if not 0.0 <= value <= 1.0:  # also refuses NaN
            raise ValueError(f"layer_detail must be a number in [0, 1], got {value}")
        self._layer_detail = value
        if value != 1.0:  # kept out of the config at 1, as the other sampling settings at their defaults
            self.config["layer_detail"] = value
        else:
            self.config.pop("layer_detail", None)

    def as_sampled(self, ws: torch.Tensor) -> torch.Tensor:
        """ws [..., num_ws, w_dim] with each layer's difference from the layers' mean scaled by ``layer_detail``
        (the code the engine uses; unchanged at 1)."""
        if self._layer_detail == 1.0:
            return ws
        mean = ws.mean(-2, keepdim=True)
        return mean + self._layer_detail * (ws - mean)

    @property
    def condition_bank_k(self) -> int:
        return self._condition_bank_k

    @condition_bank_k.setter
    def condition_bank_k(self, value: int) -> None:
        try:
            ok = not isinstance(value, bool) and int(value) == value and int(value) >= 0
        except (TypeError, ValueError, OverflowError):
            ok = False
        if not ok:
            raise ValueError(f"condition_bank_k must be a whole number >= 0, got {value}")
        self._condition_bank_k = int(value)
        if self._condition_bank_k:  # kept out of the config at 0, as sample_spread
            self.config["condition_bank_k"] = self._condition_bank_k
        else:
            self.config.pop("condition_bank_k", None)

    # ------------------------------------------------------------------------------------------------------
    def set_w_avg(self, w_avg: torch.Tensor) -> None:
        """Copy the generator's average latent [w_dim] into the model (the offset origin)."""
        w_avg = torch.as_tensor(w_avg).reshape(-1)
        if w_avg.numel() != self.w_dim:
            raise ValueError(f"w_avg has {w_avg.numel()} values, expected w_dim={self.w_dim}")
        self.w_avg.copy_(w_avg.to(self.w_avg))

    def _as_batch(self, emb: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if emb.ndim == 2:  # one set [k, D]
            emb = emb.unsqueeze(0)
            if mask is not None and mask.ndim == 1:
                mask = mask.unsqueeze(0)
        if emb.ndim != 3 or emb.shape[-1] != self.embed_dim:
            raise ValueError(f"CMD expects embeddings [B, k, {self.embed_dim}], got {tuple(emb.shape)}")
        if mask is not None:
            mask = mask.to(device=emb.device, dtype=torch.bool)
            if mask.shape != emb.shape[:2]:
                raise ValueError(f"mask must be [B, k] = {tuple(emb.shape[:2])}, got {tuple(mask.shape)}")
            if not bool(mask.any(1).all()):
                raise ValueError("every set needs at least one unmasked embedding")
        return emb, mask

    def hidden(self, emb: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled transformer output h [B, d_model] (masked mean over the set)."""
        emb, mask = self._as_batch(emb, mask)
        x = self.in_proj(emb.to(self.in_proj.weight.dtype))  # [B, k, d_model]
        pad = None if mask is None else ~mask
        x = self.transformer(x, src_key_padding_mask=pad)
        if mask is None:
            return x.mean(1)
        m = mask.unsqueeze(-1).to(x.dtype)
        return (x * m).sum(1) / m.sum(1)

    def forward(self, emb: torch.Tensor, mask: torch.Tensor | None = None, return_hidden: bool = False):
        """emb [B, k, D] (or one set [k, D]) -> ws [B, num_ws, w_dim] (and h [B, d_model] with return_hidden)."""
        h = self.hidden(emb, mask)
        out = self.head(h).view(-1, self.num_ws, self.w_dim)
        if self.predict_offset:
            out = out + self.w_avg
        return (out, h) if return_hidden else out

    # ------------------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: dict) -> "CMD":
        return cls(**config)

    def save(self, path: str | os.PathLike) -> None:
        """Safetensors with the config in the metadata (atomic)."""
        save_safetensors(path, dict(self.state_dict()), self.config, FORMAT)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str | None = None) -> "CMD":
        """Load a file written by :meth:`save`; strict state-dict match, returned in eval mode."""
        tensors, config = read_safetensors(path, FORMAT)
        try:
            model = cls.from_config(config)
            model.load_state_dict(tensors, strict=True)
        except (TypeError, RuntimeError, ValueError) as e:
            raise InvalidCheckpointError(f"{path}: CMD weights do not match their config ({e}).") from e
        return model.to(device or "cpu").eval()


# --------------------------------------------------------------------------------------------------------------
# Losses of the paper
# --------------------------------------------------------------------------------------------------------------

def _flat_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine per sample over all but the batch axis; a, b [B, ...] of the same shape."""
    return F.cosine_similarity(a.reshape(a.shape[0], -1), b.reshape(a.shape[0], -1), dim=1, eps=1e-8)


def _expand_avg(w_avg: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """w_avg [w_dim] or [num_ws, w_dim] or [B, num_ws, w_dim] -> the shape of ``like`` [B, num_ws, w_dim]."""
    w_avg = w_avg.to(like)
    while w_avg.ndim < like.ndim:
        w_avg = w_avg.unsqueeze(0)
    return w_avg.expand_as(like)


def diverse_triplet_loss(w_t: torch.Tensor, w: torch.Tensor, w_neg_t: torch.Tensor, w_avg: torch.Tensor,
                         margin: float = 0.1, eps: float = 1e-3) -> torch.Tensor:
    """AnyFace's diverse triplet loss (mean over the batch).

    With s(x) = cos(x, w) / cos(x, w_avg) (cosines over the flattened W+ code):
    ``L_DT = max(s(w_neg_t) - s(w_t) + margin, 0)``. Minimising it pulls the text code ``w_t`` toward the
    latent ``w`` of its own image and away from the average face ``w_avg`` relative to a wrong caption's code
    ``w_neg_t`` (a plain pairwise loss collapses to ``w_avg``). All codes are [B, num_ws, w_dim]; ``w_avg``
    may be [w_dim]. The denominator is clamped to ``eps`` to stay finite.
    """
    w = w.to(w_t).expand_as(w_t)
    wa = _expand_avg(w_avg, w_t)

    def ratio(x: torch.Tensor) -> torch.Tensor:
        return _flat_cos(x, w) / _flat_cos(x, wa).clamp_min(eps)

    return F.relu(ratio(w_neg_t) - ratio(w_t) + margin).mean()


def pairwise_loss(w_t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The plain pairwise baseline (1 - cos(w_t, w)), for the diversity ablation."""
    return (1.0 - _flat_cos(w_t, w)).mean()


def cmt_kl_loss(h_t: torch.Tensor, h_i: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Cross-modal transfer loss ``KL(softmax(h_t) || softmax(h_i))`` over the feature axis, batch mean.
    Detach the side that should act as the teacher (the paper uses it both ways, one per stream)."""
    log_p = F.log_softmax(h_t / temperature, dim=-1)
    log_q = F.log_softmax(h_i / temperature, dim=-1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)


def clip_loss(text_emb: torch.Tensor, image_emb: torch.Tensor) -> torch.Tensor:
    """1 - cosine between a caption's CLIP text feature [B, D] and the CLIP image feature of its image [B, D]."""
    return (1.0 - F.cosine_similarity(text_emb, image_emb.to(text_emb), dim=-1)).mean()
