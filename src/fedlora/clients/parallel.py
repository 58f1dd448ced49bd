"""Many clients, one pass: a group of a round's clients trained in one forward/backward.

A simulated round trains its clients one after another on one base model; each client's step
is small, so a GPU mostly waits for kernel launches. `train_clients_together` trains up to K
clients at once on the same `fedlora.clients.host.LoraHost`:

* The frozen base runs once over the group's concatenated batch: every client's micro-batch
  (its rows, one after the other) padded to the group's longest sequence (extra right padding
  is masked, so a client's tokens compute what they compute alone).
* Each LoRA target module gets a forward hook adding, to client k's rows, ``scale_k B_k A_k x``
  (`_Stack`): the clients' factors are stacked per module, zero-padded to the group's largest
  rank, as two leaf tensors (one batched matmul pair per module, whatever K; clients with
  fewer rows are zero-padded inside that matmul only, `_Layout.gather`). A zero pad slot
  stays zero: its gradients are exactly zero (B's pad column multiplies A's pad row), and no
  optimizer ever sees it. peft's own LoRA layers are disabled meanwhile.
* Per client (`_Member`): AdamW over views of its own slots (its learning rates, schedule,
  step count and state), its own gradient clipping, its token-weighted loss (each client's
  loss is computed from its rows alone and their sum is differentiated: parameters are
  disjoint, so each client's gradient is its own), its own fp16 gradient scaler, its
  trainable set (FFA-LoRA's frozen A, LoRA-A2's alternating freeze and masked slots via
  `fedlora.clients.train.SlotMask`), HetLoRA's penalty, its copy of the dense modules (a classifier
  head, run on its rows with `torch.func.functional_call`), and its number of steps: a client
  whose steps are done leaves the group's batch. A client whose loss becomes non-finite is
  dropped alone (its rows only ever reach its own factors).
* Dropout: each client keeps its own RNG stream, seeded as `fedlora.clients.train.train_client`
  seeds it; while the group's forward runs, `_ClientDropout` applies every dropout (modules,
  functional, peft's lora_dropout and SDPA's attention dropout) per client, on the client's
  rows cropped to its own sequence length, under its own RNG state, so the masks are the ones
  sequential training draws.

Batch order, initialisation, optimizer, loss weighting, clipping, slot selection and the
returned `ClientUpdate` come from the same functions sequential training uses
(`fedlora.clients.train`, `fedlora.clients.local_steps`). What a group cannot batch (local DP-SGD,
``train.compile``, gradient checkpointing, clients with different merges or trainable sets)
is refused with a reason (`group_problem`); the caller trains those clients sequentially.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from fedlora.clients.device import Amp, resolve_precision
from fedlora.clients.host import LoraHost
from fedlora.clients.local_steps import (
    check_loss,
    check_penalty,
    micro_weight,
    optimizer_step,
    target_count,
)
from fedlora.clients.train import (
    SlotMask,
    TrainConfig,
    TrainedState,
    _client_device,
    _features,
    build_optimizer,
    client_seed,
    make_update,
    plan_steps,
    slots_from_grads,
)
from fedlora.core.contract import ClientSpec, ClientUpdate, FedLoraError, LoraFactors, Payload
from fedlora.data import collate, pad_id
from fedlora.strategies.hetlora import self_pruning_penalty

LOG = logging.getLogger("fedlora.clients.parallel")

Item = tuple[ClientSpec, Payload, Sequence[Any]]


# -- what can be batched ---------------------------------------------------------------------


def _same_merge(a: Payload, b: Payload) -> bool:
    ma, mb = dict(a.merge or {}), dict(b.merge or {})
    if ma.keys() != mb.keys():
        return False
    for m, f in ma.items():
        g = mb[m]
        if f is g:
            continue
        if f.scale != g.scale or not (torch.equal(f.A, g.A) and torch.equal(f.B, g.B)):
            return False
    return True


def _recipe(p: Payload) -> tuple:
    """The client-side instructions that shape the training loop itself."""
    het = p.extras.get("hetlora")
    return (
        frozenset(p.trainable),
        p.extras.get("budget") is not None,
        bool(p.extras.get("masked_training")),
        bool(het) and float(het.get("lambda", 0.0)) > 0,
    )


def group_problem(items: Sequence[Item], cfg: TrainConfig, privacy: Any = None) -> str | None:
    """Why these clients cannot train as one group (None: they can)."""
    if privacy is not None:
        return "local DP-SGD computes per-example gradients of one client at a time"
    if cfg.compile:
        return "train.compile compiles one client's adapter shapes"
    if cfg.gradient_checkpointing:
        return "train.gradient_checkpointing recomputes forwards outside the group's hooks"
    first = items[0][1]
    for _spec, p, _ex in items[1:]:
        if not _same_merge(first, p):
            return "the clients' payloads merge different deltas into the base weights"
        if _recipe(p) != _recipe(first):
            return "the clients' trainable factors or client-side options differ"
    return None


# -- one client of a group ---------------------------------------------------------------------


class _Rng:
    """A client's own global-RNG stream (CPU, and the CUDA device's), seeded like
    `train_client` seeds it; `active` swaps it in around one draw."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.cuda_index = device.index or 0 if device.type == "cuda" else None
        torch.manual_seed(seed)
        self.cpu = torch.get_rng_state()
        self.cuda = (
            torch.cuda.get_rng_state(self.cuda_index) if self.cuda_index is not None else None
        )

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.cuda_index)
        yield
        self.cpu = torch.get_rng_state()
        if self.cuda is not None:
            self.cuda = torch.cuda.get_rng_state(self.cuda_index)


