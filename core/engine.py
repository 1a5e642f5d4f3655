"""The editing engine: one object over a model pack that turns captions into faces and edits faces.

- ``synthesize``: text -> N faces. As in AnyFace, the text code sets the LAST layers of W+ (attributes)
  and the mapping network on random z sets the FIRST ``coarse_layers`` (pose, topology, diversity);
  paper: 4 of 18 layers, scaled with ``num_ws`` here.
- ``edit``: a source W+ code (an inverted photo or a generated face) + captions + a strength in [0, 1].
  The split between source layers and text layers moves continuously from the last layer (strength 0:
  the source, bit for bit) down to ``identity_layers`` (strength 1), blending each layer between source
  and text as the split passes it, so the result moves smoothly away from the source; the first
  ``identity_layers`` layers are never touched.
- Text codes are cached per (caption set, method, seed, n, diversity): one slider step with a cached
  code costs one synthesis call.

Three text-to-latent methods: ``"cmd"`` (AnyFace Cross Modal Distillation), ``"cvae"`` (Fast
text2StyleGAN conditional VAE), ``"knn"`` (the training-free latent bank). ``Engine.methods`` lists the
ones the loaded pack has. Results are returned on the CPU: images as uint8 numpy, codes as float32 tensors.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from core.cmd import CMD
from core.cvae import CVAE
from core.device import pick_device
from core.errors import AnyFaceError, CancelledError, CaptionError, InvalidCheckpointError
from core.latent_bank import LatentBank
from core.wordmap import WordMap

ProgressFn = Callable[[int, int], None]
CancelFn = Callable[[], bool]

METHODS = ("cmd", "cvae", "knn")
METHOD_TITLES = {"cmd": "AnyFace (CMD)", "cvae": "Text-free (Fast-t2S CVAE)", "knn": "KNN latent bank"}


class MethodUnavailableError(AnyFaceError, ValueError):
    """The requested text-to-latent method is not part of the loaded pack."""

    title = "Method not available"


@dataclass
class FaceResult:
    """One face: ``image`` uint8 [H, W, 3] and its code ``ws`` [num_ws, w_dim] (float32, CPU)."""

    image: np.ndarray
    ws: torch.Tensor
    seed: int | None
    captions: tuple[str, ...]
    method: str | None
    strength: float | None = None
    diversity: float | None = None
    identity_layers: int | None = None
    pack_id: str | None = None
    elapsed_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def save_latent(self, path, **extra) -> Path:
        """Save ``ws`` with this result's provenance (see ``core.latents.save_latent``)."""
        from core.latents import save_latent

        meta = dict(strength=self.strength, diversity=self.diversity, identity_layers=self.identity_layers)
        meta.update(extra)
        return save_latent(path, self.ws, captions=list(self.captions), seed=self.seed, method=self.method,
                           pack_id=self.pack_id, **{k: v for k, v in meta.items() if v is not None})


def clean_captions(captions: str | Iterable[str]) -> tuple[str, ...]:
    """Normalise (NFC, collapse whitespace), drop empty ones and duplicates, keep the user's order.
    Raises ``CaptionError`` when nothing is left."""
    if isinstance(captions, str):
        captions = [captions]
    elif isinstance(captions, (bytes, bytearray)):  # iterating bytes would give captions "97", "98", ...
        raise CaptionError("Captions must be text (str), not bytes: decode them first, e.g. data.decode('utf-8').")
    out: list[str] = []
    seen: set[str] = set()
    for c in captions or ():
        if c is None:
            continue
        c = " ".join(unicodedata.normalize("NFC", str(c)).split())
        if c and c not in seen:
            seen.add(c)
            out.append(c)
    if not out:
        raise CaptionError("No caption to work with: type at least one description of the face "
                           "(e.g. 'a young woman with red hair').")
    return tuple(out)


