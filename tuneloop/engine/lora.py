"""LoRA adapters served per row: every sequence of a batch with its own adapter, or none.

Boundary: adapter folders in (what peft's ``save_pretrained`` writes), and for
a step's rows the low-rank deltas ``scale * B A x`` to add to the base
projections' outputs. It knows module paths and tensors, not requests.

How (the S-LoRA / Punica idea, on a CPU or one GPU): the base weights are
never changed; the shared base matrix multiply runs once for the whole
batch, and each row then adds its own adapter's delta. The adapters loaded
(``AdapterBank``) are kept stacked, one ``[slots, in, rank]`` A and one
``[slots, rank, out]`` B per group of projections that read the same input
(q/k/v, gate/up in the fused step; one module each through transformers),
ranks padded to the largest with zeros and the scaling folded into B. A
step's rows are grouped by adapter (``Plan``): the rows of each adapter are
gathered into one padded ``[adapters, rows, in]`` block, so every group of
projections costs two ``bmm`` whatever the number of distinct adapters,
and each adapter's weights are read once a step (not once a row).

The adapter files are read by peft (``PeftConfig``, ``load_peft_weights``);
only plain LoRA is served this way (DoRA, AdaLoRA, IA3, trained biases or
saved modules change the base weights themselves: they can only be merged,
``Engine.swap_adapter``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tuneloop.errors import ModelError

log = logging.getLogger(__name__)

_PREFIX = "base_model.model."


@dataclass(eq=False)
class Adapter:
    """One loaded adapter: per module path, ``A^T`` ``[in, r]`` and ``scale * B^T`` ``[r, out]``."""

    name: str
    path: str
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return max((a.shape[1] for a, _ in self.weights.values()), default=0)


def read_adapter(name: str, path: str | Path, model: nn.Module) -> Adapter:
    """The LoRA adapter in folder ``path`` for ``model``'s linears, in its dtype and on its device.

    ``ModelError`` (one line) for a folder that is not a plain LoRA adapter of this model.
    """
    from peft import PeftConfig
    from peft.utils import load_peft_weights

    folder = Path(path)
    if not (folder / "adapter_config.json").exists():
        raise ModelError(f"cannot load adapter {name}: {folder} has no adapter_config.json")
    from safetensors import SafetensorError

    try:
        config = PeftConfig.from_pretrained(str(folder))
        tensors = load_peft_weights(str(folder), device="cpu")
    except (OSError, ValueError, KeyError, SafetensorError) as e:  # a truncated or foreign file
        raise ModelError(f"cannot load adapter {name} from {folder}: {type(e).__name__}: {e}") from None
    kind = str(getattr(config.peft_type, "value", config.peft_type))
    if kind != "LORA" or getattr(config, "use_dora", False):
        kind = "DORA" if kind == "LORA" else kind
        raise ModelError(f"cannot serve adapter {name} per request: it is {kind}, and only plain LoRA "
                         "adds a delta beside the base weights ([trainer] peft = \"lora\", or scope = \"global\")")
    if getattr(config, "bias", "none") != "none" or getattr(config, "modules_to_save", None):
        raise ModelError(f"cannot serve adapter {name} per request: it trains biases or whole modules; "
                         "only plain LoRA can be served beside the base weights")
    if getattr(config, "alpha_pattern", None):
        raise ModelError(f"cannot serve adapter {name} per request: per-module alpha (alpha_pattern) is not supported")
    param = next(model.parameters())
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if key.startswith(_PREFIX) and key.endswith(suffix):
                pairs.setdefault(key[len(_PREFIX) : -len(suffix)], {})[part] = tensor
                break
        else:
            raise ModelError(f"cannot serve adapter {name} per request: unexpected tensor {key}")
    adapter = Adapter(name, str(folder))
    for module_path, pair in pairs.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise ModelError(f"cannot load adapter {name}: {module_path} lacks lora_A or lora_B")
        try:
            linear = model.get_submodule(module_path)
        except AttributeError:
            raise ModelError(f"cannot load adapter {name}: the model has no module {module_path}") from None
        a, b = pair["lora_A"], pair["lora_B"]  # [r, in], [out, r]
        if not isinstance(linear, nn.Linear) or a.shape[1] != linear.in_features or b.shape[0] != linear.out_features:
            raise ModelError(f"cannot load adapter {name}: {module_path} does not match the model "
                             f"(A {tuple(a.shape)}, B {tuple(b.shape)})")
        r = a.shape[0]
        alpha = config.lora_alpha
        scale = alpha / r**0.5 if getattr(config, "use_rslora", False) else alpha / r
        adapter.weights[module_path] = (
            a.t().to(device=param.device, dtype=param.dtype).contiguous(),
            (b.t().double() * scale).to(device=param.device, dtype=param.dtype).contiguous(),
        )
    if not adapter.weights:
        raise ModelError(f"cannot load adapter {name}: {folder} holds no LoRA weights")
    return adapter


class Plan:
    """How a step's rows (or a prefill's tokens) are grouped by adapter.

    ``slots[i]`` is row ``i``'s adapter slot in the bank, -1 for none. Rows of
    the same adapter are gathered into a padded block ``[adapters, width]``;
    padding repeats a row of its block and its outputs are never read.
    """

    def __init__(self, slots: list[int], stacks: dict[object, tuple[torch.Tensor, torch.Tensor]], device) -> None:
        self.stacks = stacks  # the bank's at the time: a plan stays consistent with its slots
        total = next(iter(stacks.values()))[0].shape[0] if stacks else 0
        n = len(slots)
        groups: dict[int, list[int]] = {}
        for i, s in enumerate(slots):
            if s >= 0:
                groups.setdefault(s, []).append(i)
        used = sorted(groups)
        self.count = len(used)
        self.width = max(len(g) for g in groups.values())
        # All rows on one adapter: two plain matrix multiplies, nothing gathered.
        self.single = used[0] if len(used) == 1 and len(groups[used[0]]) == n else None
        gather, where = [], {}
        for k, s in enumerate(used):
            rows = groups[s]
            for j, r in enumerate(rows):
                where[r] = k * self.width + j
            gather += rows + [rows[0]] * (self.width - len(rows))
        with_adapter = [i for i in range(n) if slots[i] >= 0]
        self.gather = torch.tensor(gather, device=device)
        self.src = torch.tensor([where[i] for i in with_adapter], device=device)
        self.rows = None if len(with_adapter) == n else torch.tensor(with_adapter, device=device)
        if self.single is None and used != list(range(total)):
            # Only the adapters these rows use, copied once per plan (plans
            # change when rows join or leave), not gathered again every step.
            select = torch.tensor(used, device=device)
            self.stacks = {k: (a.index_select(0, select), b.index_select(0, select)) for k, (a, b) in stacks.items()}

    @classmethod
    def build(cls, slots: list[int], stacks, device) -> Plan | None:
        """A plan, or None when no row has an adapter (no LoRA work at all)."""
        return cls(slots, stacks, device) if stacks and any(s >= 0 for s in slots) else None

    def add(self, key: object, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y`` plus each row's delta for group ``key`` of input ``x`` ``[rows, ..., in]`` (in place)."""
        stack = self.stacks.get(key)
        if stack is None:
            return y
        a, b = stack
        if self.single is not None:
            s = self.single
            if x.dim() == 2:
                return y.addmm_(x @ a[s], b[s])
            return y.add_((x @ a[s]) @ b[s])
        rest = x.shape[1:-1]
        xs = x.index_select(0, self.gather).reshape(self.count, -1, x.shape[-1])
        d = torch.bmm(torch.bmm(xs, a), b)  # [adapters, width * rest, out]
        d = d.reshape(self.count * self.width, *rest, d.shape[-1]).index_select(0, self.src)
        if self.rows is None:
            return y.add_(d)
        return y.index_add_(0, self.rows, d)


