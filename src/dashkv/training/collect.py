"""Teacher signals: the post-RoPE queries and keys the full-attention model's attention actually sees.

The teacher's attention distribution of a query is ``softmax(q . k / sqrt(D))`` over its visible keys,
so it is recomputed exactly from the captured vectors when the loss needs it instead of being stored.

Memory bound: one forward over one sequence of ``L`` tokens keeps, per layer, the keys
``Hkv * L * D`` (and as many values, for held-out quality) and ``queries_per_sequence`` sampled queries ``H * n * D`` floats (SmolLM2 at 2K:
1.6 MB + 0.3 MB per layer, 57 MB for 30 layers), moved to the per-layer store at once; the store holds
``sequences`` of those. A caller that wants less memory collects fewer sequences at a time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from dashkv.registry import register_attention

COLLECT_NAME = "dashkv_collect"


@dataclass
class LayerSignals:
    """Captured vectors of one layer: ``keys`` [N, Hkv, L, D], ``queries`` [N, H, n, D] (float32),
    ``positions`` [N, n] (int64), the sequence positions of the sampled queries, and, when asked for,
    ``values`` [N, Hkv, L, D] (to measure attention-output error)."""

    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    queries: list[torch.Tensor] = field(default_factory=list)
    positions: list[torch.Tensor] = field(default_factory=list)

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.stack(self.keys), torch.stack(self.queries), torch.stack(self.positions)

    def extend(self, other: "LayerSignals") -> None:
        """Append another collection's sequences (they may have another length: no longer stackable)."""
        for name in ("keys", "values", "queries", "positions"):
            getattr(self, name).extend(getattr(other, name))


class _Recorder:
    def __init__(self, positions: torch.Tensor, store: dict[int, LayerSignals], keep_values: bool, skip=()):
        self.positions, self.store, self.keep_values, self.skip = positions, store, keep_values, skip

    def __call__(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        if module.layer_idx in self.skip:  # a sliding-window layer: DASH-KV never serves it
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
        signals = self.store.setdefault(module.layer_idx, LayerSignals())
        signals.keys.append(key[0].detach().float().clone())
        signals.queries.append(query[0, :, self.positions].detach().float().clone())
        signals.positions.append(self.positions.to(key.device, copy=True))
        if self.keep_values:
            signals.values.append(value[0].detach().float().clone())
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)


def sample_positions(length: int, count: int, min_position: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` distinct query positions in ``[min_position, length)``, sorted; deterministic in the generator."""
    available = length - min_position
    if available < 1:
        raise ValueError(f"sequence of {length} tokens has no query position at or after {min_position}")
    chosen = torch.randperm(available, generator=generator)[: min(count, available)] + min_position
    return chosen.sort().values


@torch.no_grad()
def collect(
    model,
    sequences: list[torch.Tensor],
    queries_per_sequence: int,
    min_position: int,
    seed: int = 0,
    progress=None,
    keep_values: bool = False,
    max_position: int | None = None,
    bfloat16: bool = False,
    natural_share: float = 0.0,
) -> dict[int, LayerSignals]:
    """Run the full-attention model over token sequences and capture each layer's q (sampled) and k
    (the layers DASH-KV serves: sliding-window layers are skipped).

    Parameters
    ----------
    sequences : list of Tensor[L], int64 -- equal-length token sequences
    queries_per_sequence : int -- sampled query positions per sequence
    min_position : int -- earliest query position (so every query has context to rank)
    progress : optional callable wrapping an iterable (e.g. tqdm)
    keep_values : bool -- also keep V (held-out quality needs it; training does not)
    max_position : int or None -- when given, each sequence is placed at a random offset so that its
        positions fall anywhere in ``[0, max_position)``. RoPE attention depends only on relative
        positions, so the teacher's attention is unchanged, but the post-RoPE vectors the encoders
        see cover every rotation a long context produces (without it, encoders trained on short
        windows ranked long-context keys worse than random projection: ``docs/method.md``).
    natural_share : float -- with ``max_position``, the share of sequences (drawn at random) left at
        their natural positions: every real context starts at position 0, so low positions are the
        ones queries meet most (measured: ``docs/method.md``, "Some windows at their natural
        positions").
    bfloat16 : bool -- run the forward under bf16 autocast (captured vectors are still stored as
        float32): faster where the CPU has AMX / AVX-512 BF16, at a change of the teacher's attention
        far below what the encoders resolve (measured: ``docs/method.md``, "Teacher forward in
        bf16"). Training uses it where :func:`fast_bfloat16`; held-out quality does not.
    """
    from dashkv.models import sliding_windows

    generator = torch.Generator().manual_seed(seed)
    store: dict[int, LayerSignals] = {}
    skip = frozenset(sliding_windows(model.config))
    previous = model.config._attn_implementation
    iterator = progress(sequences) if progress is not None else sequences
    try:
        for ids in iterator:
            length = ids.shape[-1]
            positions = sample_positions(length, queries_per_sequence, min_position, generator)
            offset = 0
            natural = float(torch.rand(1, generator=generator)) < natural_share
            if max_position is not None and max_position > length and not natural:
                offset = int(torch.randint(max_position - length + 1, (1,), generator=generator))
            position_ids = (offset + torch.arange(length)).view(1, -1).to(model.device)
            register_attention(COLLECT_NAME, _Recorder(positions, store, keep_values, skip))
            model.set_attn_implementation(COLLECT_NAME)
            # the base model: the LM head is not needed (10 % of the work)
            with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bfloat16):
                model.base_model(ids.view(1, -1).to(model.device), position_ids=position_ids, use_cache=False)
    finally:
        model.set_attn_implementation(previous)
    return store


def fast_bfloat16(device: torch.device) -> bool:
    """Whether bf16 matmuls beat float32 on ``device``: CUDA, or a CPU with AMX or AVX-512 BF16
    (elsewhere bf16 autocast is emulated and slower than float32)."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and (torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def token_windows(
    tokenizer, text: str, length: int, count: int | None = None, stride: int | None = None
) -> list[torch.Tensor]:
    """Cut tokenized text into windows of ``length`` tokens, one every ``stride`` tokens (default:
    consecutive, no overlap; the tail is dropped). With ``count``, keep that many, evenly spread over
    the text so that every part of a mixed corpus is represented."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids)
    windows = [ids[i : i + length] for i in range(0, ids.numel() - length + 1, stride or length)]
    if not windows:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {length}")
    if count is not None and count < len(windows):
        windows = [windows[i * len(windows) // count] for i in range(count)]
    return windows


def read_corpus(paths: list[Path]) -> str:
    """Text of plain-text files and of jsonl files (their ``"text"`` field), joined by blank lines."""
    parts = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"corpus file {path} does not exist")
        if path.suffix == ".jsonl":
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if line.strip():
                    record = json.loads(line)
                    if "text" not in record:
                        raise ValueError(f"{path}:{n} has no 'text' field")
                    parts.append(record["text"])
        else:
            parts.append(path.read_text())
    return "\n\n".join(parts)