def sub_seed(seed: int, salt: str) -> int:
    """A decorrelated 63-bit seed derived from (seed, salt): independent streams for z, CVAE and KNN."""
    h = hashlib.sha256(f"{int(seed)}:{salt}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def coarse_layers_for(num_ws: int) -> int:
    """Layers taken from the mapping network in synthesis (paper: 4 of 18), at least 1, below num_ws."""
    return int(min(max(1, round(4 * num_ws / 18)), max(num_ws - 1, 1)))


def layer_weights(num_ws: int, strength: float, identity_layers: int) -> torch.Tensor:
    """Per-layer text weight a_j in [0, 1] for an edit: the split position s = num_ws - strength *
    (num_ws - identity_layers) moves from the last layer to ``identity_layers``; a_j = clamp(j + 1 - s, 0, 1)
    (layers at or past the split are text, the layer the split is in is blended by its fraction)."""
    s = num_ws - float(strength) * (num_ws - identity_layers)
    j = torch.arange(num_ws, dtype=torch.float64)
    return (j + 1 - s).clamp(0.0, 1.0).to(torch.float32)


def blend_layers(source: torch.Tensor, target: torch.Tensor, strength: float, identity_layers: int) -> torch.Tensor:
    """Edit blend of two codes [..., num_ws, w_dim] (see :func:`layer_weights`)."""
    a = layer_weights(source.shape[-2], strength, identity_layers).to(source.device).unsqueeze(-1)
    return torch.lerp(source, target.to(source), a)


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] in [-1, 1] -> uint8 numpy [N, H, W, 3] on CPU."""
    x = ((img.detach().float().clamp(-1, 1) + 1) * 127.5).round_().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def _tick(progress: ProgressFn | None, done: int, total: int) -> None:
    if progress is not None:
        progress(done, total)


def _check(should_cancel: CancelFn | None, what: str) -> None:
    if should_cancel is not None and should_cancel():
        raise CancelledError(f"{what} was cancelled.")


def _check_writable(folder: Path, what: str) -> None:
    """Create ``folder`` and a file in it (removed again), or raise ``OutputError`` saying where and why."""
    from core.atomic import probe_writable
    from core.errors import OutputError

    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe_writable(folder)
    except OSError as e:
        raise OutputError(f"Cannot save {what} in {folder}: {e.strerror or e}. Make that folder writable, or set "
                          "ANYFACE_DATA_DIR to a writable folder.") from e


def _by_role_names(manifest, pack_id: str) -> list[str]:
    """The roles of a pack's files in the manifest."""
    return sorted({wf.role for wf in manifest.pack_files(pack_id)})


def bank_cache_path(pack_id: str) -> Path:
    """Where a KNN bank built on this machine for a pack without one is kept (user data dir)."""
    from core.weights import user_data_dir

    return user_data_dir() / "banks" / f"{pack_id}.safetensors"