class AdapterBank:
    """The adapters loaded under their names, stacked per group of projections.

    ``groups`` maps a key (what the caller asks ``add`` for) to the module
    paths whose outputs sit side by side in one tensor (``q_proj``,
    ``k_proj``, ``v_proj`` for the fused step's qkv). Adapters replaced or
    unloaded stay stacked (``live``) while a running row still uses them.
    """

    def __init__(self, model: nn.Module, groups: dict[object, list[str]]) -> None:
        self.model = model
        self.groups = groups
        self.named: dict[str, Adapter] = {}
        self.live: list[Adapter] = []
        self.stacks: dict[object, tuple[torch.Tensor, torch.Tensor]] = {}
        self.version = 0  # changes whenever slots change: plans made before are stale
        covered = {p for paths in groups.values() for p in paths}
        self.covered = covered

    # ------------------------------------------------------------ names

    def load(self, adapter: Adapter) -> None:
        missing = sorted(set(adapter.weights) - self.covered)
        if missing:
            raise ModelError(f"cannot serve adapter {adapter.name} per request: it changes {missing[0]}, "
                             "which the per-row step does not cover")
        self.named[adapter.name] = adapter

    def unload(self, name: str) -> None:
        if self.named.pop(name, None) is None:
            raise ModelError(f"unknown adapter {name!r}; loaded: {', '.join(sorted(self.named)) or 'none'}")

    def get(self, name: str) -> Adapter:
        adapter = self.named.get(name)
        if adapter is None:
            raise ModelError(f"unknown adapter {name!r}; loaded: {', '.join(sorted(self.named)) or 'none'}")
        return adapter

    # ------------------------------------------------------------ slots

    def sync(self, in_use: list[Adapter | None]) -> None:
        """Stack the named adapters and those rows still use; the others are dropped."""
        wanted = list(self.named.values())
        seen = {id(a) for a in wanted}
        for a in in_use:
            if a is not None and id(a) not in seen:
                wanted.append(a)
                seen.add(id(a))
        if {id(a) for a in wanted} == {id(a) for a in self.live}:
            return
        # Keep the present order where possible: fewer surprises reading logs.
        order = [a for a in self.live if id(a) in seen]
        order += [a for a in wanted if all(a is not b for b in order)]
        self.live = order
        self._stack()

    def slot(self, adapter: Adapter | None) -> int:
        if adapter is None:
            return -1
        for i, a in enumerate(self.live):
            if a is adapter:
                return i
        raise AssertionError(f"adapter {adapter.name} is not stacked")  # sync() first

    def plan(self, adapters: list[Adapter | None], lens: list[int] | None = None) -> Plan | None:
        """The grouping of rows using ``adapters`` (each repeated ``lens[i]`` times when given)."""
        slots = [self.slot(a) for a in adapters]
        if lens is not None:
            slots = [s for s, n in zip(slots, lens, strict=True) for _ in range(n)]
        device = next(self.model.parameters()).device
        return Plan.build(slots, self.stacks, device)

    def _stack(self) -> None:
        self.version += 1
        self.stacks = {}
        if not self.live:
            return
        param = next(self.model.parameters())
        for key, paths in self.groups.items():
            if not any(p in a.weights for a in self.live for p in paths):
                continue  # no adapter changes this group: nothing to add
            ranks = [max((a.weights[p][0].shape[1] for a in self.live if p in a.weights), default=0) for p in paths]
            mods = [self.model.get_submodule(p) for p in paths]
            width_in = mods[0].in_features
            outs = [m.out_features for m in mods]
            s, r_total, o_total = len(self.live), sum(ranks), sum(outs)
            a_stack = param.new_zeros(s, width_in, r_total)
            # One B for the group: block-diagonal, so that the group's outputs
            # (side by side in one tensor) take their deltas in one bmm.
            b_stack = param.new_zeros(s, r_total, o_total)
            for i, adapter in enumerate(self.live):
                r0 = o0 = 0
                for p, r, o in zip(paths, ranks, outs, strict=True):
                    if p in adapter.weights:
                        a, b = adapter.weights[p]
                        a_stack[i, :, r0 : r0 + a.shape[1]] = a
                        b_stack[i, r0 : r0 + b.shape[0], o0 : o0 + o] = b
                    r0, o0 = r0 + r, o0 + o
            self.stacks[key] = (a_stack, b_stack)
        log.info("lora: %d adapters stacked (%s), max rank %d", len(self.live),
                 ", ".join(a.name for a in self.live), max(a.rank for a in self.live))


