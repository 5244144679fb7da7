"""Train DASH-KV hash encoders for a model, layer by layer, from full-attention teacher signals.

Stage 1 (per layer): list-wise distillation ``KL(P_student || P_teacher)`` over the keys a query may
select (outside sinks and window), with the student's scores the asymmetric-temperature dot product
of relaxed codes ``tanh(beta v)``, beta annealed 1 -> 10; plus 0.1 bit balance and 0.1 quantization,
and (beyond the paper, measured) the mass-covering direction ``KL(P_teacher || P_student)``.
Stage 2 (per layer): with the codes fixed, fit the mid-tier temperature and residual bit weights so
that tiered attention matches the teacher's (``KL(P_teacher || P_tiered)`` over the kept keys), then
choose the calibration discounts (whole bits) that maximise high-tier recall on the training signals.

Layers are independent, so training is resumable per layer: after each layer the encoders and the
list of finished layers are written to ``<output>/checkpoint``. They also train side by side:
``layer_workers`` threads, each with its share of the torch threads (a training step is a chain of
small ops that two threads barely speed up: on 2 cores, 400 steps of two 128-bit layers took 24.3 s one
after the other on 2 threads, 19.1 s side by side on one thread each).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from numbers import Real
from pathlib import Path

import numba
import torch

from dashkv.calibration import calibrate, consensus_mask, momentum_mask
from dashkv.codes import beta_schedule
from dashkv.config import ConfigError, DashKVConfig, check_int, check_real
from dashkv.encoders import STORAGE_DTYPES, HashEncoders, LayerHashEncoder
from dashkv.models import attention_scaling, tiered_layers
from dashkv.ops import reference as ops
from dashkv.ops.dispatch import get_backend
from dashkv.ops.reference import MidTierInputs, budget_counts, expand_kv
from dashkv.training.collect import LayerSignals
from dashkv.training.losses import bit_balance, masked_log_softmax, quantization, row_kl
from dashkv.training.quality import eligible_mask, mass_recall, teacher_probs, visible_mask

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"
DISCOUNT_GRID = (0, -2, -4, -8)
WEIGHTS_DTYPES = tuple(str(dtype).removeprefix("torch.") for dtype in STORAGE_DTYPES)  # the names TrainConfig takes


@dataclass
class TrainConfig:
    """Settings of ``dashkv train`` (defaults sized for SmolLM2-135M on 2 CPU cores, < 20 minutes)."""

    bits: int = DashKVConfig.bits
    steps: int = 1600
    lr: float = 1e-2
    seq_len: int = 2048
    sequences: int | None = 64  # evenly spread over the corpus; bounds memory (~1.8 MB a layer each at 2K)
    long_seq_len: int = 8192
    long_sequences: int = 4  # held-out high-tier recall at 8K, gap closed 0.54 -> 0.67 (layers 2/14/27)
    queries_per_sequence: int = 128
    queries_per_step: int = 64  # 32 -> 64: held-out gap +0.01 at 2K and 8K (layers 2/14/27)
    keys_per_step: int = 512  # a random subset of each sequence's keys per step (see sample_keys)
    min_position: int = 512
    sinks: int = 4
    window: int = 64
    high: float = 0.05
    mid: float = 0.15
    forward_weight: float = 2.0  # + KL(P_t || P_s): pass key at 5 % 6/10 -> 9/10 (weight 1); 0 is the paper's loss
    balance_weight: float = 0.1
    quant_weight: float = 0.1
    beta_start: float = 1.0
    beta_end: float = 10.0
    random_offsets: bool = True
    natural_share: float = 0.4  # of the 2K windows, kept at positions 0.. (see collect)
    stage2_steps: int = 40
    discount_sequences: int = 3
    dense_layers: tuple[int, ...] = field(default=(0,))
    seed: int = 0
    layer_workers: int = 2  # layers trained at once (threads); results depend on it through float summation order
    weights_dtype: str = "float16"  # of the saved file (see HashEncoders.save_pretrained); checkpoints stay float32

    def __post_init__(self) -> None:
        # the settings shared with inference are checked by DashKVConfig itself (one rule, one message)
        shared = DashKVConfig(bits=self.bits, high=self.high, mid=self.mid, sinks=self.sinks, window=self.window,
                              dense_layers=self.dense_layers)  # fmt: skip
        self.bits, self.high, self.mid, self.dense_layers = shared.bits, shared.high, shared.mid, shared.dense_layers
        for name in ("steps", "seq_len", "long_seq_len", "queries_per_sequence", "queries_per_step", "keys_per_step",
                     "layer_workers", "min_position"):
            setattr(self, name, check_int(name, getattr(self, name), 1))
        for name in ("long_sequences", "stage2_steps", "discount_sequences", "seed"):
            setattr(self, name, check_int(name, getattr(self, name), 0))
        if self.sequences is not None:
            self.sequences = check_int("sequences", self.sequences, 1)
        if not self.sinks + self.window < self.min_position < min(self.seq_len, self.long_seq_len):
            raise ConfigError("min_position",
                f"min_position={self.min_position} must lie between sinks + window ({self.sinks + self.window}) "
                f"and seq_len ({self.seq_len}, long_seq_len {self.long_seq_len}) so every sampled query has keys to select"
            )  # fmt: skip
        if isinstance(self.lr, bool) or not isinstance(self.lr, Real) or not math.isfinite(self.lr) or self.lr <= 0:
            raise ConfigError("lr", f"lr={self.lr!r} is not allowed; lr must be a finite number > 0")
        for name in ("forward_weight", "balance_weight", "quant_weight"):
            setattr(self, name, check_real(name, getattr(self, name), 0.0, 1e6))
        for name in ("beta_start", "beta_end"):
            setattr(self, name, check_real(name, getattr(self, name), 0.0, 1e6, low_open=True))
        if self.weights_dtype not in WEIGHTS_DTYPES:
            raise ConfigError("weights_dtype", f"weights_dtype={self.weights_dtype!r} must be one of {WEIGHTS_DTYPES}")
        self.natural_share = check_real("natural_share", self.natural_share, 0.0, 1.0)
        if not isinstance(self.random_offsets, bool):
            raise ConfigError("random_offsets", f"random_offsets={self.random_offsets!r} must be True or False")


@torch.no_grad()
def whitened_start(encoder: LayerHashEncoder, keys: torch.Tensor, queries: torch.Tensor, eps: float = 1e-4) -> None:
    """Data-driven starting point: key centre = mean key, and the random projections moved into the
    whitened key space (``W_k <- W_k C^-1/2``, query skip ``<- W_k C^1/2``), which keeps ``q.k`` and
    makes SimHash rank by a dot product whose key norms are evened out.

    Each bit's projection is then scaled to unit spread over the training vectors. Signs do not
    change, but ``tanh(beta v)`` must not start saturated: unscaled, ``|v|`` was ~8 for keys and ~30
    for queries on SmolLM2, so 90-97 % of the relaxed codes had no gradient and training barely moved
    (held-out recall gap closed 0.40 -> 0.56 with the scaling, layers 2/14/27 at 2K).

    keys : Tensor[N, Hkv, L, D] ; queries : Tensor[N, H, n, D]
    """
    center = keys.mean(dim=(0, 2))
    encoder.key_center.copy_(center)
    groups = encoder.num_heads // encoder.num_kv_heads
    for h in range(encoder.num_kv_heads):
        centred = (keys[:, h] - center[h]).reshape(-1, keys.shape[-1])
        cov = centred.T @ centred / centred.shape[0] + eps * torch.eye(keys.shape[-1], device=keys.device)
        values, vectors = torch.linalg.eigh(cov)
        projection = encoder.key_proj[h].clone()
        encoder.key_proj[h] = projection @ (vectors * values.rsqrt()) @ vectors.T
        encoder.query_skip[h * groups : (h + 1) * groups] = projection @ (vectors * values.sqrt()) @ vectors.T
    key_spread = encoder.key_projection(keys).std(dim=(0, 2))  # [Hkv, R]
    encoder.key_proj.div_(key_spread.clamp(min=eps).unsqueeze(-1))
    query_spread = torch.einsum("nhtd,hrd->nhtr", queries, encoder.query_skip).std(dim=(0, 2))  # [H, R]
    encoder.query_skip.div_(query_spread.clamp(min=eps).unsqueeze(-1))


def grouped_scores(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``q . k`` of every query head with the keys of its KV head, without copying keys per query
    head (the copies were the largest cost of a training step): queries [H, n, X], keys [Hkv, L, X]
    -> Tensor[H, n, L]."""
    heads, n, width = queries.shape
    kv_heads = keys.shape[0]
    grouped = queries.reshape(kv_heads, heads // kv_heads * n, width)
    return (grouped @ keys.transpose(-1, -2)).reshape(heads, n, keys.shape[1])


def sample_keys(
    keys: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, count: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random subset of ``count`` key positions for one step (all of them when there are fewer).

    The loss then compares the student's and the teacher's rankings of that subset: a 2K step costs
    4x less (an 8K step 16x), so the same time buys 4x the steps, and steps are what training lacks
    (layers 2/14/27, held-out gap at 2K / 8K: 400 steps on all keys 0.61 / 0.68, 1600 on all keys
    0.64 / 0.71, 1600 on 512-key subsets 0.63 / 0.71 in a third of the time). Queries left with no
    eligible key in the subset are dropped.

    keys [1, Hkv, L, D], mask [n, L] (eligible keys of each sampled query), rows [n] (their indices)
    """
    length = keys.shape[2]
    if count < length:
        cols = torch.randperm(length, generator=generator)[:count].sort().values
        keys, mask = keys[:, :, cols], mask[:, cols]
        keep = mask.any(-1)
        mask, rows = mask[keep], rows[keep.to(rows.device)]
    return keys, mask, rows


def train_layer_codes(
    encoder: LayerHashEncoder, signals: LayerSignals, cfg: TrainConfig, scaling: float, generator: torch.Generator
) -> float:
    """Stage 1 for one layer; returns the mean loss of the last tenth of the steps.

    Sequences may differ in length (2K windows and a few 8K ones: codes trained on 2K windows only
    ranked 8K contexts worse, as pairs further apart than 2K were never seen); each step draws one
    sequence with probability proportional to its length, so every key weighs the same."""
    whitened_start(encoder, torch.cat(signals.keys, dim=1).unsqueeze(0), torch.cat(signals.queries, dim=1).unsqueeze(0))
    heads = signals.queries[0].shape[0]
    device = signals.queries[0].device
    temperature = torch.nn.Parameter(torch.full((heads,), math.sqrt(cfg.bits), device=device))  # asymmetric: student side only
    params = [p for n, p in encoder.named_parameters() if n.startswith(("query_", "key_proj"))]
    optimizer = torch.optim.Adam(params + [temperature], lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.steps)
    lengths = torch.tensor([k.shape[1] for k in signals.keys], dtype=torch.float64)
    losses = []
    for step in range(cfg.steps):
        i = int(torch.multinomial(lengths, 1, generator=generator))
        keys, queries, positions = signals.keys[i].unsqueeze(0), signals.queries[i], signals.positions[i]
        rows = torch.randperm(queries.shape[1], generator=generator)[: cfg.queries_per_step]
        mask = eligible_mask(positions[rows], keys.shape[2], cfg.sinks, cfg.window)
        keys, mask, rows = sample_keys(keys, mask, rows, cfg.keys_per_step, generator)
        q = queries[:, rows]
        beta = beta_schedule(step, cfg.steps, cfg.beta_start, cfg.beta_end)
        code_q = torch.tanh(beta * encoder.query_projection(q.unsqueeze(0)))[0]  # [H, n, R]
        code_k = torch.tanh(beta * encoder.key_projection(keys))[0]  # [Hkv, K, R]
        student = grouped_scores(code_q, code_k) * (temperature.view(-1, 1, 1) / cfg.bits)
        teacher = grouped_scores(q, keys[0]) * scaling
        log_student, log_teacher = masked_log_softmax(student, mask), masked_log_softmax(teacher, mask)
        loss = row_kl(log_student, log_teacher, mask)  # the paper's direction
        if cfg.forward_weight:
            loss = loss + cfg.forward_weight * row_kl(log_teacher, log_student, mask)  # mass covering
        loss = loss + cfg.balance_weight * (bit_balance(code_q.reshape(-1, cfg.bits)) + bit_balance(code_k.reshape(-1, cfg.bits)))
        loss = loss + cfg.quant_weight * (quantization(code_q) + quantization(code_k))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    tail = losses[-max(1, cfg.steps // 10) :]
    return sum(tail) / len(tail)


def _layer_view(signals: LayerSignals, i: int, encoder: LayerHashEncoder, scaling: float):
    keys, queries, positions = signals.keys[i], signals.queries[i], signals.positions[i]
    codes, norms = encoder.encode_key(keys.unsqueeze(0))
    query_codes = encoder.encode_query(queries.unsqueeze(0))
    dist = get_backend("auto", keys.device).hamming_distance(query_codes, codes)
    probs = teacher_probs(queries, keys, positions, scaling).unsqueeze(0)
    return keys, queries, positions, codes, norms, query_codes, dist, probs


def tiered_log_probs(
    encoder: LayerHashEncoder, signals: LayerSignals, i: int, cfg: TrainConfig, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The tiered attention of sequence ``i``'s sampled queries as inference computes it (sinks and
    window plus the top ``high`` by raw distance exact, the next ``mid`` estimated and anchored on all
    high keys, the rest skipped), and the teacher's attention restricted to the same kept keys.

    Returns log-probabilities ``(student, teacher)``, Tensor[1, H, n, L] each (``-inf`` off the kept keys).
    """
    keys, queries, positions = signals.keys[i], signals.queries[i], signals.positions[i]
    heads, length = queries.shape[0], keys.shape[1]
    q = queries.unsqueeze(0)
    codes, norms = encoder.encode_key(keys.unsqueeze(0))
    query_codes = encoder.encode_query(q)
    fast = get_backend("auto", keys.device)  # integer results equal the reference's (tested), in a fraction of the time
    dist = fast.hamming_distance(query_codes, codes)
    visible = visible_mask(positions, length).view(1, 1, -1, length)
    eligible = eligible_mask(positions, length, cfg.sinks, cfg.window).view(1, 1, -1, length)
    n_eligible = eligible.sum(-1)
    high = fast.select_smallest(dist, eligible, budget_counts(n_eligible, cfg.high), 0, cfg.bits)
    high_or_mid = fast.select_smallest(dist, eligible, budget_counts(n_eligible, cfg.high + cfg.mid), 0, cfg.bits)
    high = high | (visible & ~eligible)
    tiers = torch.where(high, ops.HIGH, torch.where(high_or_mid, ops.MID, ops.LOW)).to(torch.int8)
    center = expand_kv(encoder.key_center.unsqueeze(0), heads)[0]
    mid = MidTierInputs(dist, query_codes, codes, cfg.bits, q.norm(dim=-1), norms,
                        torch.einsum("bhtd,hd->bht", q, center), encoder.mid_temperature, encoder.mid_bias,
                        encoder.residual)
    estimate = ops.mid_tier_logits(mid, scaling)
    exact = q @ expand_kv(keys.unsqueeze(0), heads).transpose(-1, -2) * scaling
    skipped = torch.full_like(exact, float("-inf"))
    student = torch.where(high, exact, torch.where(high_or_mid, estimate + ops.anchor_offset(exact, estimate, tiers), skipped))
    teacher = torch.where(high | high_or_mid, exact, skipped)
    return student.log_softmax(-1), teacher.log_softmax(-1)


def fit_mid_tier(encoder: LayerHashEncoder, signals: LayerSignals, cfg: TrainConfig, scaling: float) -> float:
    """Stage 2a: the mid-tier temperature and residual bit weights that make tiered attention match the
    teacher's: ``KL(P_teacher || P_tiered)`` over the kept keys. A logit loss weighted by teacher mass
    (the first version) ignored the many mid keys the teacher gives little mass, so their estimates
    drifted up and the mid tier took the softmax: at 8K it doubled next-token KL of trained codes
    (0.053 -> 0.015 on a held-out window with this loss). The bias is not fitted: the per-query anchor
    cancels any constant shift. Returns the last step's loss."""
    optimizer = torch.optim.Adam([encoder.mid_temperature, encoder.residual], lr=0.02)
    last = 0.0
    for step in range(cfg.stage2_steps):
        student, teacher = tiered_log_probs(encoder, signals, step % len(signals.keys), cfg, scaling)
        kept = teacher.isfinite()
        p = teacher.exp()
        loss = torch.where(kept, p * (teacher - student), torch.zeros_like(p)).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        last = loss.item()
    return last


@torch.no_grad()
def high_recall(
    encoder: LayerHashEncoder,
    views: list,
    cfg: TrainConfig,
    prior: list[torch.Tensor] | None = None,
    spatial: float = 0.0,
    temporal: float = 0.0,
) -> float:
    """Mean high-tier recall of the layer with the given discounts over precomputed ``_layer_view``s
    (prior: previous layer's teacher attention per sequence, Tensor[1, n, L])."""
    total = 0.0
    fast = get_backend("auto", views[0][0].device)
    for i, (keys, queries, positions, codes, norms, query_codes, dist, probs) in enumerate(views):
        length = keys.shape[1]
        eligible = eligible_mask(positions, length, cfg.sinks, cfg.window).view(1, 1, -1, length)
        visible = visible_mask(positions, length).view(1, 1, -1, length)
        k_high = budget_counts(eligible.sum(-1), cfg.high)
        space = consensus_mask(dist, eligible, k_high, cfg.bits, 0.5, fast) if spatial else None
        time_ = momentum_mask(prior[i], visible, 4.0) if temporal and prior is not None else None
        final, lo = calibrate(dist, space, time_, spatial, temporal)
        selected = fast.select_smallest(final, eligible, k_high, lo, cfg.bits)
        total += float(mass_recall(probs, selected, eligible.expand_as(probs)))
    return total / len(views)


def choose_discounts(
    encoder: LayerHashEncoder, signals: LayerSignals, cfg: TrainConfig, scaling: float, prior: list[torch.Tensor] | None
) -> tuple[float, float]:
    """Stage 2b: the whole-bit discounts that maximise high-tier recall (coordinate search on a few
    training sequences)."""
    count = min(len(signals.keys), cfg.discount_sequences)
    views = [_layer_view(signals, i, encoder, scaling) for i in range(count)]
    prior = prior[:count] if prior is not None else None
    spatial = max(DISCOUNT_GRID, key=lambda s: high_recall(encoder, views, cfg, None, s, 0.0))
    temporal = 0.0
    if prior is not None:
        temporal = max(DISCOUNT_GRID, key=lambda t: high_recall(encoder, views, cfg, prior, spatial, t))
    with torch.no_grad():
        encoder.spatial_discount.fill_(float(spatial))
        encoder.temporal_discount.fill_(float(temporal))
    return float(spatial), float(temporal)


def layer_prior(signals: LayerSignals, scaling: float) -> list[torch.Tensor]:
    """Teacher attention of a layer averaged over heads, per sequence: the momentum prior of the next."""
    return [
        teacher_probs(signals.queries[i], signals.keys[i], signals.positions[i], scaling).mean(0, keepdim=True)
        for i in range(len(signals.keys))
    ]


def save_checkpoint(encoders: HashEncoders, done: dict, directory: Path) -> None:
    path = directory / CHECKPOINT
    encoders.save_pretrained(path)
    (path / "progress.json").write_text(json.dumps(done, indent=2) + "\n")


def load_checkpoint(directory: Path) -> tuple[HashEncoders, dict] | None:
    path = directory / CHECKPOINT
    if not (path / "progress.json").is_file():
        return None
    return HashEncoders.from_pretrained(path), json.loads((path / "progress.json").read_text())


def train_layer(
    encoders: HashEncoders, layer: int, train_signals: dict[int, LayerSignals], cfg: TrainConfig, scaling: float,
    threads: int | None = None,
) -> dict:
    """Both stages for one layer, in place; returns its entry of ``training.json``. ``threads``: the
    torch and numba threads of the calling thread (both settings are per thread for a worker)."""
    if threads is not None:
        torch.set_num_threads(threads)
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + layer)
    encoder = encoders.layers[layer]
    encoder.train()
    loss = train_layer_codes(encoder, train_signals[layer], cfg, scaling, generator)
    encoder.eval()
    mid_error = fit_mid_tier(encoder, train_signals[layer], cfg, scaling)
    prior = layer_prior(train_signals[layer - 1], scaling) if layer - 1 in train_signals else None
    spatial, temporal = choose_discounts(encoder, train_signals[layer], cfg, scaling, prior)
    return {
        "distill_loss": loss,
        "mid_tier_kl": mid_error,
        "spatial_discount": spatial,
        "temporal_discount": temporal,
        "seconds": time.perf_counter() - start,
    }


def train_encoders(
    model,
    train_signals: dict[int, LayerSignals],
    cfg: TrainConfig,
    output: Path,
    progress=None,
) -> HashEncoders:
    """Train every non-dense layer's encoders, ``cfg.layer_workers`` layers at a time; resume from
    ``output/checkpoint`` when present.

    Training runs where the signals are (the model's device: a GPU when the model is on one)."""
    output = Path(output)
    torch.manual_seed(cfg.seed)
    encoders, done = HashEncoders.random(model, bits=cfg.bits, seed=cfg.seed), {}
    resumed = load_checkpoint(output)
    if resumed is not None:
        # only finished layers come back: a checkpoint written while a worker trained another layer
        # holds that layer half-trained, and it must restart from its random initialisation
        previous, done = resumed
        previous.check_compatible(model)
        if previous.bits != cfg.bits:
            raise ValueError(f"the checkpoint in {output} holds {previous.bits}-bit encoders but bits={cfg.bits}; "
                             "use the same bits or another output folder")
        for layer in done:
            encoders.layers[int(layer)].load_state_dict(previous.layers[int(layer)].state_dict())
        logger.info("resuming: %d layers already trained", len(done))
    encoders.to(next(model.parameters()).device)
    scaling = attention_scaling(model)
    todo = [i for i in tiered_layers(model) if i not in cfg.dense_layers and str(i) not in done]
    workers = min(cfg.layer_workers, max(1, len(todo)))
    threads = max(1, torch.get_num_threads() // workers) if workers > 1 else None
    main_threads, main_numba = torch.get_num_threads(), numba.get_num_threads()
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        jobs = {
            layer: pool.submit(train_layer, encoders, layer, train_signals, cfg, scaling, threads) for layer in todo
        }
        iterator = progress(todo) if progress is not None else todo
        for layer in iterator:  # in order: workers take layers in order, so waiting in order loses little
            done[str(layer)] = jobs[layer].result()
            if hasattr(iterator, "set_postfix"):
                iterator.set_postfix(layer=layer, loss=f"{done[str(layer)]['distill_loss']:.3f}")
            save_checkpoint(encoders, done, output)
    finally:
        pool.shutdown(cancel_futures=True)
        torch.set_num_threads(main_threads)
        numba.set_num_threads(main_numba)
    dtype = getattr(torch, cfg.weights_dtype)
    with torch.no_grad():  # round in place: what the caller measures next is what the file holds
        for tensor in encoders.state_dict().values():
            tensor.copy_(tensor.to(dtype))
    encoders.save_pretrained(output, dtype=dtype)
    shutil.rmtree(output / CHECKPOINT, ignore_errors=True)  # finished: nothing left to resume
    (output / "training.json").write_text(json.dumps({"config": asdict(cfg), "layers": done}, indent=2) + "\n")
    return encoders