class Engine:
    """Text-to-face synthesis and text-driven editing over one generator + CLIP pair.

    ``Engine(generator, clip, cmd=None, cvae=None, bank=None, encoder=None, pack_id="custom", device=None)``;
    ``Engine.from_pack(pack_id="tiny", device=None)`` loads a pack from the weights manifest.
    Attributes: ``pack_id, device, resolution, num_ws, w_dim, coarse_layers, methods``.
    Not thread-safe for concurrent calls: own it from one worker thread.
    """

    base_truncation = 0.7  # z truncation psi at diversity 1 (psi = min(1, base * diversity))
    knn_k = 16
    knn_m = 3

    def __init__(self, generator, clip, cmd: CMD | None = None, cvae: CVAE | None = None,
                 bank: LatentBank | None = None, encoder=None, pack_id: str = "custom",
                 device: torch.device | str | None = None, *, cache_size: int = 64,
                 coarse_layers: int | None = None, default_method: str | None = None, word_map=None):
        self.device = device if isinstance(device, torch.device) else pick_device(device)
        self.pack_id = pack_id
        self.generator = generator.to(self.device).eval()
        self.clip = self._to_device(clip)
        self.cmd = cmd.to(self.device).eval() if cmd is not None else None
        self.cvae = cvae.to(self.device).eval() if cvae is not None else None
        self._bank = bank
        self.bank_origin = "pack"  # "built here" for a bank from build_bank (from_pack finds it next time)
        self.encoder = self._to_device(encoder) if encoder is not None else None
        self._word_map = word_map  # core.wordmap.WordMap of the CLIP's vocabulary, or None (captions read as typed)
        self.z_dim = int(generator.z_dim)
        self.num_ws = int(generator.num_ws)
        self.w_dim = int(generator.w_dim)
        self.resolution = int(generator.img_resolution)
        self.coarse_layers = coarse_layers_for(self.num_ws)
        if default_method is not None and default_method not in METHODS:
            raise ValueError(f"default_method must be one of {', '.join(METHODS)}, got {default_method!r}")
        self.preferred_method = default_method  # a pack's measured best method comes first in ``methods``
        if coarse_layers is not None:  # a pack's own split (its CMD was trained with it)
            if not 1 <= int(coarse_layers) < self.num_ws:
                raise ValueError(f"coarse_layers must be in 1..{self.num_ws - 1}, got {coarse_layers}")
            self.coarse_layers = int(coarse_layers)
        self._check_compatible()
        self._cache_size = int(cache_size)
        self._emb_cache: OrderedDict = OrderedDict()
        self._code_cache: OrderedDict = OrderedDict()
        self._lock = threading.RLock()

    def _to_device(self, model):
        if hasattr(model, "to"):
            moved = model.to(self.device)
            model = moved if moved is not None else model
        if hasattr(model, "eval"):
            model.eval()
        return model

    def _check_compatible(self) -> None:
        emb = int(getattr(self.clip, "embed_dim", 0))
        problems = []
        for name, m in (("CMD", self.cmd), ("CVAE", self.cvae), ("KNN bank", self.bank)):
            if m is None:
                continue
            if (m.num_ws, m.w_dim) != (self.num_ws, self.w_dim):
                problems.append(f"{name} makes codes {m.num_ws}x{m.w_dim}, the generator takes {self.num_ws}x{self.w_dim}")
            if emb and m.embed_dim != emb:
                problems.append(f"{name} expects CLIP embeddings of width {m.embed_dim}, the CLIP gives {emb}")
        if problems:
            raise InvalidCheckpointError(f"The files of pack '{self.pack_id}' do not belong together: "
                                         + "; ".join(problems) + ". Rebuild them with training/ for this "
                                         "generator and CLIP.")

    # ------------------------------------------------------------------------------------------------------
    @classmethod
    def from_pack(cls, pack_id: str = "tiny", device: torch.device | str | None = None, *, manifest=None,
                  progress: ProgressFn | None = None, should_cancel: CancelFn | None = None,
                  skip_bank: bool = False) -> "Engine":
        """Load every file of a pack (roles generator, clip, cmd, cvae, knn, encoder, wordmap; the last five
        optional).
        A KNN bank built with :meth:`build_bank` (kept in the user data dir) is used in place of the pack's own.

        Every file's size and sha256 are checked against the manifest first (the hash once per file version; see
        ``core.weights.verify_file``). A file that fails, or that its loader cannot read, raises
        ``CorruptWeightsError`` naming the file, where it is and where to get it again. The pack's own bank is
        checked only when it is used: not while a bank built here replaces it, and not with ``skip_bank`` (to build
        one: a missing or corrupt pack bank must not stop that)."""
        from core.weights import Manifest, locate_pack_files

        dev = device if isinstance(device, torch.device) else pick_device(device)
        manifest = manifest if manifest is not None else Manifest.load()
        user_bank = not skip_bank and bank_cache_path(pack_id).is_file()
        roles = [r for r in _by_role_names(manifest, pack_id) if r != "knn" or not (skip_bank or user_bank)]
        files = locate_pack_files(pack_id, manifest=manifest, verify=True, should_cancel=should_cancel, roles=roles)
        steps = ["generator", "clip", "cmd", "cvae", "knn", "encoder", "wordmap"]
        loaded: dict[str, Any] = {}
        for i, role in enumerate(steps):
            _check(should_cancel, "Loading the models")
            wf, path = files.get(role, (None, None))
            if role == "knn" and skip_bank:
                _tick(progress, i + 1, len(steps))
                continue
            if role == "knn" and user_bank:  # one the user built: it replaces the pack's
                built = _load_user_bank(bank_cache_path(pack_id), loaded)
                if built is not None:
                    loaded[role] = built
                    loaded["bank_origin"] = "built here"
                    _tick(progress, i + 1, len(steps))
                    continue
                # unusable: the pack's own, checked now
                files.update(locate_pack_files(pack_id, manifest=manifest, verify=True, should_cancel=should_cancel,
                                               roles=["knn"]))
                wf, path = files.get(role, (None, None))
            if path is not None:
                loaded[role] = _load_role(role, Path(path), dev, wf)
            _tick(progress, i + 1, len(steps))
        pack = manifest.pack(pack_id)
        gen = loaded["generator"]
        if pack.resolution and getattr(gen, "img_resolution", pack.resolution) != pack.resolution:
            from core.errors import CorruptWeightsError

            wf, path = files["generator"]
            raise CorruptWeightsError(wf.id, path, f"it holds a {gen.img_resolution} px generator, but pack "
                                      f"'{pack_id}' is {pack.resolution} px", wf.where_to_get())
        engine = cls(gen, loaded["clip"], cmd=loaded.get("cmd"), cvae=loaded.get("cvae"),
                     bank=loaded.get("knn"), encoder=loaded.get("encoder"), pack_id=pack_id, device=dev,
                     coarse_layers=pack.coarse_layers, default_method=pack.default_method,
                     word_map=loaded.get("wordmap"))
        engine.bank_origin = loaded.get("bank_origin", "pack")
        return engine

    @property
    def methods(self) -> list[str]:
        """Text-to-latent methods available with the loaded models, in preference order."""
        have = {"cmd": self.cmd is not None and not self._waits_for_bank("cmd"), "knn": self.bank is not None,
                "cvae": self.cvae is not None and not self._waits_for_bank("cvae")}
        order = sorted(METHODS, key=lambda m: m != self.preferred_method)  # stable: the rest keep their order
        return [m for m in order if have[m]]

    def bank_label(self, method: str | None) -> str | None:
        """Which KNN bank ``method`` reads (for the metadata of what it makes: another bank gives other faces for
        the same seed), or None when it reads none: "pack's own, 20000 faces" / "built here, 200 faces, seed 0"."""
        uses = method == "knn" or (method in ("cmd", "cvae")
                                   and getattr({"cmd": self.cmd, "cvae": self.cvae}[method], "condition_bank_k", 0))
        if not uses or self.bank is None:
            return None
        seed = (getattr(self.bank, "config", None) or {}).get("seed")
        return (("built here" if self.bank_origin == "built here" else "pack's own") + f", {len(self.bank)} faces"
                + ("" if seed is None or self.bank_origin != "built here" else f", seed {seed}"))

    def _waits_for_bank(self, method: str) -> bool:
        """A loaded CMD or CVAE whose file says it reads text through the KNN bank (``condition_bank_k``), and no
        bank is loaded."""
        model = {"cmd": self.cmd, "cvae": self.cvae}.get(method)
        return model is not None and bool(getattr(model, "condition_bank_k", 0)) and self.bank is None

    @property
    def needs_bank(self) -> list[str]:
        """Methods that are loaded but wait for a KNN bank (see :meth:`_waits_for_bank`)."""
        return [m for m in ("cmd", "cvae") if self._waits_for_bank(m)]

    @property
    def default_method(self) -> str | None:
        return self.methods[0] if self.methods else None

    def resolve_method(self, method: str | None = None) -> str:
        """The method a request for ``method`` (None: the default) uses, or ``MethodUnavailableError`` saying why it
        cannot be used and how to get it (checked once before a batch, not once per photo)."""
        return self._method(method)

    def _method(self, method: str | None) -> str:
        # none asked: the first available, else the pack's preferred one (what the user would get with its files)
        method = (method or self.default_method or self.preferred_method or "cmd").lower()
        if method not in METHODS:
            raise MethodUnavailableError(f"Unknown method '{method}'. Available: {', '.join(METHODS)}.")
        if method not in self.methods:
            have = ", ".join(self.methods) or "none"
            build_bank = "build a KNN bank (Models > Build KNN bank…, or `anyface models build-bank`)"
            if self._waits_for_bank(method):  # loaded, but it needs the bank
                k = getattr(self, method).condition_bank_k
                raise MethodUnavailableError(
                    f"Method '{method}' ({METHOD_TITLES[method]}) of pack '{self.pack_id}' reads text through the "
                    f"pack's KNN bank (condition_bank_k={k}), which is not loaded. "
                    f"Available here: {have}. To get it, restore the pack's knn_bank file or {build_bank}.")
            if method == "knn":
                raise MethodUnavailableError(
                    f"Method 'knn' ({METHOD_TITLES['knn']}) needs a KNN bank, and none is loaded for pack "
                    f"'{self.pack_id}'. Available here: {have}. To get it, restore the pack's knn_bank file (if it "
                    f"has one) or {build_bank}.")
            raise MethodUnavailableError(f"Method '{method}' ({METHOD_TITLES[method]}) is not part of pack "
                                         f"'{self.pack_id}'. Available here: {have}. To get it, train it with "
                                         "`python -m training.build_pack` for this generator and CLIP.")
        return method

    # ------------------------------------------------------------------------------------------------------
    def _cache_put(self, cache: OrderedDict, key, value) -> None:
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > self._cache_size:
            cache.popitem(last=False)

    def clear_cache(self) -> None:
        with self._lock:
            self._emb_cache.clear()
            self._code_cache.clear()

    @property
    def bank(self):
        """The KNN latent bank (core.latent_bank.LatentBank) or None."""
        return self._bank

    @bank.setter
    def bank(self, value) -> None:
        """Another bank gives other KNN codes, and other CMD/CVAE codes where their file reads text through it: the
        cached codes go."""
        self._bank = value
        if hasattr(self, "_code_cache"):
            self.clear_cache()

    @property
    def word_map(self):
        return self._word_map

    @word_map.setter
    def word_map(self, value) -> None:
        """Another word map reads captions differently: the cached embeddings and codes go."""
        self._word_map = value
        self.clear_cache()

    def read_as(self, caption: str) -> str:
        """The caption as the CLIP reads it: with the pack's word map, words the CLIP never saw get a known word
        appended ("a crimson mane" -> "a crimson mane, cherry hair"); without one, as typed. Appended words that
        would not fit in the text tower's tokens are left off (the caption's own words come first)."""
        if self._word_map is None:
            return caption
        extra = self._word_map.additions(caption)
        fits = getattr(self.clip, "fits_text", None)
        while extra and fits is not None and not fits(f"{caption}, {' '.join(extra)}"):
            extra.pop()
        return f"{caption}, {' '.join(extra)}" if extra else caption

    def readings(self, captions: str | Iterable[str]) -> list[tuple[str, tuple[str, ...]]]:
        """(word, known words it is read as) for each word of the cleaned captions that the CLIP never saw, in
        order, each word once; an empty tuple: the dictionary knows no word for it. Empty without a word map."""
        return self._word_map.readings_of(clean_captions(captions)) if self._word_map is not None else []

    @torch.inference_mode()
    def text_embedding(self, captions: str | Iterable[str]) -> torch.Tensor:
        """CLIP text embeddings [k, D] of the cleaned captions, in sorted order (so a set has one embedding
        matrix whatever the order it was typed in). Cached."""
        caps = clean_captions(captions)
        key = frozenset(caps)
        with self._lock:
            hit = self._emb_cache.get(key)
            if hit is not None:
                self._emb_cache.move_to_end(key)
                return hit
        emb = self.clip.encode_text([self.read_as(c) for c in sorted(caps)])
        emb = torch.as_tensor(emb).to(self.device, torch.float32)
        if emb.ndim != 2 or emb.shape[0] != len(caps):
            raise RuntimeError(f"CLIP encode_text returned {tuple(emb.shape)} for {len(caps)} captions")
        with self._lock:
            self._cache_put(self._emb_cache, key, emb)
        return emb

    @torch.inference_mode()
    def text_codes(self, captions: str | Iterable[str], method: str | None = None, n: int = 1, seed: int = 0,
                   diversity: float = 1.0) -> torch.Tensor:
        """Text codes ws [n, num_ws, w_dim] on the engine device (read-only: may be a cached/expanded view);
        code i depends only on (captions, method, seed + i, diversity). The CMD gives one code per caption set
        (the paper; with the file's ``condition_bank_k`` and ``layer_detail``, see CMD); a CMD file with a
        ``sample_spread`` s > 0 adds ``diversity * s * (mapping(z_i) - w_avg)`` to it, z_i from seed + i. Cached per (caption set, method, seed, n, diversity)."""
        caps = clean_captions(captions)
        method = self._method(method)
        if n < 1:
            raise ValueError("n must be >= 1")
        diversity = float(diversity)
        if not math.isfinite(diversity) or diversity < 0:
            raise ValueError(f"diversity must be >= 0, got {diversity}")
        spread = float(self.cmd.sample_spread) * diversity if method == "cmd" else 0.0
        one_code = method == "cmd" and not spread  # one code per caption set, whatever the seed and n
        # the model's sampling settings are part of the key: a caller may change them on a loaded model
        model = {"cmd": self.cmd, "cvae": self.cvae}.get(method)
        settings = (id(model), *(getattr(model, a, None) for a in ("condition_bank_k", "condition_bank_m",
                                                                     "sample_spread", "sample_temperature",
                                                                     "layer_detail")),
                    self.knn_k, self.knn_m)
        if one_code:
            key = (frozenset(caps), method, settings)
        else:
            key = (frozenset(caps), method, int(seed), int(n), diversity, spread, settings)
        with self._lock:
            hit = self._code_cache.get(key)
            if hit is not None:
                self._code_cache.move_to_end(key)
                return hit.expand(n, -1, -1) if one_code else hit
        emb = self.text_embedding(caps)  # [k, D]
        if method == "cmd":
            k = int(getattr(self.cmd, "condition_bank_k", 0))
            if k:  # one more member: the set's direction carried to the image side by the bank (see CMD)
                e = F.normalize(emb.mean(0), dim=0)
                emb = torch.cat([emb, self.bank.image_side(e, k).to(emb).unsqueeze(0)])
            codes = self.cmd(emb.unsqueeze(0))  # [1, num_ws, w_dim]
            if hasattr(self.cmd, "as_sampled"):  # the file's layer_detail (see CMD)
                codes = self.cmd.as_sampled(codes)
            if spread:  # a random generator face's offset from the average face, scaled, for face i
                G = self.generator
                z = torch.stack([torch.randn(G.z_dim,
                                             generator=torch.Generator().manual_seed(sub_seed(int(seed) + i, "cmd")))
                                 for i in range(n)]).to(self.device)
                w = torch.cat([G.mapping(z[i:i + 1]) for i in range(n)])  # [n, num_ws, w_dim], one at a time
                codes = codes.to(w) + spread * (w - G.w_avg.to(w))
        else:
            e = F.normalize(emb.mean(0), dim=0)  # the set's direction in CLIP space
            if method == "cvae":
                k, m = self.cvae.condition_bank_k, min(self.cvae.condition_bank_m, self.cvae.condition_bank_k)
                conds = [e] * n
                if k and m and diversity > 0:  # face i: the mean of its own m of the k nearest (see CVAE)
                    conds = [self.bank.image_side(e, k, m=m, seed=sub_seed(int(seed) + i, "cvae-bank")).to(e)
                             for i in range(n)]
                elif k:  # the text embedding carried to the image side (see CVAE)
                    conds = [self.bank.image_side(e, k).to(e)] * n
                codes = torch.cat([self.cvae.sample(conds[i], 1, temperature=diversity,
                                                    generator=sub_seed(int(seed) + i, "cvae"))
                                   for i in range(n)])
            else:
                codes = torch.cat([self.bank.query(e, k=self.knn_k, m=self.knn_m, n=1,
                                                   seed=sub_seed(int(seed) + i, "knn"), diversity=diversity)
                                   for i in range(n)])
        codes = codes.to(self.device, torch.float32).contiguous()
        assert codes.shape[1:] == (self.num_ws, self.w_dim), codes.shape
        with self._lock:
            self._cache_put(self._code_cache, key, codes)
        return codes.expand(n, -1, -1) if one_code else codes

    # ------------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _render_batch(self, ws: torch.Tensor) -> np.ndarray:
        img = self.generator.synthesis(ws.to(self.device, torch.float32), noise_mode="const")  # [N,3,H,W] in [-1,1]
        return to_uint8(img)

    def render(self, ws, *, batch_size: int = 8, progress: ProgressFn | None = None,
               should_cancel: CancelFn | None = None) -> np.ndarray:
        """ws [num_ws, w_dim] -> uint8 [H, W, 3]; ws [N, num_ws, w_dim] -> uint8 [N, H, W, 3]."""
        ws = torch.as_tensor(ws)
        single = ws.ndim == 2
        ws = ws.reshape(-1, self.num_ws, self.w_dim) if ws.shape[-2:] == (self.num_ws, self.w_dim) else None
        if ws is None:
            raise ValueError(f"ws must be [num_ws={self.num_ws}, w_dim={self.w_dim}] or [N, num_ws, w_dim]")
        if not bool(torch.isfinite(ws).all()):
            raise ValueError("ws holds NaN or infinite values: it is not a face code")
        out = []
        for i in range(0, ws.shape[0], batch_size):
            _check(should_cancel, "Rendering")
            out.append(self._render_batch(ws[i:i + batch_size]))
            _tick(progress, min(i + batch_size, ws.shape[0]), ws.shape[0])
        imgs = np.concatenate(out)
        return imgs[0] if single else imgs

    @torch.inference_mode()
    def synthesize(self, captions: str | Sequence[str], n: int = 4, seed: int = 0, method: str | None = None,
                   diversity: float = 1.0, *, truncation_psi: float | None = None, batch_size: int = 1,
                   progress: ProgressFn | None = None, should_cancel: CancelFn | None = None) -> list[FaceResult]:
        """Text -> ``n`` faces. Face i has seed ``seed + i`` and is reproduced alone by
        ``synthesize(captions, 1, seed + i, ...)``, bit for bit: each face is mapped and rendered on its own
        (``batch_size`` 1; a larger one renders faster on a GPU but batched kernels may round differently, by
        one level of 255 at most). The text code sets layers ``coarse_layers..num_ws``,
        the mapping network on random z the first ``coarse_layers``. ``diversity`` (>= 0) scales the
        randomness: the CVAE temperature, the KNN mixing, the CMD file's spread, and z truncation
        (psi = min(1, 0.7 * diversity) unless ``truncation_psi`` is given)."""
        t0 = time.perf_counter()
        caps = clean_captions(captions)
        method = self._method(method)
        if isinstance(n, bool) or int(n) != n or n < 1:
            raise ValueError(f"n must be a whole number >= 1, got {n!r}")
        n = int(n)
        if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
        batch_size = int(batch_size)
        if truncation_psi is not None and not math.isfinite(float(truncation_psi)):
            raise ValueError(f"truncation_psi must be a finite number, got {truncation_psi!r}")
        batches = math.ceil(n / batch_size)
        total = 1 + batches
        _tick(progress, 0, total)
        _check(should_cancel, "Generating faces")
        codes = self.text_codes(caps, method, n, seed, diversity)  # [n, num_ws, w_dim]
        psi = float(truncation_psi) if truncation_psi is not None else min(1.0, self.base_truncation * float(diversity))
        z = torch.stack([torch.randn(self.z_dim, generator=torch.Generator().manual_seed(sub_seed(seed + i, "z")))
                         for i in range(n)]).to(self.device)
        # one face at a time: a batched matrix product can round differently from a single one
        ws_z = torch.cat([self.generator.mapping(z[i:i + 1], truncation_psi=psi) for i in range(n)])  # [n, num_ws, w_dim]
        c = self.coarse_layers
        ws = torch.cat([ws_z[:, :c], codes[:, c:]], 1)
        _tick(progress, 1, total)
        images = []
        for b in range(batches):
            _check(should_cancel, "Generating faces")
            images.append(self._render_batch(ws[b * batch_size:(b + 1) * batch_size]))
            _tick(progress, 2 + b, total)
        images = np.concatenate(images)
        ws_cpu = ws.float().cpu()
        dt = (time.perf_counter() - t0) / n
        return [FaceResult(image=images[i], ws=ws_cpu[i].clone(), seed=int(seed) + i, captions=caps, method=method,
                           diversity=float(diversity), pack_id=self.pack_id, elapsed_s=dt,
                           extra={"truncation_psi": psi, "coarse_layers": c,
                                 **({"bank": bl} if (bl := self.bank_label(method)) else {})}) for i in range(n)]

    @torch.inference_mode()
    def edit(self, source_ws, captions: str | Sequence[str], strength: float, method: str | None = None,
             identity_layers: int | None = None, *, seed: int = 0, diversity: float = 0.0,
             progress: ProgressFn | None = None, should_cancel: CancelFn | None = None) -> FaceResult:
        """Edit a face code ``source_ws`` [num_ws, w_dim] toward the captions.

        ``strength`` in [0, 1]: 0 returns the source exactly (same values, bit for bit); the distance to the
        source grows strictly with strength (layers blend in one after another, from the last layer down to
        ``identity_layers``). The first ``identity_layers`` layers (default ``coarse_layers``; 0 ..
        num_ws - 1) always keep the source. ``seed``/``diversity`` pick the text code for the CVAE/KNN
        methods and for a CMD file with a ``sample_spread`` (diversity 0: the most typical code)."""
        t0 = time.perf_counter()
        src = torch.as_tensor(source_ws).detach()
        if src.ndim == 3 and src.shape[0] == 1:
            src = src[0]
        if src.shape != (self.num_ws, self.w_dim):
            raise ValueError(f"source_ws must be [{self.num_ws}, {self.w_dim}], got {tuple(src.shape)}")
        src = src.to("cpu", torch.float32)
        if not bool(torch.isfinite(src).all()):
            raise ValueError("source_ws holds NaN or infinite values: it is not a face code")
        strength = float(strength)
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        L = self.coarse_layers if identity_layers is None else int(identity_layers)
        if not 0 <= L < self.num_ws:
            raise ValueError(f"identity_layers must be in [0, {self.num_ws - 1}], got {identity_layers}")
        caps = clean_captions(captions)
        method = self._method(method)
        _tick(progress, 0, 2)
        _check(should_cancel, "The edit")
        if strength == 0.0:
            ws_out = src.clone()
        else:
            code = self.text_codes(caps, method, 1, seed, diversity)[0]
            ws_out = blend_layers(src.to(self.device), code, strength, L)
        _tick(progress, 1, 2)
        _check(should_cancel, "The edit")
        image = self._render_batch(ws_out.unsqueeze(0))[0]
        _tick(progress, 2, 2)
        return FaceResult(image=image, ws=ws_out if strength == 0.0 else ws_out.float().cpu(), seed=int(seed),
                          captions=caps, method=method, strength=strength, diversity=float(diversity),
                          identity_layers=L, pack_id=self.pack_id, elapsed_s=time.perf_counter() - t0,
                          extra={"bank": bl} if (bl := self.bank_label(method)) and strength else {})

    # ------------------------------------------------------------------------------------------------------
    def build_bank(self, size: int = 20000, batch: int = 32, *, truncation: float = 1.0, seed: int = 0,
                   save: bool = True, progress: ProgressFn | None = None,
                   should_cancel: CancelFn | None = None) -> LatentBank:
        """Build a KNN bank for this generator + CLIP (enables the "knn" method); saved to
        :func:`bank_cache_path` when ``save`` so ``from_pack`` finds it next time. Where it cannot be saved is
        found out before any face is sampled (``OutputError``), not after minutes of work."""
        if save:
            _check_writable(bank_cache_path(self.pack_id).parent, "the KNN bank")
        bank = LatentBank.build(self.generator, self.clip, size=size, batch=batch, truncation=truncation, seed=seed,
                                progress=progress, should_cancel=should_cancel)
        if save:
            bank.save(bank_cache_path(self.pack_id))
        self.bank = bank
        self.bank_origin = "built here"
        self._check_compatible()
        self.clear_cache()  # cached KNN codes, and CVAE codes that read text through the bank, came from the old one
        return bank

    def bank_bytes(self, size: int) -> int:
        """Disk size of a bank of ``size`` entries made by :meth:`build_bank` (float32 w, float16 embedding)."""
        return int(size) * (4 * self.w_dim + 2 * int(getattr(self.clip, "embed_dim", 0) or 512)) + 4096

    def refine(self, ws, captions: str | Sequence[str], *, steps: int = 20, lr: float = 0.03,
               first_layer: int | None = None, progress: ProgressFn | None = None,
               should_cancel: CancelFn | None = None) -> FaceResult:
        """CLIP-guided refinement: a few optimisation steps of layers ``first_layer..num_ws`` (default
        ``coarse_layers``) of ``ws`` [num_ws, w_dim] toward the captions' CLIP embedding. Works for any
        generator + CLIP pair, with no trained text-to-latent model (official packs, first use)."""
        from core.refine import refine as _refine

        t0 = time.perf_counter()
        caps = clean_captions(captions)
        src = torch.as_tensor(ws).detach().float().reshape(self.num_ws, self.w_dim)
        if not bool(torch.isfinite(src).all()):
            raise ValueError("ws holds NaN or infinite values: it is not a face code")
        text = self.text_embedding(caps)
        L = self.coarse_layers if first_layer is None else int(first_layer)
        with torch.enable_grad():
            res = _refine(self.generator, self.clip, src, text, steps=steps, lr=lr, first_layer=L,
                          progress=progress, should_cancel=should_cancel)
        with torch.no_grad():
            image = self._render_batch(res.ws.to(self.device).unsqueeze(0))[0]
        return FaceResult(image=image, ws=res.ws, seed=0, captions=caps, method="refine", pack_id=self.pack_id,
                          elapsed_s=time.perf_counter() - t0,
                          extra={"clip_similarity_before": res.similarity_before,
                                 "clip_similarity_after": res.similarity_after, "steps": steps})

    def invert(self, aligned_img: np.ndarray, tier: str = "fast", *, progress: ProgressFn | None = None,
               should_cancel: CancelFn | None = None) -> torch.Tensor:
        """Invert an aligned face (uint8 [H, W, 3]) to W+ [num_ws, w_dim] (CPU) with ``core.inversion``."""
        from core import inversion

        ws = inversion.invert(self.generator, aligned_img, tier=tier, encoder=self.encoder, clip=self.clip,
                              progress=progress, should_cancel=should_cancel)
        return torch.as_tensor(ws).detach().float().cpu().reshape(self.num_ws, self.w_dim)