class Hooks:
    """Per-row LoRA through transformers' forward: each targeted linear's output gets its rows' deltas.

    For models the fused step does not cover. Hooks on the base model's own
    linears rather than peft's mixed-adapter batches (``adapter_names=``):
    peft would wrap those linears in its own modules, which the weight swap
    (``load_state_dict`` of the base weights, a merge) and the fused step's
    weight views are written against; the bank and its grouped ``bmm`` are
    the same as the fused step's.
    """

    def __init__(self, bank: AdapterBank) -> None:
        self.bank = bank
        self.plan: Plan | None = None
        self._handles = []
        for key in bank.groups:
            module = bank.model.get_submodule(key)
            self._handles.append(module.register_forward_hook(self._hook(key)))

    def _hook(self, key: str):
        def hook(module, args, output):
            if self.plan is None:
                return None
            return self.plan.add(key, args[0], output)

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def fused_groups(model: nn.Module) -> dict[object, list[str]]:
    """The fused step's groups: ``(layer, "qkv" | "o" | "gate_up" | "down")`` to module paths."""
    groups: dict[object, list[str]] = {}
    for i in range(len(model.model.layers)):
        pre = f"model.layers.{i}"
        groups[(i, "qkv")] = [f"{pre}.self_attn.{m}" for m in ("q_proj", "k_proj", "v_proj")]
        groups[(i, "o")] = [f"{pre}.self_attn.o_proj"]
        groups[(i, "gate_up")] = [f"{pre}.mlp.{m}" for m in ("gate_proj", "up_proj")]
        groups[(i, "down")] = [f"{pre}.mlp.down_proj"]
    return groups


def linear_groups(model: nn.Module) -> dict[object, list[str]]:
    """One group per linear of the model but its output head (through transformers' forward)."""
    head = model.get_output_embeddings()
    return {
        name: [name]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module is not head
    }
