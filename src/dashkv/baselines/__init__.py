"""The methods DASH-KV is evaluated against, all decoding from the same dense prefill.

``build_methods`` turns method names and budgets into :class:`~dashkv.baselines.method.Method` rows:

- ``full``: full attention (no budget);
- ``dashkv``: DASH-KV with the given encoders (high = budget, mid = 3 x budget, consensus, momentum);
- ``dashkv-head``, ``dashkv-group``, ``dashkv-union``: the same with tiers per query head / per GQA group /
  per query head joined over the group;
- ``oracle``: top-k by exact ``q.k`` (the ceiling of any selector);
- ``simhash``: random-projection hashing with the same bits, top-k by Hamming distance only;
- ``streamingllm``, ``snapkv``, ``h2o``: kvpress presses at the budget's total kept keys;
- ``kivi``: KIVI-style 2-bit quantization (no budget);
- ``ablation``: the paper's ablation rows (see :func:`dashkv.baselines.hashing.ablation_methods`).
"""

from __future__ import annotations

from dashkv.baselines.budget import Budget
from dashkv.baselines.hashing import ablation_methods, dashkv_method, oracle_method, simhash_method
from dashkv.baselines.kivi import KIVIMethod
from dashkv.baselines.method import Method
from dashkv.baselines.presses import press_method

METHODS = ("full", "dashkv", "dashkv-head", "dashkv-group", "dashkv-union", "oracle", "simhash", "streamingllm", "snapkv", "h2o", "kivi", "ablation")
BUDGETLESS = ("full", "kivi")

__all__ = ["METHODS", "BUDGETLESS", "Budget", "Method", "build_methods"]


def build_methods(model, encoders, names: tuple[str, ...], budgets: tuple[float, ...], sinks: int = 4,
                  window: int = 64, ablation_budget: float = 0.05, mid_ratio: float = 3.0,
                  trained: bool = True) -> list[Method]:
    """Method rows for ``names`` at each of ``budgets`` (budget-less methods once; ablation rows at
    ``ablation_budget`` only). ``trained=False`` says ``encoders`` are random projections (the
    ablation then leaves out the rows that would repeat ``simhash`` and ``dashkv``)."""
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"methods={unknown} are not known; choose from {METHODS}")
    from dashkv.encoders import HashEncoders

    random = HashEncoders.random(model, bits=encoders.bits, seed=0) if "simhash" in names else None
    rows: list[Method] = []
    if "full" in names:
        rows.append(Method(name="full"))
    if "kivi" in names:
        rows.append(KIVIMethod(name="kivi"))
    for share in budgets:
        budget = Budget(share, sinks, window)
        for name in names:
            if name == "dashkv":
                rows.append(dashkv_method(encoders, budget, mid_ratio))
            elif name in ("dashkv-head", "dashkv-group", "dashkv-union"):  # the sharing modes, side by side
                rows.append(dashkv_method(encoders, budget, mid_ratio, name=name, share=name.split("-")[1]))
            elif name == "oracle":
                rows.append(oracle_method(encoders, budget))
            elif name == "simhash":
                rows.append(simhash_method(random, budget))
            elif name in ("streamingllm", "snapkv", "h2o"):
                rows.append(press_method(name, budget))
    if "ablation" in names:
        rows.extend(ablation_methods(model, encoders, Budget(ablation_budget, sinks, window), mid_ratio=mid_ratio,
                                    trained=trained))
    return rows