def _load_role(role: str, path: Path, device: torch.device, wf=None):
    """Load one file of a pack. Whatever a loader cannot read (a same-size file with other bytes, a truncated
    pickle, a file of another kind) becomes ``CorruptWeightsError`` naming the file and where to get it again;
    errors that already say so pass through."""
    from core.checkpoints import load_generator
    from core.clip import load_clip
    from core.errors import CorruptWeightsError

    loaders = {"generator": lambda: load_generator(path, device=device), "clip": lambda: load_clip(path, device=device),
               "cmd": lambda: CMD.load(path, device), "cvae": lambda: CVAE.load(path, device),
               "knn": lambda: LatentBank.load(path), "encoder": lambda: _load_encoder(path, device),
               "wordmap": lambda: WordMap.load(path)}
    try:
        return loaders[role]()
    except AnyFaceError as e:
        if not isinstance(e, InvalidCheckpointError):  # missing dependencies, unsafe pickles, cancel: as they are
            raise
        err: Exception = e
    except (MemoryError, ImportError):
        raise
    except Exception as e:  # noqa: BLE001 - any other reader failure means a bad file
        if isinstance(e, RuntimeError) and "out of memory" in str(e).lower():
            raise  # torch.OutOfMemoryError and friends: the device, not the file
        err = e
    where = wf.where_to_get() if wf is not None else ""
    fid = wf.id if wf is not None else f"{role} ({path.name})"
    raise CorruptWeightsError(fid, path, f"the {role} file could not be read ({_short_reason(err)}); "
                              f"`anyface models verify` checks every file", where) from err


