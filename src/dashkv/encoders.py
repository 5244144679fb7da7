"""Asymmetric hash encoders: a query MLP and a key linear map per layer, saved like a HF model.

Query side (per layer, shared by the layer's query heads): ``v = W_skip[h] q + MLP(q)`` with the MLP
``D -> 256 -> 256 -> R``; code ``sign(v)`` (``tanh(beta v)`` in training). The per-head linear skip is
our addition: it lets :meth:`HashEncoders.random` start as exact SimHash (skip = the key projection,
MLP output zero) and lets training learn only the correction. A per-head MLP would cost 9x the
artifact size on SmolLM2 (over 100 MB), so the MLP is shared per layer.

Key side (per KV head): code ``sign(W_k (k - mu))``. Centring does not change the ranking of keys for a
query (``q.k = q.mu + q.(k - mu)`` and ``q.mu`` is the same for every key) but spreads the codes.
Codes are taken from post-RoPE vectors, the ones whose dot products the model actually uses.

Each layer also owns the learnable parameters of the mid tier (temperature, bias, residual bit
weights) and the calibration discounts, so one artifact carries everything training produced.
Encoders may name layers they leave to full attention (``dense_layers``): layers whose codes were
measured to miss what the layer needs. ``enable`` and :class:`~dashkv.cache.DashKVCache` keep them exact.
They may also share the high tier unevenly between layers (``budget_scales``, mean 1 over the tiered
layers): a layer whose codes need more keys takes them from one that loses nothing with fewer.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dashkv.codes import pack_bits, sign_bits
from dashkv.config import DEFAULT_BITS, SHARING, SUPPORTED_BITS, check_choice

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "encoders.safetensors"
STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def model_shape(model: nn.Module) -> dict:
    """The attention geometry of a transformers model: what encoders must match."""
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {
        "model_type": getattr(config, "model_type", "unknown"),
        "num_layers": config.num_hidden_layers,
        "num_heads": heads,
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
    }


def model_fingerprint(model: nn.Module) -> str | None:
    """A short digest of the model's first key projection, to tell fine-tunes of one shape apart; None
    where the model has no ``k_proj.weight`` parameter to read (a fused or swapped projection).

    Rounded to 2 decimals of the weight statistics so that dtype changes (fp32, bf16) keep it.
    """
    weight = next((p for n, p in model.named_parameters() if "k_proj.weight" in n), None)
    if weight is None:
        return None
    weight = weight.detach().float()
    stats = torch.stack([weight.mean(), weight.std(), weight.abs().max(), weight[0].sum(), weight[:, 0].sum()])
    text = ",".join(f"{v:.2f}" for v in stats.tolist())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class LayerHashEncoder(nn.Module):
    """Encoders and learnable tier parameters of one attention layer.

    Parameters
    ----------
    num_heads, num_kv_heads, head_dim : int
        Attention geometry ``H``, ``Hkv``, ``D``.
    bits : int
        Code length ``R``.
    hidden : int
        Width of the query MLP (paper: 256).
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, bits: int, hidden: int = 256):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.bits = num_heads, num_kv_heads, head_dim, bits
        self.query_mlp = nn.Sequential(
            nn.Linear(head_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, bits)
        )
        self.query_skip = nn.Parameter(torch.zeros(num_heads, bits, head_dim))
        self.key_proj = nn.Parameter(torch.zeros(num_kv_heads, bits, head_dim))
        self.register_buffer("key_center", torch.zeros(num_kv_heads, head_dim))
        self.mid_temperature = nn.Parameter(torch.ones(num_heads))
        self.mid_bias = nn.Parameter(torch.zeros(num_heads))
        self.residual = nn.Parameter(torch.zeros(num_heads, bits))
        self.spatial_discount = nn.Parameter(torch.tensor(-bits / 16.0))
        self.temporal_discount = nn.Parameter(torch.tensor(-bits / 16.0))

    def state_stamp(self) -> tuple:
        """Storage and version counter of every tensor: equal stamps mean unchanged weights (in-place
        updates, ``load_state_dict`` and optimiser steps bump the version, ``.to()`` moves the storage),
        for what is prepared from them once. The tensors are listed once (a decode step checks the stamp
        of every layer), and listed again after a tensor is assigned or ``.to()`` / ``.float()`` moved."""
        tensors = self.__dict__.get("_stamped")
        if tensors is None:
            tensors = self.__dict__["_stamped"] = list(itertools.chain(self.parameters(), self.buffers()))
        return tuple((t.data_ptr(), t._version) for t in tensors)

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, torch.Tensor):
            self.__dict__.pop("_stamped", None)
        super().__setattr__(name, value)

    def _apply(self, fn, recurse: bool = True):
        self.__dict__.pop("_stamped", None)  # buffers come back as new tensors
        return super()._apply(fn, recurse)

    def query_projection(self, query: torch.Tensor) -> torch.Tensor:
        """Real-valued query code before the sign. ``query`` Tensor[B, H, T, D] -> Tensor[B, H, T, R] fp32."""
        q = query.to(torch.float32)
        return torch.einsum("bhtd,hrd->bhtr", q, self.query_skip) + self.query_mlp(q)

    def key_projection(self, key: torch.Tensor) -> torch.Tensor:
        """Real-valued key code before the sign. ``key`` Tensor[B, Hkv, S, D] -> Tensor[B, Hkv, S, R] fp32."""
        centred = key.to(torch.float32) - self.key_center.unsqueeze(1)
        return torch.einsum("bksd,krd->bksr", centred, self.key_proj)

    @torch.no_grad()
    def encode_query(self, query: torch.Tensor) -> torch.Tensor:
        """Packed query codes: Tensor[B, H, T, D] -> Tensor[B, H, T, ceil(R/64)] int64."""
        return pack_bits(sign_bits(self.query_projection(query)))

    @torch.no_grad()
    def encode_key(self, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed key codes and centred norms, computed once per key and kept in the cache.

        Returns
        -------
        codes : Tensor[B, Hkv, S, ceil(R/64)], int64
        norms : Tensor[B, Hkv, S], float32 -- ``|k - mu|``, used by the mid-tier estimate
        """
        centred = key.to(torch.float32) - self.key_center.unsqueeze(1)
        codes = pack_bits(sign_bits(torch.einsum("bksd,krd->bksr", centred, self.key_proj)))
        return codes, centred.norm(dim=-1)


class HashEncoders(nn.Module):
    """Per-layer hash encoders of one model, with ``save_pretrained`` / ``from_pretrained``.

    Parameters
    ----------
    shape : dict
        The model geometry (see :func:`model_shape`): model_type, num_layers, num_heads, num_kv_heads,
        head_dim.
    bits : int
        Code length ``R``, one of 16, 32, 64, 128.
    hidden : int
        Query MLP width.
    fingerprint : str or None
        :func:`model_fingerprint` of the model the encoders were made for.
    dense_layers : sequence of int
        Layers these encoders leave to full attention, whatever ``DashKVConfig.dense_layers`` says (the
        two are joined): layers where their codes were measured to miss the keys the layer needs.
    budget_scales : mapping of int to float
        Multipliers of ``DashKVConfig.high`` per layer (absent layers: 1), e.g. ``{5: 1.6, 17: 0.4}``:
        how the layer check of ``dashkv train`` shares the high tier between layers.
    share : str
        How the tiers are shared in a GQA group where ``DashKVConfig.share`` is None (its default): one
        of ``SHARING``, ``"head"`` unless measured otherwise for these encoders.
    """

    def __init__(self, shape: dict, bits: int = DEFAULT_BITS, hidden: int = 256, fingerprint: str | None = None,
                 dense_layers: Sequence[int] = (), budget_scales: Mapping[int, float] | None = None,
                 share: str = "head"):  # fmt: skip
        super().__init__()
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={bits!r} is not supported; bits must be one of {SUPPORTED_BITS}")
        self.shape = dict(shape)
        self.bits, self.hidden, self.fingerprint = bits, hidden, fingerprint
        self.layers = nn.ModuleList(
            LayerHashEncoder(shape["num_heads"], shape["num_kv_heads"], shape["head_dim"], bits, hidden)
            for _ in range(shape["num_layers"])
        )
        self.dense_layers = dense_layers
        self.budget_scales = budget_scales or {}
        self.share = share

    @property
    def dense_layers(self) -> tuple[int, ...]:
        """Layers these encoders leave to full attention (sorted)."""
        return self._dense_layers

    @dense_layers.setter
    def dense_layers(self, layers: Sequence[int]) -> None:
        count = self.shape["num_layers"]
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or any(
            isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < count for i in layers
        ):  # fmt: skip
            raise ValueError(f"dense_layers={layers!r} is not allowed; dense_layers must be a sequence of layer "
                             f"indices in 0..{count - 1}, e.g. (11,) or ()")  # fmt: skip
        self._dense_layers = tuple(sorted({int(i) for i in layers}))

    @property
    def budget_scales(self) -> dict[int, float]:
        """Multipliers of ``DashKVConfig.high`` per layer (layers not named: 1)."""
        return dict(self._budget_scales)

    @budget_scales.setter
    def budget_scales(self, scales: Mapping[int, float]) -> None:
        count = self.shape["num_layers"]
        if not isinstance(scales, Mapping) or any(
            isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < count
            or isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf
            for i, v in scales.items()
        ):  # fmt: skip
            raise ValueError(f"budget_scales={scales!r} is not allowed; budget_scales must map layer indices in "
                             f"0..{count - 1} to positive finite numbers, e.g. {{5: 1.6, 17: 0.4}} or {{}}")  # fmt: skip
        self._budget_scales = {int(i): float(v) for i, v in sorted(scales.items())}

    @property
    def share(self) -> str:
        """The tier sharing these encoders run with where the config leaves it open (``share=None``)."""
        return self._share

    @share.setter
    def share(self, share: str) -> None:
        self._share = check_choice("share", share, SHARING)

    def budget_scale(self, layer: int) -> float:
        """The multiplier of ``DashKVConfig.high`` for ``layer`` (1 unless :attr:`budget_scales` names it)."""
        return self._budget_scales.get(layer, 1.0)

    @classmethod
    def random(cls, model: nn.Module, bits: int = DEFAULT_BITS, seed: int = 0, hidden: int = 256) -> "HashEncoders":
        """Random-projection (SimHash) encoders: the untrained baseline.

        Queries and keys share one Gaussian projection per KV head, so the Hamming distance estimates
        the angle between q and k; the query MLP starts with a zero output layer.
        """
        encoders = cls(model_shape(model), bits=bits, hidden=hidden, fingerprint=model_fingerprint(model))
        generator = torch.Generator().manual_seed(seed)
        groups = encoders.shape["num_heads"] // encoders.shape["num_kv_heads"]
        with torch.no_grad():
            for layer in encoders.layers:
                for module in layer.query_mlp:
                    if isinstance(module, nn.Linear):
                        bound = module.in_features**-0.5
                        module.weight.copy_(torch.rand(module.weight.shape, generator=generator) * 2 * bound - bound)
                        module.bias.zero_()
                layer.query_mlp[-1].weight.zero_()
                layer.key_proj.copy_(torch.randn(layer.key_proj.shape, generator=generator))
                layer.query_skip.copy_(layer.key_proj.repeat_interleave(groups, dim=0))
        return encoders.eval()

    def check_compatible(self, model: nn.Module) -> None:
        """Raise ``ValueError`` naming both geometries if these encoders do not fit ``model``."""
        theirs = model_shape(model)
        keys = ("num_layers", "num_heads", "num_kv_heads", "head_dim")
        if any(self.shape[k] != theirs[k] for k in keys):
            mine = {k: self.shape[k] for k in keys}
            raise ValueError(
                f"encoders were made for a model of shape {mine} ({self.shape.get('model_type')}), "
                f"but the model has shape { {k: theirs[k] for k in keys} } ({theirs['model_type']})"
            )
        if self.fingerprint is None:
            return
        fingerprint = model_fingerprint(model)
        if fingerprint is None:
            logger.warning(
                "the model has no k_proj.weight parameter (a fused or swapped key projection): the encoders' "
                "fingerprint %s cannot be checked against it", self.fingerprint,
            )  # fmt: skip
        elif fingerprint != self.fingerprint:
            logger.warning(
                "encoders were trained for another model of the same shape (fingerprint %s, model %s); "
                "their codes may rank keys poorly",
                self.fingerprint,
                fingerprint,
            )

    def save_pretrained(self, directory: str | Path, dtype: torch.dtype = torch.float32) -> Path:
        """Write ``encoders.safetensors`` and ``config.json`` (with the weights' :func:`weights_digest`)
        to ``directory``.

        ``dtype``: the file's (the encoders compute in float32 whatever it is). ``torch.float16`` halves
        the file at a rounding the codes barely see (measured: ``docs/method.md``, "Float16 file")."""
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype={dtype} is not supported for the file; use one of {STORAGE_DTYPES}")
        directory = Path(directory)
        tensors = {k: v.detach().cpu().to(dtype).contiguous() for k, v in self.state_dict().items()}
        bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
        if bad:
            raise ValueError(f"dtype={dtype} cannot hold the weights {bad[:3]} (out of range or not finite); "
                             "save in torch.float32")
        directory.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(directory / WEIGHTS_NAME))
        config = {
            "format_version": FORMAT_VERSION,
            "bits": self.bits,
            "hidden": self.hidden,
            "model": self.shape,
            "fingerprint": self.fingerprint,
            "dense_layers": list(self.dense_layers),
            "budget_scales": {str(i): v for i, v in self.budget_scales.items()},
            "share": self.share,
            DIGEST_FIELD: weights_digest(tensors),
        }
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "HashEncoders":
        """Load encoders written by :meth:`save_pretrained`, after checking them.

        Raises
        ------
        FileNotFoundError
            When ``directory`` lacks ``config.json`` or ``encoders.safetensors``.
        ValueError
            Naming the file and field: a malformed ``config.json`` (invalid JSON, a field missing or of
            the wrong type), a weights file that is not safetensors, tensors whose names or shapes do not
            match the config, a digest that does not match the weights, or non-finite weights.
        """
        config, tensors = _read_checked(Path(directory))
        model = config["model"]
        encoders = cls(model, bits=config["bits"], hidden=config["hidden"], fingerprint=config["fingerprint"],
                       dense_layers=config.get("dense_layers", []),
                       budget_scales={int(i): v for i, v in config.get("budget_scales", {}).items()},
                       share=config.get("share", "head"))  # fmt: skip
        encoders.load_state_dict({k: v.to(torch.float32) for k, v in tensors.items()})
        return encoders.eval()


DIGEST_FIELD = "weights_sha256"


def weights_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order (hex string).

    It covers the content, not the file's layout, so a file rewritten with the same tensors keeps it.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{str(tensor.dtype).removeprefix('torch.')}|{list(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _read_checked(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``config.json`` and the tensors of a saved encoders directory, every field and tensor checked."""
    if not directory.exists():
        raise FileNotFoundError(f"encoders directory {directory} does not exist")
    if not directory.is_dir():
        raise NotADirectoryError(f"encoders path {directory} is a file; give the directory that holds "
                                 f"{CONFIG_NAME} and {WEIGHTS_NAME}")  # fmt: skip
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}: not a saved HashEncoders directory")
    try:
        config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{config_path} is not valid JSON ({error}); it should be written by save_pretrained") from None
    _check_config(config, config_path)
    if not weights_path.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory} (its {CONFIG_NAME} is there)")
    try:
        tensors = load_file(str(weights_path))
    except Exception as error:  # safetensors raises its own error type for every malformed header
        raise ValueError(f"{weights_path} is not a readable safetensors file ({error})") from None
    _check_tensors(config, config_path, weights_path, tensors)
    recorded = config.get(DIGEST_FIELD)
    if recorded is None:  # files written before the digest existed (dashkv train output): still read
        logger.warning("%s has no %s (written by an older dashkv), so its integrity cannot be checked; "
                       "load and save_pretrained it again to add one", config_path, DIGEST_FIELD)
    elif weights_digest(tensors) != recorded:
        raise ValueError(f"{weights_path} does not match {DIGEST_FIELD} in {config_path}: the weights were "
                         "changed or corrupted after saving; copy or train them again")  # fmt: skip
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{weights_path}: tensor {name} holds non-finite values (NaN or inf); "
                             "its codes would be meaningless")  # fmt: skip
    return config, tensors