@dataclass(eq=False)
class _Member:
    """One client of a group: its data and plan, its factors' views, optimizer and results."""

    k: int
    spec: ClientSpec
    payload: Payload
    data: list[dict[str, Any]]
    steps: list[list[list[int]]]
    factors: dict[str, LoraFactors]
    seed: int
    before: dict[str, LoraFactors] | None = None
    dense: dict[str, nn.Parameter] = field(default_factory=dict)
    views: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # A, B^T
    weights: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)
    opt: Any = None
    params: list = field(default_factory=list)
    scaler: Any = None
    sched: Any = None
    rng: _Rng | None = None
    mask: SlotMask | None = None
    slots: dict[str, torch.Tensor] | None = None
    losses: list[float] = field(default_factory=list)
    penalties: list[float] = field(default_factory=list)
    loss_sum: float = 0.0
    error: Exception | None = None

    @property
    def who(self) -> str:
        return f"client {self.spec.client_id}"

    def live(self, step: int) -> bool:
        return self.error is None and step < len(self.steps)

    def het(self) -> tuple[float, float]:
        het = self.payload.extras.get("hetlora")
        if not het:
            return 0.0, 1.0
        return float(het.get("lambda", 0.0)), float(het.get("gamma", 1.0))


def _member(host: LoraHost, k: int, item: Item, cfg: TrainConfig, tokenizer, rnd: int) -> _Member:
    """Validate and plan one client exactly as `train_client` does (errors are the client's)."""
    spec, payload, examples = item
    who = f"client {spec.client_id}"
    if not examples:
        raise FedLoraError(f"{who}: no training examples")
    data = _features(examples, tokenizer, cfg.max_length, who)
    factors = host._client_factors(spec, payload)
    seed = client_seed(cfg, spec, rnd)
    steps = plan_steps(len(data), cfg, torch.Generator().manual_seed(seed))
    mem = _Member(k, spec, payload, data, steps, factors, seed)
    if payload.extras.get("budget") is not None:
        mem.before = {
            m: LoraFactors(f.A.float().clone(), f.B.float().clone(), float(f.scale))
            for m, f in factors.items()
        }
    host.dense.load(payload.dense, who)  # validates the client's dense tensors
    mem.dense = {
        name: nn.Parameter(p.detach().clone()) for name, p in sorted(host.dense.params.items())
    }
    return mem


# -- stacked factors ------------------------------------------------------------------------------


@dataclass
class _Stack:
    """One module's factors of the group's clients that train it: A (n, r_max, d_in) and B
    transposed, Bt (n, r_max, d_out), zero-padded to the largest rank, their scales, client k
    -> position. B is kept transposed so that each client's slots are one contiguous block
    (the optimizer's and clipping's multi-tensor kernels need dense tensors)."""

    A: torch.Tensor
    Bt: torch.Tensor
    scale: torch.Tensor
    slot: dict[int, int]