def _load_user_bank(path: Path, loaded: dict):
    """A KNN bank the user built (``Engine.build_bank``), or None when it cannot be read or does not fit the pack's
    generator and CLIP (a broken or outdated file must not stop the pack from loading: its own bank is used)."""
    import logging

    log = logging.getLogger("anyface.engine")
    try:
        bank = LatentBank.load(path)
    except Exception as e:  # noqa: BLE001 - any unreadable file
        log.warning("ignoring the KNN bank built earlier at %s (%s); using the pack's own. Build it again from Models.",
                    path, _short_reason(e))
        return None
    G, clip = loaded.get("generator"), loaded.get("clip")
    want = (getattr(G, "num_ws", bank.num_ws), getattr(G, "w_dim", bank.w_dim),
            getattr(clip, "embed_dim", bank.embed_dim))
    if (bank.num_ws, bank.w_dim, bank.embed_dim) != tuple(int(v) for v in want):
        log.warning("ignoring the KNN bank built earlier at %s: it was made for another generator or CLIP "
                    "(%s vs %s); using the pack's own. Build it again from Models.", path,
                    (bank.num_ws, bank.w_dim, bank.embed_dim), want)
        return None
    return bank


def _short_reason(e: BaseException) -> str:
    """The first line of a loader's error, without advice that does not apply (torch suggests turning its
    weights_only safety check off, which the app never does)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    for cut in ("Re-running `torch.load`", "Re-running torch.load", "In PyTorch 2.6"):
        if cut in text:
            text = text[:text.index(cut)].strip()
    text = text.rstrip(" .,:;") or type(e).__name__
    return f"{type(e).__name__}: {text}" if type(e).__name__ not in text else text


def _load_encoder(path, device):
    try:
        from core.inversion import Encoder
    except ImportError:
        return None
    return Encoder.load(path, device=device)
