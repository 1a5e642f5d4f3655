"""Load and save StyleGAN2 generators: our safetensors format and both official checkpoint formats.

Formats (detected from the file content, not its name):

- **ours**: safetensors; metadata ``{"format": "anyface-stylegan2", "config": <JSON of G.config>}``;
  tensor names = ``Generator.state_dict()`` names.
- **rosinality** ``.pt`` (``stylegan2-pytorch``): ``torch.load(weights_only=True)`` of a dict with
  ``g_ema`` (always used; the non-EMA ``g`` never is) and ``latent_avg``. A bare generator state dict
  is accepted too.
- **NVlabs** ``.pkl`` (``stylegan2-ada-pytorch`` network pickle): read with a restricted unpickler that
  allows only the globals such a pickle needs and never runs the network source embedded in it;
  ``G_ema`` and its ``init_kwargs`` are taken from the persistent-object state.

Name mapping, official -> ours (no kernel flips, no rescaling: all three store raw equalized-lr
weights, mapping weights pre-divided by the lr multiplier, affine biases including their +1):

===============================================  ================================================
rosinality                                        ours (= NVlabs name, less its ``resample_filter``)
===============================================  ================================================
``style.{i+1}.weight|bias``                       ``mapping.fc{i}.weight|bias``
``latent_avg`` [w_dim] (checkpoint entry)         ``mapping.w_avg``
``input.input`` [1,C,4,4]                         ``synthesis.b4.const`` [C,4,4]
``conv1.*``                                       ``synthesis.b4.conv1.*``
``convs.{2k}.*`` / ``convs.{2k+1}.*``             ``synthesis.b{2^(k+3)}.conv0.*`` / ``.conv1.*``
  ``conv.weight`` [1,O,I,3,3]                       ``weight`` [O,I,3,3]
  ``conv.modulation.weight|bias``                   ``affine.weight|bias``
  ``noise.weight`` [1]                              ``noise_strength`` []
  ``activate.bias``                                 ``bias``
``noises.noise_{j}`` [1,1,r,r]                    ``noise_const`` [r,r] of conv layer j (order above)
``to_rgb1.*`` / ``to_rgbs.{k}.*``                 ``synthesis.b4.torgb.*`` / ``synthesis.b{2^(k+3)}.torgb.*``
  ``conv.weight`` [1,3,C,1,1]                       ``weight`` [3,C,1,1]
  ``conv.modulation.weight|bias``                   ``affine.weight|bias``
  ``bias`` [1,3,1,1]                                ``bias`` [3]
``*.blur.kernel``, ``*.upsample.kernel``          fixed [1,3,3,1] filter, not stored
===============================================  ================================================

NVlabs ``G_ema`` names are ours verbatim; its fixed ``*.resample_filter`` buffers are not stored.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from core.atomic import set_file_mode
from core.errors import InvalidCheckpointError, UnsafeCheckpointError
from core.stylegan2 import Generator, normalize_config

FORMAT_TAG = "anyface-stylegan2"
FIXED_FILTER_KEYS = re.compile(r"(\.blur\.kernel|\.upsample\.kernel|resample_filter)$")


# ----------------------------------------------------------------------------------------------
# our format

def save_generator(G: Generator, path: str | os.PathLike, *, metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``G`` as safetensors with its config in the metadata (atomic: temp file + rename)."""
    from core.atomic import write_safetensors as save_file  # deterministic bytes

    path = Path(path)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in G.state_dict().items()}
    meta = {"format": FORMAT_TAG, "config": json.dumps(G.config, sort_keys=True)}
    meta.update({k: str(v) for k, v in (metadata or {}).items() if k not in meta})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        set_file_mode(tmp, like=path)  # save_file leaves 0600
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_safetensors_generator(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, state_dict) from one of our safetensors files."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types
        raise InvalidCheckpointError(f"{path} is not a readable safetensors file ({e}).") from e
    if "config" not in meta:
        raise InvalidCheckpointError(f"{path} has no generator config in its metadata; "
                                     "convert official checkpoints with `anyface convert`.")
    return json.loads(meta["config"]), sd