def _stacks(members: list[_Member], host: LoraHost, trainable, device) -> dict[str, _Stack]:
    shapes = host.shapes()
    out: dict[str, _Stack] = {}
    for m in host.module_names():
        owners = [mem for mem in members if m in mem.factors]
        if not owners:
            continue
        d_out, d_in = shapes[m]
        r_max = max(mem.factors[m].rank for mem in owners)
        A = torch.zeros(len(owners), r_max, d_in, device=device)
        Bt = torch.zeros(len(owners), r_max, d_out, device=device)
        for i, mem in enumerate(owners):
            f = mem.factors[m]
            A[i, : f.rank] = f.A.to(device, torch.float32)
            Bt[i, : f.rank] = f.B.T.to(device, torch.float32)
        A.requires_grad_("A" in trainable)
        Bt.requires_grad_("B" in trainable)
        scale = torch.tensor([float(mem.factors[m].scale) for mem in owners], device=device)
        out[m] = _Stack(A, Bt, scale, {mem.k: i for i, mem in enumerate(owners)})
    for mem in members:
        with torch.no_grad():  # views of the client's own slots: what its optimizer steps
            mem.views = {
                m: (st.A[st.slot[mem.k], :r], st.Bt[st.slot[mem.k], :r])
                for m, st in out.items()
                if mem.k in st.slot
                for r in [mem.factors[m].rank]
            }
            # the same storage as (A, B, scale): slot selection, slot masks, read-out
            mem.weights = {
                m: (a, bt.T, float(mem.factors[m].scale)) for m, (a, bt) in mem.views.items()
            }
    return out


def _scaled(y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``y * scale`` rounded as peft's ``lora_B(...) * scaling`` rounds it (a 16-bit product
    computed in float32, then rounded once)."""
    if y.dtype == torch.float32:
        return y * scale
    return (y.float() * scale).to(y.dtype)


# -- the group's batch layout ----------------------------------------------------------------------


@dataclass
class _Layout:
    """The group batch of one forward: client k's ``rows[k]`` rows (from ``offsets[k]``) of
    ``length`` tokens (``lengths[k]`` its own)."""

    members: list[_Member]
    rows: list[int]
    lengths: list[int]
    length: int
    unpadded: list[bool] = field(default_factory=list)  # no padding in client k's own batch
    offsets: list[int] = field(default_factory=list)
    _gather: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.offsets = [sum(self.rows[:k]) for k in range(len(self.rows))]

    @property
    def total(self) -> int:
        return sum(self.rows)

    @property
    def uniform(self) -> bool:
        return min(self.rows) == max(self.rows)

    def real(self, k: int) -> slice:
        return slice(self.offsets[k], self.offsets[k] + self.rows[k])

    def gather(self, t: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices between the batch's flat rows (``total * t`` of them, ``t`` per example,
        plus a zero row at the end) and a (K, max rows * t) padded grid: (into the grid,
        back from it)."""
        key = (t, device)
        if key not in self._gather:
            block = max(self.rows) * t
            zero = self.total * t
            into, back = [], []
            for k, (o, r) in enumerate(zip(self.offsets, self.rows)):
                real = torch.arange(o * t, (o + r) * t)
                into += [real, torch.full((block - r * t,), zero)]
                back.append(torch.arange(k * block, k * block + r * t))
            self._gather[key] = (torch.cat(into).to(device), torch.cat(back).to(device))
        return self._gather[key]


def _group_batch(
    parts: list[tuple[_Member, dict[str, torch.Tensor]]], pad_id: int
) -> tuple[dict[str, torch.Tensor], _Layout]:
    """Concatenate the clients' collated micro-batches into one model input."""
    rows = [int(b["input_ids"].shape[0]) for _, b in parts]
    lengths = [int(b["input_ids"].shape[1]) for _, b in parts]
    length = max(lengths)
    fill = {"input_ids": pad_id}
    inputs: dict[str, list[torch.Tensor]] = {}
    for _, b in parts:
        for key, v in b.items():
            if key != "labels":
                v = F.pad(v, (0, length - v.shape[1]), value=fill.get(key, 0))
                inputs.setdefault(key, []).append(v)
    batch = {k: torch.cat(v) for k, v in inputs.items()}
    unpadded = [bool(b["attention_mask"].all()) for _, b in parts]
    return batch, _Layout([m for m, _ in parts], rows, lengths, length, unpadded)


