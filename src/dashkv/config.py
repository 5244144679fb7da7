"""DashKVConfig: the inference-time settings of DASH-KV, validated on construction and frozen after it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from numbers import Integral, Real

SUPPORTED_BITS = (16, 32, 64, 128)
# The code length, written once: what ships, and the default of DashKVConfig and HashEncoders alike.
DEFAULT_BITS = 128
PREFILL_MODES = ("dense", "tiered", "blocks")
SELECTORS = ("hash", "oracle")
SHARING = ("head", "group", "union")


class ConfigError(ValueError):
    """A setting that is not allowed; ``field`` names it (the CLI turns it into its option)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _fail(name: str, value: object, allowed: str) -> None:
    raise ConfigError(name, f"{name}={value!r} is not allowed; {name} must be {allowed}")


def check_int(name: str, value: object, minimum: int) -> int:
    """``value`` as an int if it is an integer (not a bool) ``>= minimum``, else :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        _fail(name, value, f"an integer >= {minimum}")
    return int(value)


def check_real(name: str, value: object, low: float, high: float, low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a float if it is a finite number (not a bool) in the interval, else :class:`ConfigError`."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        _fail(name, value, f"a finite number in {interval}")
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above:
        _fail(name, value, f"a number in {interval}")
    return float(value)


def check_choice(name: str, value: object, choices: tuple) -> object:
    if not isinstance(value, type(choices[0])) or isinstance(value, bool) or value not in choices:
        _fail(name, value, f"one of {choices}")
    return value


MAX_DISCOUNT = 4096
"""The largest discount in bits, far past any code length: the CPU step keeps the two discounts' sum
of each key in int16."""


@dataclass(frozen=True)
class DashKVConfig:
    """Settings of tiered hashed attention (frozen: change one with ``dataclasses.replace``).

    Parameters
    ----------
    bits : int
        Hash code length ``R``; one of 16, 32, 64, 128; it must equal the encoders' (checked by
        :meth:`check_code_length`). The default, :data:`DEFAULT_BITS`, is what ships (why 128 and not
        the paper's 32-64: ``docs/method.md``).
    high : float
        Share of context keys (outside sinks and window) attended exactly. ``1.0`` = full attention.
    mid : float
        Share of context keys whose logits are estimated from their codes; ``high + mid <= 1``.
    sinks : int
        First tokens of the sequence, always high.
    window : int
        Most recent tokens (the query's own included), always high; at least 1.
    consensus : bool
        Cross-head consensus: keys that at least ``vote_fraction`` of the layer's query heads rank in
        their high tier get the spatial discount.
    vote_fraction : float
        ``T_vote`` as a share of the layer's query heads, in ``(0, 1]``.
    spatial_discount, temporal_discount : float or None
        Override the encoders' learned discounts (in bits, in ``[-MAX_DISCOUNT, 0]``); ``None`` uses the learned ones.
    momentum : bool
        Cross-layer momentum: keys with sustained attention in the previous layers get the temporal
        discount.
    momentum_decay : float
        Weight of the older layers in the running attention prior, in ``[0, 1)``.
    momentum_ratio : float
        A key has sustained attention when its prior exceeds this many times the uniform share.
    dense_layers : sequence of int
        Layers that always run full attention (kept as a sorted tuple). Layer 0 of most LLMs attends
        almost uniformly (on SmolLM2, half its keys hold 90 % of its attention), so selecting there
        buys nothing.
    prefill : str
        ``"dense"``: a forward over an empty cache runs full attention (the context is prefilled
        exactly); ``"tiered"``: it goes through the tiers too, in query chunks; ``"blocks"``: each block of
        ``prefill_block`` queries attends exactly to the ``high + mid`` share of keys nearest to its
        codes, plus sinks and window (:mod:`dashkv.block_prefill`; one matrix product a block).
    prefill_block : int
        Queries that share one key selection with ``prefill="blocks"``.
    chunk_size : int
        Query tokens processed at once through the tiers (bounds memory to ``chunk * S``).
    dense_below : int
        A layer attends exactly while its cache holds fewer keys than this: on short contexts a hashed
        step costs more than the dense attention it replaces (the crossover is measured in
        ``docs/speed.md``); CPU decode steps take the compiled dense kernel, prefills SDPA. ``0`` runs
        the tiers at every length (evaluation does, to score the method).
    backend : str
        Kernel backend: ``"auto"``, ``"reference"`` or ``"cpu"``.
    share : str or None
        None (the default): what the encoders were measured to run best with (``HashEncoders.share``:
        ``"head"`` for the default model's, ``"union"`` for Gemma-3-270M's); ``"head"``: each query
        head chooses its own tiers; ``"group"``: one choice per KV head, by each key's distance to
        the nearest of its GQA group's query heads, so each K/V row is read once per group
        (consensus then counts the votes of the groups); ``"union"``: each head chooses as with
        ``"head"``, and every head of a GQA group attends to what any of them chose (a key high for
        one head is high for all, else mid if mid for one): the rows per-head tiers read anyway, all
        of them used by every head.
    selector : str
        ``"hash"``: tiers from Hamming distances of the codes (DASH-KV); ``"oracle"``: the high tier is
        the top ``high`` share of keys by exact ``q.k`` (no mid tier, no calibration) -- the ceiling of
        any key selector at that budget, for evaluation only (it reads every key).
    """

    bits: int = DEFAULT_BITS
    high: float = 0.05
    mid: float = 0.15
    sinks: int = 4
    window: int = 64
    consensus: bool = True
    vote_fraction: float = 0.5
    spatial_discount: float | None = None
    momentum: bool = True
    momentum_decay: float = 0.5
    momentum_ratio: float = 4.0
    temporal_discount: float | None = None
    dense_layers: tuple[int, ...] = field(default=(0,))
    prefill: str = "dense"
    prefill_block: int = 64
    chunk_size: int = 256
    dense_below: int = 6144
    backend: str = "auto"
    selector: str = "hash"
    share: str | None = None

    def __post_init__(self) -> None:
        def store(name: str, value: object) -> None:  # frozen: the checked values are set once, here
            object.__setattr__(self, name, value)

        if isinstance(self.bits, bool) or not isinstance(self.bits, Integral) or self.bits not in SUPPORTED_BITS:
            _fail("bits", self.bits, f"one of {SUPPORTED_BITS}")
        store("bits", int(self.bits))
        for name in ("high", "mid"):
            store(name, check_real(name, getattr(self, name), 0.0, 1.0))
        if self.high + self.mid > 1.0 + 1e-9:
            raise ConfigError("high", f"high + mid = {self.high} + {self.mid} = {self.high + self.mid} exceeds 1; "
                              "their sum must be at most 1")  # fmt: skip
        store("sinks", check_int("sinks", self.sinks, 0))
        store("window", check_int("window", self.window, 1))
        for name in ("consensus", "momentum"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "True or False")
        store("vote_fraction", check_real("vote_fraction", self.vote_fraction, 0.0, 1.0, low_open=True))
        for name in ("spatial_discount", "temporal_discount"):
            value = getattr(self, name)
            if value is not None:
                if (isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value > 0
                        or value < -MAX_DISCOUNT):  # fmt: skip
                    _fail(name, value, f"a number in [-{MAX_DISCOUNT}, 0] (a discount lowers the distance) or None")
                store(name, float(value))
        store("momentum_decay", check_real("momentum_decay", self.momentum_decay, 0.0, 1.0, high_open=True))
        ratio = self.momentum_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, Real) or not math.isfinite(ratio) or ratio <= 0:
            _fail("momentum_ratio", ratio, "a finite number > 0")
        store("momentum_ratio", float(ratio))
        layers = self.dense_layers
        if isinstance(layers, (str, bytes)) or not isinstance(layers, (Sequence, set, frozenset)) or any(
            isinstance(i, bool) or not isinstance(i, Integral) or i < 0 for i in layers
        ):
            _fail("dense_layers", layers, "a sequence of layer indices >= 0, e.g. (0,) or ()")
        store("dense_layers", tuple(sorted({int(i) for i in layers})))
        check_choice("prefill", self.prefill, PREFILL_MODES)
        store("prefill_block", check_int("prefill_block", self.prefill_block, 1))
        store("chunk_size", check_int("chunk_size", self.chunk_size, 1))
        store("dense_below", check_int("dense_below", self.dense_below, 0))
        if self.share is not None:
            check_choice("share", self.share, SHARING)
        check_choice("selector", self.selector, SELECTORS)
        if self.selector == "oracle" and self.mid > 0:
            _fail("mid", self.mid, "0 with selector='oracle' (exact top-k has no estimated tier)")
        from dashkv.ops.dispatch import BACKENDS

        check_choice("backend", self.backend, BACKENDS)

    def check_code_length(self, encoder_bits: int) -> None:
        """Raise :class:`ConfigError` (field ``bits``) unless encoders of ``encoder_bits``-bit codes fit.

        The encoders own the code length; this is the one place a config's copy is checked against it
        (``enable`` calls it; a config given as a mapping or ``None`` takes the encoders' length)."""
        if encoder_bits != self.bits:
            raise ConfigError("bits", f"config.bits={self.bits} but the encoders produce {encoder_bits}-bit codes; "
                              f"make them equal (DashKVConfig(bits={encoder_bits}), or pass the config as a "
                              "mapping without bits)")  # fmt: skip

    @classmethod
    def full(cls, **overrides: object) -> "DashKVConfig":
        """A config that puts every key in the high tier: tiered attention equals full attention."""
        settings = dict(high=1.0, mid=0.0, consensus=False, momentum=False, dense_below=0)
        settings.update(overrides)
        return cls(**settings)  # type: ignore[arg-type]

    def to_dict(self) -> dict:
        return asdict(self)