# ----------------------------------------------------------------------------------------------
# rosinality

def rosinality_config(sd: Mapping[str, torch.Tensor], lr_mlp: float = 0.01) -> dict[str, Any]:
    """Infer the generator config from a rosinality ``g_ema`` state dict (shapes only)."""
    try:
        n_mlp = len([k for k in sd if re.fullmatch(r"style\.\d+\.weight", k)])
        w_dim, z_dim = sd["style.1.weight"].shape
        num_layers = len([k for k in sd if k.startswith("noises.noise_")]) or (
            1 + len([k for k in sd if re.fullmatch(r"convs\.\d+\.conv\.weight", k)]))
        resolution = 2 ** ((num_layers + 3) // 2)
        channels = {4: int(sd["conv1.conv.weight"].shape[1])}
        for k in range(int(np.log2(resolution)) - 2):
            channels[2 ** (k + 3)] = int(sd[f"convs.{2 * k}.conv.weight"].shape[1])
        img_channels = int(sd["to_rgb1.conv.weight"].shape[1])
    except KeyError as e:
        raise InvalidCheckpointError(f"Not a rosinality StyleGAN2 generator state dict (missing {e}).") from e
    return normalize_config(resolution=resolution, img_channels=img_channels, z_dim=int(z_dim), w_dim=int(w_dim),
                            mapping_layers=n_mlp, mapping_lr_mul=lr_mlp, channels=channels, conv_clamp=None)


def _rosinality_layer_names(resolution: int) -> list[str]:
    """Our names of the conv layers in rosinality's ``noises.noise_j`` order."""
    names = ["synthesis.b4.conv1"]
    for k in range(int(np.log2(resolution)) - 2):
        names += [f"synthesis.b{2 ** (k + 3)}.conv0", f"synthesis.b{2 ** (k + 3)}.conv1"]
    return names


def rosinality_to_ours(sd: Mapping[str, torch.Tensor], latent_avg: torch.Tensor | None = None,
                       resolution: int | None = None) -> dict[str, torch.Tensor]:
    """Rename/reshape a rosinality ``g_ema`` state dict to ours (see the module table). Works on ``meta``."""
    if resolution is None:
        resolution = rosinality_config(sd)["resolution"]
    layers = _rosinality_layer_names(resolution)
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, t in sd.items():
        if FIXED_FILTER_KEYS.search(key):
            continue
        m = re.fullmatch(r"style\.(\d+)\.(weight|bias)", key)
        if m:
            out[f"mapping.fc{int(m[1]) - 1}.{m[2]}"] = t
            continue
        if key == "input.input":
            out["synthesis.b4.const"] = t.reshape(t.shape[1:])
            continue
        m = re.fullmatch(r"noises\.noise_(\d+)", key)
        if m:
            out[f"{layers[int(m[1])]}.noise_const"] = t.reshape(t.shape[-2:])
            continue
        m = re.fullmatch(r"(conv1|convs\.(\d+))\.(.+)", key)
        if m:
            prefix = "synthesis.b4.conv1" if m[2] is None else layers[int(m[2]) + 1]
            sub = {"conv.weight": ("weight", lambda x: x.reshape(x.shape[1:])),
                   "conv.modulation.weight": ("affine.weight", None),
                   "conv.modulation.bias": ("affine.bias", None),
                   "noise.weight": ("noise_strength", lambda x: x.reshape([])),
                   "activate.bias": ("bias", None)}.get(m[3])
            if sub:
                out[f"{prefix}.{sub[0]}"] = sub[1](t) if sub[1] else t
                continue
        m = re.fullmatch(r"(to_rgb1|to_rgbs\.(\d+))\.(.+)", key)
        if m:
            prefix = "synthesis.b4.torgb" if m[2] is None else f"synthesis.b{2 ** (int(m[2]) + 3)}.torgb"
            sub = {"conv.weight": ("weight", lambda x: x.reshape(x.shape[1:])),
                   "conv.modulation.weight": ("affine.weight", None),
                   "conv.modulation.bias": ("affine.bias", None),
                   "bias": ("bias", lambda x: x.reshape(-1))}.get(m[3])
            if sub:
                out[f"{prefix}.{sub[0]}"] = sub[1](t) if sub[1] else t
                continue
        unknown.append(key)
    if unknown:
        raise InvalidCheckpointError(f"Unexpected tensors in rosinality generator: {unknown[:5]}")
    if latent_avg is not None:
        out["mapping.w_avg"] = latent_avg.reshape(-1)
    return out


def read_rosinality(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor], bool]:
    """(config, our state_dict, has_w_avg) from a rosinality checkpoint, loaded with weights_only=True."""
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"{path} is not a plain-tensor checkpoint: torch.load(weights_only=True) refused it ({e}). "
            "It may contain code; it was not loaded.") from e
    except Exception as e:
        raise InvalidCheckpointError(f"{path} could not be read as a PyTorch checkpoint ({e}): it is damaged or "
                                     "incomplete (e.g. cut short by a download); download it again.") from e
    if not isinstance(ckpt, Mapping):
        raise InvalidCheckpointError(f"{path}: expected a dict checkpoint, got {type(ckpt).__name__}.")
    if "g_ema" in ckpt:
        sd, latent_avg = ckpt["g_ema"], ckpt.get("latent_avg")
    elif "style.1.weight" in ckpt:
        sd, latent_avg = ckpt, None
    else:
        hint = " It has only the non-EMA generator 'g', which is not used for sampling." if "g" in ckpt else ""
        raise InvalidCheckpointError(f"{path} has no 'g_ema' generator (keys: {sorted(ckpt)[:8]}).{hint}")
    cfg = rosinality_config(sd)
    ours = rosinality_to_ours(sd, latent_avg, cfg["resolution"])
    return cfg, ours, latent_avg is not None