def _client_loss(model: nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss the model's forward computes from `labels`, on one client's rows (transformers'
    own loss functions: a causal LM's shifted token mean, a classifier's cross-entropy)."""
    from transformers.loss.loss_utils import ForCausalLMLoss, ForSequenceClassificationLoss

    if labels.dim() == 2:
        logits = logits[:, : labels.shape[1]].contiguous()
        return ForCausalLMLoss(logits, labels, model.config.vocab_size)
    return ForSequenceClassificationLoss(labels, logits, model.config)


# -- per-client dropout ----------------------------------------------------------------------


def has_dropout(model: nn.Module, lora_dropout: float) -> bool:
    """Whether training `model` draws random numbers (any dropout with p > 0)."""
    if lora_dropout > 0:
        return True
    if any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules()):
        return True
    config = getattr(model, "config", None)
    for key, v in (vars(config) if config is not None else {}).items():
        if "dropout" in key and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
            return True
    return False


class _ClientDropout(TorchFunctionMode):
    """Applies every dropout of the group's forward per client block, under the client's own
    RNG stream, on its real rows cropped to its own sequence length: the masks sequential
    training draws. Sequence dimensions: dimension 1 of (batch, tokens, features) tensors,
    dimensions 2 and 3 of (batch, heads, tokens, tokens) attention probabilities, when they
    have the group's length (a 2-d (batch, features) tensor has none)."""

    def __init__(self, group: _Group) -> None:
        super().__init__()
        self.group = group

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        lay = self.group.layout
        if lay is not None and func is F.dropout:
            x, p, training = _dropout_args(args, kwargs)
            if training and p > 0 and x.shape[0] == lay.total:
                return self._per_client(lay, x, lambda t: F.dropout(t, p, True))
        if lay is not None and func is F.scaled_dot_product_attention:
            p = kwargs.get("dropout_p", args[4] if len(args) > 4 else 0.0)
            if p > 0 and args[0].shape[0] == lay.total:
                return self._sdpa(lay, func, args, kwargs)
        return func(*args, **kwargs)

    def _per_client(self, lay: _Layout, x: torch.Tensor, fn) -> torch.Tensor:
        pieces = []
        for k, mem in enumerate(lay.members):
            real = x[lay.real(k)]
            seq = {3: (1,), 4: (2, 3)}.get(real.dim(), ())
            crop = tuple(
                slice(0, lay.lengths[k]) if d in seq and n == lay.length else slice(None)
                for d, n in enumerate(real.shape)
            )
            with mem.rng.active():
                dropped = fn(real[crop])
            if lay.lengths[k] < lay.length:  # its padding positions: left as they are
                full = real.clone()
                full[crop] = dropped
                dropped = full
            pieces.append(dropped)
        return torch.cat(pieces)

    def _sdpa(self, lay: _Layout, func, args, kwargs) -> torch.Tensor:
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
        kw = dict(zip(names, args)) | kwargs
        q, k_, v, mask = kw.pop("query"), kw.pop("key"), kw.pop("value"), kw.pop("attn_mask", None)
        pieces = []
        for k, mem in enumerate(lay.members):
            rows, t = lay.real(k), lay.lengths[k]
            m = None
            # an unpadded bidirectional batch: transformers passes no mask (the kernel it
            # picks then, and so its dropout draws, depend on that)
            if mask is not None and not (lay.unpadded[k] and not kw.get("is_causal")):
                m = (mask[rows] if mask.shape[0] > 1 else mask)[..., :t, :t]
            with mem.rng.active():
                out = func(q[rows, :, :t], k_[rows, :, :t], v[rows, :, :t], attn_mask=m, **kw)
            pieces.append(F.pad(out, (0, 0, 0, lay.length - t)))
        return torch.cat(pieces)


def _dropout_args(args, kwargs) -> tuple[torch.Tensor, float, bool]:
    names = ("input", "p", "training", "inplace")
    kw = {"p": 0.5, "training": True} | dict(zip(names, args)) | kwargs
    return kw["input"], float(kw["p"]), bool(kw["training"])


# -- the group --------------------------------------------------------------------------------


class _Group:
    """The group's hooks on one host and its training loop (see the module docstring)."""

    def __init__(self, host: LoraHost, members: list[_Member], cfg: TrainConfig, pad_id: int):
        self.host, self.members, self.cfg, self.pad_id = host, members, cfg, pad_id
        self.model = host.model
        self.device = host.device
        self.amp = Amp(self.device, resolve_precision(cfg.precision, self.device))
        self.trainable = members[0].payload.trainable
        self.stacks = _stacks(members, host, self.trainable, self.device)
        self.layout: _Layout | None = None
        self.lora_p = host.adapters.lora_dropout
        self.dropout = has_dropout(self.model, self.lora_p)
        self._in_dense = False

    # hooks

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """The multi-client LoRA and dense hooks, peft's adapters off, the shared dense
        parameters frozen; everything restored on exit."""
        handles = [
            self.host.base.modules[m].register_forward_hook(self._lora_hook(m)) for m in self.stacks
        ]
        dense_modules = sorted({n.rsplit(".", 1)[0] for n in self.host.dense.params})
        for name in dense_modules:
            module = self.model.get_submodule(name)
            handles.append(
                module.register_forward_hook(self._dense_hook(name, module), with_kwargs=True)
            )
        flags = {p: p.requires_grad for p in self.host.dense.params.values()}
        for p in flags:
            p.requires_grad_(False)
        was_training = self.model.training
        try:
            with self.host.adapters.disabled():
                self.model.train()
                yield
        finally:
            for h in handles:
                h.remove()
            for p, flag in flags.items():
                p.requires_grad_(flag)
            self.model.train(was_training)

    def _lora_hook(self, m: str):
        st = self.stacks[m]

        def hook(module: nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor | None:
            lay = self.layout
            if lay is None:
                return None
            x = inputs[0].to(torch.float32)  # peft casts the input to the factors' dtype
            if self.lora_p > 0:
                x = F.dropout(x, self.lora_p, True)
            flat = x.reshape(-1, x.shape[-1])
            t = flat.shape[0] // lay.total  # positions per example
            pos = [st.slot.get(mem.k) for mem in lay.members]
            if None in pos:
                return out + self._lora_loop(st, pos, flat, lay, t).reshape(out.shape)
            if pos == list(range(st.A.shape[0])):
                A, Bt, s = st.A, st.Bt, st.scale
            else:
                idx = torch.tensor(pos, device=st.A.device)
                A, Bt, s = st.A.index_select(0, idx), st.Bt.index_select(0, idx), st.scale[idx]
            if lay.uniform:
                xs = flat.view(len(pos), -1, flat.shape[-1])
            else:  # zero rows pad the clients with fewer examples, in this matmul only
                into, back = lay.gather(t, flat.device)
                grid = torch.cat([flat, flat.new_zeros(1, flat.shape[-1])]).index_select(0, into)
                xs = grid.view(len(pos), -1, flat.shape[-1])
            y = _scaled(torch.bmm(torch.bmm(xs, A.transpose(1, 2)), Bt), s.view(-1, 1, 1))
            if not lay.uniform:
                y = y.reshape(-1, y.shape[-1]).index_select(0, back)
            return out + y.reshape(out.shape)

        return hook

    @staticmethod
    def _lora_loop(st: _Stack, pos, flat: torch.Tensor, lay: _Layout, t: int) -> torch.Tensor:
        """Clients without this module add nothing to their rows (a rare mixed group)."""
        ys = []
        for k, p in enumerate(pos):
            rows = flat[lay.offsets[k] * t : (lay.offsets[k] + lay.rows[k]) * t]
            if p is None:
                ys.append(rows.new_zeros(rows.shape[0], st.Bt.shape[2]))
                continue
            ys.append(_scaled(F.linear(rows, st.A[p]) @ st.Bt[p], st.scale[p]))
        return torch.cat(ys)

    def _dense_hook(self, name: str, module: nn.Module):
        def hook(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
            lay = self.layout
            if lay is None or self._in_dense:
                return None
            n = lay.total
            self._in_dense = True
            try:
                pieces = []
                for k, mem in enumerate(lay.members):
                    rows = lay.real(k)
                    sub = tuple(a[rows] if _rows(a, n) else a for a in args)
                    params = {
                        full[len(name) + 1 :]: p
                        for full, p in mem.dense.items()
                        if full.rsplit(".", 1)[0] == name
                    }
                    pieces.append(torch.func.functional_call(mod, params, sub, kwargs))
            finally:
                self._in_dense = False
            return torch.cat(pieces)

        return hook

    # training

    def train(self) -> None:
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            for mem in self.members:
                mem.rng = _Rng(mem.seed, self.device)
            for mem in self.members:
                self._setup(mem)
            first = self.members[0].payload.extras  # the group shares its recipe
            if first.get("budget") is not None and first.get("masked_training"):
                self._probe()
            for s in range(max(len(mem.steps) for mem in self.members)):
                self._step(s)
            for mem in self.members:
                if mem.mask is not None:
                    mem.mask.remove()

    def _setup(self, mem: _Member) -> None:
        try:
            a = [v[0] for v in mem.views.values()] if "A" in self.trainable else []
            b = [v[1] for v in mem.views.values()] if "B" in self.trainable else []
            dense = list(mem.dense.values())
            mem.opt, mem.params = build_optimizer(a, b, dense, self.cfg, mem.who, mem.payload)
            mem.scaler = self.amp.scaler()
            mem.sched = torch.optim.lr_scheduler.LambdaLR(mem.opt, self._schedule(len(mem.steps)))
        except Exception as e:  # noqa: BLE001 - the client's own failure
            mem.error = e

    def _schedule(self, total: int):
        from fedlora.clients.local_steps import lr_factor

        cfg = self.cfg
        return lambda s: lr_factor(s, total, cfg.lr_scheduler, cfg.warmup_steps)

    def _collated(self, mem: _Member, idx: list[int]) -> dict[str, torch.Tensor]:
        return collate([mem.data[i] for i in idx], self.pad_id)

    def _forward(self, parts: list[tuple[_Member, dict[str, torch.Tensor]]]) -> list:
        """One forward of the group batch; each part's loss on its own rows."""
        batch, lay = _group_batch(parts, self.pad_id)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        self.layout = lay
        mode = _ClientDropout(self) if self.dropout else contextlib.nullcontext()
        try:
            with self.amp.autocast():
                with mode:
                    logits = self.model(**batch).logits
                return [
                    _client_loss(self.model, logits[lay.real(k)], b["labels"].to(self.device))
                    for k, (_, b) in enumerate(parts)
                ]
        finally:
            self.layout = None

    def _probe(self) -> None:
        """LoRA-A2's slots from each client's first-step gradient (`_a2_probe_slots`)."""
        live = [m for m in self.members if m.error is None]
        if not live:
            return
        micro = {m.k: [self._collated(m, idx) for idx in m.steps[0]] for m in live}
        for j in range(max(len(v) for v in micro.values())):
            parts = [(m, micro[m.k][j]) for m in live if j < len(micro[m.k])]
            losses = self._forward(parts)
            sum(loss / len(micro[m.k]) for (m, _), loss in zip(parts, losses)).backward()
        for m in live:
            self._grads_to_views(m)
            budget = m.payload.extras["budget"]  # each client's own
            m.slots = slots_from_grads(m.weights, m.payload.trainable, budget)
            m.mask = SlotMask(m.weights, m.slots, m.payload.trainable, m.opt, hook=False)
        self._zero_grads()

    def _zero_grads(self) -> None:
        for st in self.stacks.values():
            st.A.grad = st.Bt.grad = None
        for m in self.members:
            for p in m.params:
                p.grad = None

    def _grads_to_views(self, m: _Member) -> None:
        for mod, (a, bt) in m.views.items():
            st, i = self.stacks[mod], self.stacks[mod].slot[m.k]
            a.grad = st.A.grad[i, : a.shape[0]] if st.A.grad is not None else None
            bt.grad = st.Bt.grad[i, : bt.shape[0]] if st.Bt.grad is not None else None
            m.weights[mod][1].grad = bt.grad.T if bt.grad is not None else None

    def _step(self, s: int) -> None:
        """Optimizer step `s` of every client that has one (as
        `fedlora.clients.local_steps.run_steps` steps one)."""
        live = [m for m in self.members if m.live(s)]
        if not live:
            return
        self._zero_grads()
        micro = {m.k: [self._collated(m, idx) for idx in m.steps[s]] for m in live}
        counts = {k: [target_count(b) for b in v] for k, v in micro.items()}
        for m in live:
            m.loss_sum = 0.0
        for j in range(max(len(v) for v in micro.values())):
            parts = []
            for m in live:
                c = counts[m.k]
                if m.error is None and j < len(c) and not (c[j] == 0 and sum(c) > 0):
                    parts.append((m, micro[m.k][j]))
            if parts:
                self._backward(parts, [(counts[m.k][j], sum(counts[m.k])) for m, _ in parts], s)
        self._penalties([m for m in live if m.error is None])
        for m in live:
            if m.error is not None:
                continue
            self._grads_to_views(m)
            if m.mask is not None:
                m.mask.mask_grads()
            optimizer_step(m.opt, m.scaler, m.sched, m.params, self.cfg.grad_clip)
            m.losses.append(m.loss_sum)

    def _backward(self, parts, counts: list[tuple[int, int]], s: int) -> None:
        losses = self._forward(parts)
        weighted = [
            micro_weight(loss, n, total, len(m.steps[s]))
            for (m, _), loss, (n, total) in zip(parts, losses, counts)
        ]
        values = torch.stack([w.detach().float() for w in weighted]).tolist()  # one sync
        total_loss = None
        for (m, _), loss, w, v in zip(parts, losses, weighted, values):
            try:
                check_loss(loss, m.who, s + 1)
            except FedLoraError as e:  # dropped alone: its rows reach only its own factors
                m.error = e
                continue
            m.loss_sum += v
            term = m.scaler.scale(w)
            total_loss = term if total_loss is None else total_loss + term
        if total_loss is not None:
            total_loss.backward()

    def _penalties(self, live: list[_Member]) -> None:
        """HetLoRA's self-pruning penalty of each client, added to its gradient."""
        total = None
        for m in live:
            lam, gamma = m.het()
            if lam <= 0:
                continue
            pen = sum(
                self_pruning_penalty(
                    self.stacks[mod].A[self.stacks[mod].slot[m.k], : a.shape[0]],
                    self.stacks[mod].Bt[self.stacks[mod].slot[m.k], : b.shape[1]].T,
                    gamma,
                    sc,
                )
                for mod, (a, b, sc) in m.weights.items()
            )
            try:
                check_penalty(pen, m.who)
            except FedLoraError as e:
                m.error = e
                continue
            m.penalties.append(float(pen.detach()))
            term = m.scaler.scale(lam * pen)
            total = term if total is None else total + term
        if total is not None:
            total.backward()

    def trained(self, m: _Member) -> TrainedState:
        adapter = {
            mod: LoraFactors(
                a.detach().to("cpu", torch.float32, copy=True),
                b.detach().to("cpu", torch.float32, copy=True).contiguous(),
                sc,
            )
            for mod, (a, b, sc) in m.weights.items()
        }
        dense = {k: p.detach().to("cpu", torch.float32, copy=True) for k, p in m.dense.items()}
        return TrainedState(adapter, dense, m.losses, m.penalties, m.slots)


def _rows(a: Any, n: int) -> bool:
    return isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == n


# -- entry point ---------------------------------------------------------------------------------


def train_clients_together(
    host: LoraHost,
    items: Sequence[Item],
    cfg: TrainConfig | None = None,
    tokenizer: Any = None,
    *,
    server_round: int = 0,
    privacy: Any = None,
) -> list[ClientUpdate | Exception] | None:
    """Train the clients of `items` ((spec, payload, examples) each) as one group on `host`.

    Returns, in the order of `items`, each client's `ClientUpdate` (what
    `fedlora.clients.train.train_client` returns for it, up to float rounding) or the exception that
    dropped it; None when the group cannot be batched (`group_problem`, logged): then train
    the clients one by one. A client's ``train_seconds`` extra is the group's wall time (the
    clients share it); memory holds the whole group's activations at once.
    """
    cfg = cfg or TrainConfig()
    if not items:
        return []
    problem = group_problem(items, cfg, privacy)
    if problem is not None:
        LOG.info("%d clients trained one by one: %s", len(items), problem)
        return None
    t0 = time.perf_counter()
    try:
        _client_device(host, cfg, f"client {items[0][0].client_id}")
    except FedLoraError as e:  # what each client would raise alone
        return [e] * len(items)
    results: list[ClientUpdate | Exception | None] = [None] * len(items)
    members = []
    for k, item in enumerate(items):
        try:
            members.append(_member(host, k, item, cfg, tokenizer, server_round))
        except Exception as e:  # noqa: BLE001 - a client's bad input drops that client
            results[k] = e
    if members:
        host.base.apply(dict(members[0].payload.merge or {}))
        group = _Group(host, members, cfg, pad_id(tokenizer, host.model))
        with group.installed():
            group.train()
        for m in members:
            if m.error is not None:
                results[m.k] = m.error
                continue
            results[m.k] = make_update(
                m.spec, m.payload, m.before, group.trained(m), len(m.data), {}, t0
            )
    return results  # type: ignore[return-value] - every entry was filled