def _check_config(config: object, path: Path) -> None:
    """Raise ``ValueError`` naming ``path`` and the field for a missing or malformed field."""

    def bad(field: str, value: object, allowed: str) -> None:
        raise ValueError(f"{path}: {field}={value!r} is not allowed; {field} must be {allowed}")

    def integer(field: str, value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            bad(field, value, "an integer >= 1")

    if not isinstance(config, dict):
        bad("config", config, "a JSON object")
    required = ("format_version", "bits", "hidden", "model", "fingerprint")
    missing = [k for k in required if k not in config]
    if missing:
        raise ValueError(f"{path} lacks the field(s) {missing}; a saved HashEncoders config has {list(required)}")
    if config["format_version"] != FORMAT_VERSION:
        raise ValueError(f"encoders format_version={config['format_version']!r} in {path} is not supported; "
                         f"this dashkv reads format_version {FORMAT_VERSION}")  # fmt: skip
    if isinstance(config["bits"], bool) or config["bits"] not in SUPPORTED_BITS:
        bad("bits", config["bits"], f"one of {SUPPORTED_BITS}")
    integer("hidden", config["hidden"])
    model = config["model"]
    keys = ("model_type", "num_layers", "num_heads", "num_kv_heads", "head_dim")
    if not isinstance(model, dict) or any(k not in model for k in keys):
        bad("model", model, f"an object with the fields {list(keys)}")
    for key in keys[1:]:
        integer(f"model.{key}", model[key])
    if model["num_heads"] % model["num_kv_heads"]:
        bad("model.num_kv_heads", model["num_kv_heads"], f"a divisor of model.num_heads={model['num_heads']}")
    if config["fingerprint"] is not None and not isinstance(config["fingerprint"], str):
        bad("fingerprint", config["fingerprint"], "a string or null")
    dense = config.get("dense_layers", [])  # absent in files written before it existed
    if not isinstance(dense, list) or any(
        isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < model["num_layers"] for i in dense
    ):  # fmt: skip
        bad("dense_layers", dense, f"a list of layer indices in 0..{model['num_layers'] - 1}")
    scales = config.get("budget_scales", {})  # absent in files written before it existed
    if not isinstance(scales, dict) or any(
        not i.isdigit() or not int(i) < model["num_layers"]
        or isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf
        for i, v in scales.items()
    ):  # fmt: skip
        bad("budget_scales", scales, f"an object from layer indices in 0..{model['num_layers'] - 1} (as strings) "
                                     "to positive finite numbers")  # fmt: skip
    if config.get("share", "head") not in SHARING:  # absent in files written before it existed
        bad("share", config["share"], f"one of {list(SHARING)}")
    digest = config.get(DIGEST_FIELD)
    if digest is not None and not (isinstance(digest, str) and len(digest) == 64
                                   and all(c in "0123456789abcdef" for c in digest)):  # fmt: skip
        bad(DIGEST_FIELD, digest, "a sha256 hex digest (64 characters 0-9a-f)")


def _check_tensors(config: dict, config_path: Path, weights_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` unless the tensors are exactly those the config's encoders hold."""
    with torch.device("meta"):  # shapes only: nothing allocated or initialised
        template = HashEncoders(config["model"], bits=config["bits"], hidden=config["hidden"])
    expected = {k: tuple(v.shape) for k, v in template.state_dict().items()}
    fields = f"bits={config['bits']}, hidden={config['hidden']}, model={config['model']}"
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(f"{weights_path} does not hold the tensors {config_path} ({fields}) describes: "
                         f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                         f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}")  # fmt: skip
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{weights_path}: tensor {name} has shape {list(tensors[name].shape)} but {config_path} "
                             f"({fields}) implies {list(shape)}")  # fmt: skip
        if tensors[name].dtype not in STORAGE_DTYPES:
            raise ValueError(f"{weights_path}: tensor {name} is {tensors[name].dtype}; "
                             f"encoder files hold one of {STORAGE_DTYPES}")  # fmt: skip