# ----------------------------------------------------------------------------------------------
# NVlabs network pickles

class _EasyDict(dict):
    """Stand-in for ``dnnlib.util.EasyDict`` (a dict with attribute access)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class PersistentObject:
    """What a ``persistence``-decorated object becomes: its class name and its ``__dict__``, no code."""

    def __init__(self, meta: Mapping[str, Any]):
        if not isinstance(meta, Mapping) or meta.get("type") != "class":
            raise UnsafeCheckpointError("Network pickle holds a persistent object of an unknown kind.")
        self.class_name: str = str(meta.get("class_name"))
        self.state: dict = dict(meta.get("state") or {})
        self.version = meta.get("version")

    def __repr__(self) -> str:
        return f"PersistentObject({self.class_name})"


def _reconstruct_persistent_obj(meta):
    return PersistentObject(meta)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *args):
    return data  # a plain tensor; hooks are ignored


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *args):
    return torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, False, collections.OrderedDict())


def _load_from_bytes(b: bytes):
    return torch.load(io.BytesIO(b), map_location="cpu", weights_only=True)


def _numpy_scalar(dtype, data=None):
    dtype = np.dtype(dtype)
    if dtype.kind not in "biufc" or not isinstance(data, bytes):
        raise UnsafeCheckpointError(f"Network pickle holds a numpy scalar of unsupported type {dtype}.")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _numpy_dtype(*args):
    return np.dtype(*args)


#: the only globals a network pickle may reference -> our harmless replacements
ALLOWED_GLOBALS = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,  # pickles written with numpy 1.x
    ("numpy", "dtype"): _numpy_dtype,
    # protocol <= 3 pickles (Python 3.7 era) spell sets (nn.Module._non_persistent_buffers_set) this way
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set,
    ("__builtin__", "frozenset"): frozenset,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only :data:`ALLOWED_GLOBALS`; everything else raises UnsafeCheckpointError."""

    def find_class(self, module: str, name: str):
        fn = ALLOWED_GLOBALS.get((module, name))
        if fn is None:
            raise UnsafeCheckpointError(
                f"Refused to load a pickle that references '{module}.{name}': it is not a StyleGAN2 network "
                "pickle and may run code. Nothing in it was executed. Use an official stylegan2-ada-pytorch "
                "network pickle (.pkl), a rosinality checkpoint (.pt) or an AnyFace .safetensors file.")
        return fn

    def persistent_load(self, pid):
        raise UnsafeCheckpointError("Refused a pickle with persistent ids (not a StyleGAN2 network pickle).")


