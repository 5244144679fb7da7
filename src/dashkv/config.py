"""DashKVConfig: the inference-time settings of DASH-KV, validated on construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

SUPPORTED_BITS = (16, 32, 64, 128)
PREFILL_MODES = ("dense", "tiered")
SELECTORS = ("hash", "oracle")
SHARING = ("head", "group")


def _fail(name: str, value: object, allowed: str) -> None:
    raise ValueError(f"{name}={value!r} is not allowed; {name} must be {allowed}")


@dataclass
class DashKVConfig:
    """Settings of tiered hashed attention.

    Parameters
    ----------
    bits : int
        Hash code length ``R``; one of 16, 32, 64, 128. The paper finds 32-64 best on its 7-8B models;
        on SmolLM2-135M trained 128-bit codes keep the pass key and multi-key answers at a 2 % budget
        that 64-bit ones lose (quick suite, paired: 0.96 vs 0.75), so 128 is the default and what ships.
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
        Override the encoders' learned discounts (in bits, ``<= 0``); ``None`` uses the learned ones.
    momentum : bool
        Cross-layer momentum: keys with sustained attention in the previous layers get the temporal
        discount.
    momentum_decay : float
        Weight of the older layers in the running attention prior, in ``[0, 1)``.
    momentum_ratio : float
        A key has sustained attention when its prior exceeds this many times the uniform share.
    dense_layers : tuple of int
        Layers that always run full attention. Layer 0 of most LLMs attends almost uniformly (on
        SmolLM2, half its keys hold 90 % of its attention), so selecting there buys nothing.
    prefill : str
        ``"dense"``: a forward over an empty cache runs full attention (the context is prefilled
        exactly); ``"tiered"``: it goes through the tiers too, in query chunks.
    chunk_size : int
        Query tokens processed at once through the tiers (bounds memory to ``chunk * S``).
    backend : str
        Kernel backend: ``"auto"``, ``"reference"`` or ``"cpu"``.
    share : str
        ``"head"``: each query head chooses its own tiers; ``"group"``: one choice per KV head from the
        summed distances of its GQA group's query heads, so each K/V row is read once per group
        (consensus then counts the votes of the groups).
    selector : str
        ``"hash"``: tiers from Hamming distances of the codes (DASH-KV); ``"oracle"``: the high tier is
        the top ``high`` share of keys by exact ``q.k`` (no mid tier, no calibration) -- the ceiling of
        any key selector at that budget, for evaluation only (it reads every key).
    """

    bits: int = 128
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
    chunk_size: int = 256
    backend: str = "auto"
    selector: str = "hash"
    share: str = "head"

    def __post_init__(self) -> None:
        self.dense_layers = tuple(self.dense_layers)
        if self.bits not in SUPPORTED_BITS:
            _fail("bits", self.bits, f"one of {SUPPORTED_BITS}")
        for name in ("high", "mid"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                _fail(name, value, "a number in [0, 1]")
        if self.high + self.mid > 1.0 + 1e-9:
            raise ValueError(
                f"high + mid = {self.high} + {self.mid} = {self.high + self.mid} exceeds 1; "
                "their sum must be at most 1"
            )
        if not isinstance(self.sinks, int) or self.sinks < 0:
            _fail("sinks", self.sinks, "an integer >= 0")
        if not isinstance(self.window, int) or self.window < 1:
            _fail("window", self.window, "an integer >= 1 (a query always sees itself)")
        if not 0.0 < self.vote_fraction <= 1.0:
            _fail("vote_fraction", self.vote_fraction, "in (0, 1]")
        for name in ("spatial_discount", "temporal_discount"):
            value = getattr(self, name)
            if value is not None and value > 0:
                _fail(name, value, "<= 0 (a discount lowers the distance) or None")
        if not 0.0 <= self.momentum_decay < 1.0:
            _fail("momentum_decay", self.momentum_decay, "in [0, 1)")
        if self.momentum_ratio <= 0:
            _fail("momentum_ratio", self.momentum_ratio, "> 0")
        if any((not isinstance(i, int)) or i < 0 for i in self.dense_layers):
            _fail("dense_layers", self.dense_layers, "a tuple of layer indices >= 0")
        if self.prefill not in PREFILL_MODES:
            _fail("prefill", self.prefill, f"one of {PREFILL_MODES}")
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            _fail("chunk_size", self.chunk_size, "an integer >= 1")
        if self.share not in SHARING:
            _fail("share", self.share, f"one of {SHARING}")
        if self.selector not in SELECTORS:
            _fail("selector", self.selector, f"one of {SELECTORS}")
        if self.selector == "oracle" and self.mid > 0:
            _fail("mid", self.mid, "0 with selector='oracle' (exact top-k has no estimated tier)")
        from dashkv.ops.dispatch import BACKENDS

        if self.backend not in BACKENDS:
            _fail("backend", self.backend, f"one of {BACKENDS}")

    @classmethod
    def full(cls, **overrides: object) -> "DashKVConfig":
        """A config that puts every key in the high tier: tiered attention equals full attention."""
        settings = dict(high=1.0, mid=0.0, consensus=False, momentum=False)
        settings.update(overrides)
        return cls(**settings)  # type: ignore[arg-type]

    def to_dict(self) -> dict:
        return asdict(self)