def restricted_load(f) -> Any:
    """Unpickle ``f`` (binary file object) allowing only the globals of a StyleGAN2 network pickle."""
    try:
        return RestrictedUnpickler(f).load()
    except UnsafeCheckpointError:
        raise
    except Exception as e:
        raise InvalidCheckpointError(f"Could not read the network pickle ({type(e).__name__}: {e}).") from e


def persistent_state_dict(obj: PersistentObject, prefix: str = "") -> dict[str, torch.Tensor]:
    """Flatten a persistent module's ``_parameters``/``_buffers``/``_modules`` like ``state_dict()``."""
    state = obj.state
    non_persistent = set(state.get("_non_persistent_buffers_set") or ())
    out: dict[str, torch.Tensor] = {}
    for name, t in (state.get("_parameters") or {}).items():
        if t is not None:
            out[prefix + name] = t
    for name, t in (state.get("_buffers") or {}).items():
        if t is not None and name not in non_persistent:
            out[prefix + name] = t
    for name, m in (state.get("_modules") or {}).items():
        if isinstance(m, PersistentObject):
            out.update(persistent_state_dict(m, prefix + name + "."))
        elif m is not None:
            raise InvalidCheckpointError(f"Unexpected submodule {prefix + name} in network pickle.")
    return out


def nvlabs_config(init_kwargs: Mapping[str, Any], sd: Mapping[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Our config from NVlabs ``Generator.init_kwargs`` (channels taken from the tensors when given)."""
    kw = dict(init_kwargs)
    mk = dict(kw.get("mapping_kwargs") or {})
    sk = dict(kw.get("synthesis_kwargs") or {})
    if int(kw.get("c_dim", 0) or 0) != 0:
        raise InvalidCheckpointError("Class-conditional generators (c_dim > 0) are not supported.")
    if sk.get("architecture", "skip") != "skip":
        raise InvalidCheckpointError(f"Only the 'skip' generator architecture is supported, "
                                     f"not {sk.get('architecture')!r}.")
    if any(d.get("activation", "lrelu") != "lrelu" for d in (mk, sk)):
        raise InvalidCheckpointError("Only leaky-ReLU StyleGAN2 generators are supported.")
    if not sk.get("use_noise", True):
        raise InvalidCheckpointError("Generators built with use_noise=False are not supported.")
    if mk.get("embed_features") not in (None, 0) or mk.get("layer_features") not in (None, kw.get("w_dim")):
        raise InvalidCheckpointError("Non-standard mapping network widths are not supported.")
    res = int(kw["img_resolution"])
    if sd is not None:
        channels = {4: int(sd["synthesis.b4.const"].shape[0])}
        for r in [2 ** i for i in range(3, int(np.log2(res)) + 1)]:
            channels[r] = int(sd[f"synthesis.b{r}.conv0.weight"].shape[0])
        table: dict[str, Any] = {"channels": channels}
    else:
        table = {"channel_base": int(sk.get("channel_base", 32768)), "channel_max": int(sk.get("channel_max", 512))}
    return normalize_config(
        resolution=res, img_channels=int(kw.get("img_channels", 3)), z_dim=int(kw["z_dim"]), w_dim=int(kw["w_dim"]),
        mapping_layers=int(mk.get("num_layers", 8)), mapping_lr_mul=float(mk.get("lr_multiplier", 0.01)),
        w_avg_beta=mk.get("w_avg_beta", 0.995), conv_clamp=sk.get("conv_clamp"),
        num_fp16_res=int(sk.get("num_fp16_res", 0)), resample_filter=list(sk.get("resample_filter", [1, 3, 3, 1])),
        **table)


def nvlabs_to_ours(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """NVlabs ``G_ema`` state dict -> ours: identical names, minus the fixed ``resample_filter`` buffers."""
    return {k: v for k, v in sd.items() if not FIXED_FILTER_KEYS.search(k)}


def read_nvlabs_pickle(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, our state_dict) of ``G_ema`` in an NVlabs network pickle, without executing any code."""
    with open(path, "rb") as f:
        try:
            data = restricted_load(f)
        except InvalidCheckpointError as e:
            cut = isinstance(e.__cause__, EOFError) or "truncated" in str(e)
            raise InvalidCheckpointError(
                f"{path} is damaged or incomplete (cut short): download it again." if cut else f"{path}: {e}") from e
    if isinstance(data, tuple):
        raise InvalidCheckpointError(f"{path} is a TensorFlow-era StyleGAN2 pickle; convert it to a PyTorch "
                                     "network pickle with stylegan2-ada-pytorch's legacy.py first.")
    if not isinstance(data, Mapping) or not isinstance(data.get("G_ema"), PersistentObject):
        raise InvalidCheckpointError(f"{path} is not a StyleGAN2 network pickle (no 'G_ema' network).")
    G = data["G_ema"]  # other entries (G, D, augment_pipe, ...) are ignored
    if G.class_name.rsplit(".", 1)[-1] != "Generator":
        raise InvalidCheckpointError(f"{path}: 'G_ema' is a {G.class_name}, not a StyleGAN2 Generator.")
    init_kwargs = G.state.get("_init_kwargs") or {}
    sd = persistent_state_dict(G)
    cfg = nvlabs_config(init_kwargs, sd)
    return cfg, nvlabs_to_ours(sd)


# ----------------------------------------------------------------------------------------------
# entry points

def detect_format(path: str | os.PathLike) -> str:
    """'safetensors', 'rosinality' (torch zip / legacy torch.save) or 'nvlabs' (plain pickle)."""
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:4] == b"PK\x03\x04":
        return "rosinality"
    if head[:1] == b"\x80":
        # legacy (non-zip) torch.save starts with a pickled magic number (a long), network pickles with a dict
        return "rosinality" if head[2:3] in (b"\x8a",) else "nvlabs"
    raise InvalidCheckpointError(f"{path} is not a safetensors file, PyTorch checkpoint or network pickle.")


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, our state_dict) from any supported file."""
    fmt = detect_format(path)
    if fmt == "safetensors":
        return read_safetensors_generator(path)
    if fmt == "nvlabs":
        return read_nvlabs_pickle(path)
    cfg, sd, has_w_avg = read_rosinality(path)
    if not has_w_avg:
        sd["mapping.w_avg"] = None  # estimated after building
    return cfg, sd


def load_generator(path: str | os.PathLike, device: torch.device | str | None = None) -> Generator:
    """Load a generator from our safetensors, a rosinality ``.pt`` or an NVlabs ``.pkl`` (eval mode, fp32)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidCheckpointError(f"Generator file {path} does not exist.")
    cfg, sd = read_checkpoint(path)
    estimate = sd.get("mapping.w_avg", 0) is None
    if estimate:
        sd["mapping.w_avg"] = torch.zeros(int(cfg["w_dim"]))
    with torch.device("meta"):
        G = Generator.from_config(cfg)
    G = G.to_empty(device="cpu")
    _init_non_persistent(G)
    try:
        G.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    except RuntimeError as e:
        raise InvalidCheckpointError(f"{path}: tensors do not match the generator config ({e}).") from e
    if estimate:
        warnings.warn(f"{path} has no latent_avg; estimating w_avg from 10000 random z.", stacklevel=2)
        G.w_avg = G.estimate_w_avg()
    G.eval().requires_grad_(False)
    return G.to(device) if device is not None else G


def _init_non_persistent(G: Generator) -> None:
    """Refill the fixed filter buffers that ``to_empty`` left uninitialised."""
    from core.stylegan2 import _filter_2d, _Resample

    f = G.config["resample_filter"]
    for m in G.modules():
        if isinstance(m, _Resample):
            m.kernel = _filter_2d(f, 4.0, m.kernel.shape[0])


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Convert a rosinality ``.pt`` or NVlabs ``.pkl`` (or our own file) to our safetensors format."""
    G = load_generator(src)
    return save_generator(G, dst, metadata={"source_file": Path(src).name, "source_format": detect_format(src)})
