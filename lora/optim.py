"""AdamW with 32-bit or blockwise 8-bit moments, optionally paged to host memory: `lora.optim.AdamW`.

    opt = lora.optim.AdamW(model.parameters(), lr=2e-4, state_bits=8, paged=True)
    loss.backward(); opt.step(); opt.zero_grad()
    lora.optim.save_state(opt, "out/optimizer.safetensors"); lora.optim.load_state(opt, path)

The update of every element at its group's step t (decoupled weight decay, bias correction), in
the order of float32 operations that torch.optim.AdamW uses:

    p <- p * (1 - lr * wd)
    m <- m + (1 - beta1) * (g - m)                       # = beta1 m + (1 - beta1) g
    v <- v * beta2 + (1 - beta2) * g * g
    p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

On CUDA one Triton kernel (kernels/adamw.py) does this per flat buffer; elsewhere, and as the
reference, `adamw_reference_` and `adamw8bit_reference_` below do it with torch ops.

Note [flat buffers]
    Each parameter's data is moved into one flat buffer per (group, device, dtype, state format),
    so `p.data` becomes a view of it, and `p.grad` becomes a view of a parallel gradient buffer.
    Autograd adds into an existing `.grad` in place, so backward writes straight into the flat
    buffer and one launch updates all the tensors of a group: the 448 LoRA tensors of a Llama-8B
    cost one kernel, not 448 (or a few multi-tensor launches). Every tensor starts at a multiple of
    256 elements (zero padding between them stays zero), so 8-bit blocks never straddle two tensors
    and pages (lora/paging.py) never split a block. What a user sees:
    - `zero_grad()` zeroes the buffer and keeps the views (set_to_none=False is the default here,
      unlike torch); a `.grad` that is None stays None, as in torch.
    - If something replaces `p.grad` (zero_grad(set_to_none=True), model.zero_grad(), a fresh
      backward after that) or `p.data` (load_state_dict(assign=True)), the next step copies the new
      tensor in and points `p.grad` / `p.data` back at the buffer: correct, one copy slower.
    - A parameter whose `.grad` is None at a step is left untouched, state included, as in torch.

Note [step count]
    The bias correction uses one step count per param group (`group["step"]`); torch counts per
    parameter. They agree whenever every parameter has a gradient at every step.

Note [8-bit state]
    With state_bits=8, tensors of at least 4096 elements keep m and v as uint8 codes of the
    dynamic map (quant/dynamic.py; signed for m, unsigned for v >= 0) with one float32 absmax per
    block of 256 elements: 2 + 8/256 bytes per element instead of 8. Each step dequantizes a block
    (code_map[code] * absmax), updates it in float32 as above (the parameter sees the float32 m and
    v, not their rounding), then requantizes: absmax = max |x| of the block and the nearest code
    to x / absmax. Smaller tensors (biases, norms) keep float32 state, as in bitsandbytes.

Note [nearest code]
    quant.dynamic replays bitsandbytes' 7-step binary search to match its codes bit for bit, ties
    included. Here the code of y = x / absmax is the number of midpoints between neighbouring map
    values that lie strictly below y: torch.bucketize(y, midpoints), found by the same 8-step
    binary search over the 255 sorted midpoints here and in the kernel. That is the nearest code;
    at an exact midpoint it is the lower of the two (bitsandbytes may take either), the only place
    where the two disagree. A block of zeros gets absmax 0 and the code of 0.0.

Note [non-finite gradients]
    Before any write, one reduction per flat buffer sums the gradients in float32 and one `.item()`
    (the step's only sync) reads the total: it is inf or nan iff some gradient is, or if the sum
    overflowed, which a per-tensor check then rules out. A non-finite step writes nothing: no
    parameter, no state, no step count; `skipped_steps` counts it, and nonfinite="raise" raises
    FloatingPointError naming the first such parameter (its index, as in state_dict, and shape).
"""
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from quant import dynamic

from .paging import BLOCK, Layout, Page, Piece, StateStore

__all__ = [
    "AdamW", "save_state", "load_state", "adamw_reference_", "adamw8bit_reference_",
    "quantize_blockwise_nearest", "dequantize_blockwise", "code_midpoints", "SMALL_TENSOR",
]

SMALL_TENSOR = 4096  # with state_bits=8, tensors with fewer elements keep 32-bit state
FORMAT = "lora.optim.AdamW/1"  # the "format" entry of saved states
METADATA_KEY = "lora.optim"  # the safetensors metadata entry that holds the JSON part


# -- the 8-bit maps and the nearest-code search (see Note [nearest code]) ------------------------


def code_midpoints(code: torch.Tensor) -> torch.Tensor:
    """The 255 midpoints between neighbours of a sorted 256-value map, float32."""
    return (code[:-1] + code[1:]) * 0.5


@functools.cache
def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(signed map, its midpoints, unsigned map, its midpoints) on `device`."""
    signed, unsigned = dynamic.dynamic_map(signed=True), dynamic.dynamic_map(signed=False)
    tables = (signed, code_midpoints(signed), unsigned, code_midpoints(unsigned))
    return tuple(t.to(device) for t in tables)


def quantize_blockwise_nearest(
    x: torch.Tensor, code: torch.Tensor, blocksize: int = BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantization of the flattened x to its nearest codes (Note [nearest code]).

    As quant.dynamic.quantize_blockwise: runs of `blocksize` elements (the last may be shorter),
    absmax = max |x| of the run, code of x * (1 / absmax). Returns (codes uint8 (numel,),
    absmax float32 (nblocks,))."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    nblocks = -(-n // blocksize)
    padded = nn.functional.pad(flat, (0, nblocks * blocksize - n)).view(nblocks, blocksize)
    codes, absmax = _quantize_blocks(padded, code_midpoints(code.to(flat.device)))
    return codes.view(-1)[:n], absmax


def _quantize_blocks(blocks: torch.Tensor, midpoints: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(nblocks, blocksize) float32 -> (codes uint8 (nblocks, blocksize), absmax (nblocks,))."""
    absmax = blocks.abs().amax(dim=1)  # (nblocks,)
    scale = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    return _count_below(blocks * scale.unsqueeze(1), midpoints).to(torch.uint8), absmax


def _count_below(y: torch.Tensor, midpoints: torch.Tensor) -> torch.Tensor:
    """The number of the 255 sorted midpoints strictly below each y (= torch.bucketize(y,
    midpoints)), by the kernel's 8-step binary search. Elementwise ops only: on a busy CPU,
    bucketize's thread pool costs milliseconds per call even for a few blocks."""
    code = torch.zeros(y.shape, dtype=torch.long, device=y.device)
    for step in (128, 64, 32, 16, 8, 4, 2, 1):
        candidate = code + step
        code = torch.where(y > midpoints[candidate - 1], candidate, code)
    return code


def dequantize_blockwise(
    codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int = BLOCK
) -> torch.Tensor:
    """code[codes] * absmax[block], float32, flat (numel,): quant.dynamic's decoding at the
    optimizer's block size."""
    return dynamic.dequantize_blockwise(codes, absmax, code, blocksize)


# -- the reference update (what the kernels in kernels/adamw.py compute) -------------------------


def _step_constants(group: dict) -> dict[str, float]:
    """The per-step scalars of a group at its (already advanced) step count, in Python floats."""
    lr, (beta1, beta2), t = group["lr"], group["betas"], group["step"]
    return dict(
        decay=1 - lr * group["weight_decay"],
        one_minus_beta1=1 - beta1,
        beta2=beta2,
        one_minus_beta2=1 - beta2,
        eps=group["eps"],
        step_size=lr / (1 - beta1**t),
        bias_correction2_sqrt=(1 - beta2**t) ** 0.5,
    )


def adamw_reference_(
    param, grad, exp_avg, exp_avg_sq, *, decay, one_minus_beta1, beta2, one_minus_beta2, eps,
    step_size, bias_correction2_sqrt,
) -> None:
    """One AdamW step in place on flat tensors of equal length (state float32, param any float).

    The float32 operations of torch.optim.AdamW (single-tensor path), in its order."""
    p = param if param.dtype == torch.float32 else param.float()
    g = grad if grad.dtype == torch.float32 else grad.float()
    if decay != 1.0:
        p.mul_(decay)
    exp_avg.lerp_(g, one_minus_beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=one_minus_beta2)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    p.addcdiv_(exp_avg, denom, value=-step_size)
    if p is not param:
        param.copy_(p)


def adamw8bit_reference_(
    param, grad, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax,
    signed_map, signed_midpoints, unsigned_map, unsigned_midpoints, **constants,
) -> None:
    """One AdamW step in place with blockwise 8-bit moments (Note [8-bit state]).

    param, grad, codes: (n,), n a multiple of 256; absmax: (n / 256,) float32."""
    exp_avg = dequantize_blockwise(exp_avg_codes, exp_avg_absmax, signed_map)  # (n,)
    exp_avg_sq = dequantize_blockwise(exp_avg_sq_codes, exp_avg_sq_absmax, unsigned_map)  # (n,)
    adamw_reference_(param, grad, exp_avg, exp_avg_sq, **constants)
    for x, codes, absmax, midpoints in (
        (exp_avg, exp_avg_codes, exp_avg_absmax, signed_midpoints),
        (exp_avg_sq, exp_avg_sq_codes, exp_avg_sq_absmax, unsigned_midpoints),
    ):
        new_codes, new_absmax = _quantize_blocks(x.view(-1, BLOCK), midpoints)
        codes.copy_(new_codes.view(-1))
        absmax.copy_(new_absmax)


@functools.cache
def _kernels():
    """kernels.adamw where Triton imports, else None (the reference then runs on the GPU too)."""
    try:
        from kernels import adamw
    except ImportError:
        return None
    return adamw


# -- where the state lives -----------------------------------------------------------------------

STATE32 = Layout((Piece("exp_avg", torch.float32, BLOCK), Piece("exp_avg_sq", torch.float32, BLOCK)))
STATE8 = Layout((
    Piece("exp_avg_codes", torch.uint8, BLOCK, fill=int(torch.argmin(dynamic.dynamic_map(True).abs()))),
    Piece("exp_avg_sq_codes", torch.uint8, BLOCK, fill=int(torch.argmin(dynamic.dynamic_map(False).abs()))),
    Piece("exp_avg_absmax", torch.float32, 1),
    Piece("exp_avg_sq_absmax", torch.float32, 1),
))


def _padded(numel: int) -> int:
    return -(-numel // BLOCK) * BLOCK


@dataclass
class _Segment:
    """The parameters of one group with one device, dtype and state format (Note [flat buffers])."""

    group_index: int
    bits: int  # 32 or 8
    indices: list[int]  # optimizer-wide parameter indices, as in state_dict
    params: list[nn.Parameter]
    offsets: list[int]  # start of each parameter in the flat buffers, multiples of BLOCK
    flat_param: torch.Tensor  # (n,) the parameters' storage
    flat_grad: torch.Tensor  # (n,) the gradients' storage
    param_views: list[torch.Tensor]
    grad_views: list[torch.Tensor]
    param_ptrs: list[int]
    store: StateStore
    key: int
    pages: list[Page]

    @classmethod
    def build(cls, key, group_index, bits, indices, params, store):
        offsets, n = [], 0
        for p in params:
            offsets.append(n)
            n += _padded(p.numel())
        like = params[0]
        flat_param = torch.zeros(n, dtype=like.dtype, device=like.device)
        flat_grad = torch.zeros(n, dtype=like.dtype, device=like.device)
        param_views, grad_views = [], []
        for p, start in zip(params, offsets):
            view = flat_param[start : start + p.numel()].view(p.shape)
            view.copy_(p.detach())
            p.data = view
            grad_view = flat_grad[start : start + p.numel()].view(p.shape)
            if p.grad is not None:
                grad_view.copy_(p.grad)
                p.grad = grad_view
            param_views.append(view)
            grad_views.append(grad_view)
        pages = store.add(key, n, STATE8 if bits == 8 else STATE32)
        return cls(group_index, bits, indices, params, offsets, flat_param, flat_grad, param_views,
                   grad_views, [v.data_ptr() for v in param_views], store, key, pages)

    def gather(self) -> list[int]:
        """Point every parameter and gradient back into the flat buffers (copying where something
        replaced them, in one multi-tensor copy); return the positions of parameters without a
        gradient, whose gradient slots are zeroed."""
        missing, replaced = [], []
        for pos, p in enumerate(self.params):
            if p.data_ptr() != self.param_ptrs[pos]:
                self._readopt(pos)
            g = p.grad
            if g is self.grad_views[pos]:
                continue
            if g is None:
                missing.append(pos)
            elif g.is_sparse:
                raise TypeError(f"AdamW: parameter {self.indices[pos]} has a sparse gradient")
            else:
                replaced.append(pos)
        if replaced:
            torch._foreach_copy_([self.grad_views[pos] for pos in replaced],
                                 [self.params[pos].grad for pos in replaced])
            for pos in replaced:
                self.params[pos].grad = self.grad_views[pos]
        if missing:
            torch._foreach_zero_([self.grad_views[pos] for pos in missing])
        return missing

    def _readopt(self, pos: int) -> None:
        p, view = self.params[pos], self.param_views[pos]
        if (p.shape, p.dtype, p.device) != (view.shape, view.dtype, view.device):
            raise ValueError(
                f"AdamW: parameter {self.indices[pos]} changed from {tuple(view.shape)} "
                f"{view.dtype} on {view.device} to {tuple(p.shape)} {p.dtype} on {p.device} after "
                "the optimizer was built; build a new optimizer"
            )
        view.copy_(p.detach())
        p.data = view

    def span(self, pos: int) -> tuple[int, int]:
        start = self.offsets[pos]
        return start, start + _padded(self.params[pos].numel())

    def read_state(self, pos: int) -> dict[str, torch.Tensor]:
        """The state of one parameter, on the CPU: float32 moments shaped like it, or 8-bit codes
        (numel,) and absmax (ceil(numel / 256),)."""
        p = self.params[pos]
        raw = self.store.read(self.key, *self.span(pos))
        if self.bits == 32:
            return {name: t[: p.numel()].view(p.shape) for name, t in raw.items()}
        return {name: t[: p.numel()] if name.endswith("codes") else t for name, t in raw.items()}

    def expected_state(self, pos: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        p = self.params[pos]
        if self.bits == 32:
            return {"exp_avg": (tuple(p.shape), torch.float32), "exp_avg_sq": (tuple(p.shape), torch.float32)}
        codes, blocks = ((p.numel(),), torch.uint8), ((_padded(p.numel()) // BLOCK,), torch.float32)
        return {"exp_avg_codes": codes, "exp_avg_sq_codes": codes,
                "exp_avg_absmax": blocks, "exp_avg_sq_absmax": blocks}

    def write_state(self, pos: int, state: dict[str, torch.Tensor]) -> None:
        start, stop = self.span(pos)
        layout = STATE8 if self.bits == 8 else STATE32
        values = {}
        for piece in layout.pieces:
            flat = state[piece.name].reshape(-1).to(piece.dtype)
            length = (stop - start) * piece.per_block // BLOCK
            values[piece.name] = torch.cat([flat, flat.new_full((length - flat.numel(),), piece.fill)])
        self.store.write(self.key, start, stop, values)


# -- the optimizer -------------------------------------------------------------------------------


class AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) with 32-bit or 8-bit moments, resident or paged.

    params, lr, betas, eps, weight_decay: as torch.optim.AdamW (param groups may override them).
    state_bits: 32, or 8 for blockwise 8-bit moments (Note [8-bit state]).
    paged: keep the state in (pinned) host memory and stream it through a device working set of
        at most page_budget_bytes (default 64 MiB); see lora/paging.py.
    nonfinite: "skip" or "raise" on a step with an inf/nan gradient (Note [non-finite gradients]).

    Parameters are moved into flat buffers: see Note [flat buffers]. Attributes: skipped_steps.
    """

    def __init__(self, params, lr: float = 2e-4, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, state_bits: int = 32,
                 paged: bool = False, page_budget_bytes: int | None = None, nonfinite: str = "skip"):
        if state_bits not in (32, 8):
            raise ValueError(f"AdamW: state_bits must be 32 or 8, got {state_bits!r}")
        if nonfinite not in ("skip", "raise"):
            raise ValueError(f"AdamW: nonfinite must be 'skip' or 'raise', got {nonfinite!r}")
        budget_ok = isinstance(page_budget_bytes, int) and page_budget_bytes > 0
        if page_budget_bytes is not None and not budget_ok:
            raise ValueError(f"AdamW: page_budget_bytes must be a positive int, got {page_budget_bytes!r}")
        self.state_bits = state_bits
        self.paged = bool(paged)
        self.page_budget_bytes = page_budget_bytes
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        self._segments: list[_Segment] = []
        self._stores: dict[torch.device, StateStore] = {}
        self._n_params = 0
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group_index = len(self.param_groups) - 1
        _check_hyperparameters(group, group_index)
        group["betas"] = tuple(group["betas"])
        group.setdefault("step", 0)
        by_kind: dict[tuple, list[tuple[int, nn.Parameter]]] = {}
        for p in group["params"]:
            index = self._n_params
            self._n_params += 1
            if not p.is_floating_point() or p.is_sparse:
                raise TypeError(f"AdamW: parameter {index} is {p.dtype}"
                                f"{' sparse' if p.is_sparse else ''}; it needs a dense floating-point tensor")
            bits = 8 if self.state_bits == 8 and p.numel() >= SMALL_TENSOR else 32
            by_kind.setdefault((p.device, p.dtype, bits), []).append((index, p))
        for (device, _, bits), members in by_kind.items():
            store = self._stores.get(device)
            if store is None:
                store = self._stores[device] = StateStore(device, self.paged, self.page_budget_bytes)
            indices, params = [i for i, _ in members], [p for _, p in members]
            self._segments.append(
                _Segment.build(len(self._segments), group_index, bits, indices, params, store))

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Zero the gradients in place (they stay views of the flat buffer), or set them to None.

        set_to_none defaults to False here: see Note [flat buffers]."""
        for segment in self._segments:
            if set_to_none:
                for p in segment.params:
                    p.grad = None
                continue
            segment.flat_grad.zero_()
            for p, view in zip(segment.params, segment.grad_views):
                if p.grad is not None and p.grad is not view:
                    p.grad = view

    @torch.no_grad()
    def attach_grads(self) -> None:
        """Make every parameter's `.grad` its view of the flat gradient buffer, keeping the values
        (a missing gradient becomes zeros, so the next step updates every parameter). Backward
        passes then accumulate in place into buffers whose addresses never change, which is what
        a captured CUDA graph writes to (lora/graphs.py). Cheap when nothing was replaced."""
        for segment in self._segments:
            for pos in segment.gather():
                segment.params[pos].grad = segment.grad_views[pos]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        active = []  # (segment, positions without a gradient)
        for segment in self._segments:
            missing = segment.gather()
            if len(missing) < len(segment.params):
                active.append((segment, missing))
        if not active:
            return loss
        bad = _first_nonfinite(active)
        if bad is not None:
            self.skipped_steps += 1
            if self.nonfinite == "raise":
                segment, pos = bad
                raise FloatingPointError(
                    f"AdamW: non-finite gradient (inf or nan) in parameter {segment.indices[pos]} "
                    f"(group {segment.group_index}, shape {tuple(segment.params[pos].shape)}); the "
                    "step was not applied"
                )
            return loss
        constants = {}
        for group_index in sorted({segment.group_index for segment, _ in active}):
            group = self.param_groups[group_index]
            group["step"] += 1
            constants[group_index] = _step_constants(group)
        kept = [(segment, pos, segment.param_views[pos].clone(), segment.read_state(pos))
                for segment, missing in active for pos in missing]
        for store in self._stores.values():
            pages = [page for segment, _ in active if segment.store is store for page in segment.pages]
            for page, state in store.stream(pages):
                segment = self._segments[page.key]
                _update(segment, page, state, constants[segment.group_index])
        for segment, pos, param, state in kept:  # parameters without a gradient: as they were
            segment.param_views[pos].copy_(param)
            segment.write_state(pos, state)
        return loss

    # -- checkpoints ------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Plain Python values and CPU tensors: {"format", "state_bits", "skipped_steps",
        "param_groups": [{lr, betas, eps, weight_decay, step, ..., "params": [indices]}],
        "state": {index: {name: tensor}}} (per-parameter state, see _Segment.read_state)."""
        groups, first = [], 0
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            packed["params"] = list(range(first, first + len(group["params"])))
            first += len(group["params"])
            groups.append(packed)
        state = {}
        for segment in self._segments:
            for pos, index in enumerate(segment.indices):
                state[index] = segment.read_state(pos)
        return {"format": FORMAT, "state_bits": self.state_bits, "skipped_steps": self.skipped_steps,
                "param_groups": groups, "state": dict(sorted(state.items()))}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore what state_dict() returned (any paging or budget); checks everything first."""
        found = state_dict.get("format")
        _check(found == FORMAT, f"'format' is {found!r}, not {FORMAT!r}")
        bits = state_dict.get("state_bits")
        _check(bits == self.state_bits, f"'state_bits' is {bits!r} but this optimizer has {self.state_bits}")
        groups = state_dict.get("param_groups")
        _check(isinstance(groups, list) and len(groups) == len(self.param_groups),
               f"'param_groups' has {len(groups) if isinstance(groups, list) else groups!r} groups, "
               f"this optimizer {len(self.param_groups)}")
        first = 0
        for i, (saved, group) in enumerate(zip(groups, self.param_groups)):
            n = len(group["params"])
            _check(saved.get("params") == list(range(first, first + n)),
                   f"param_groups[{i}] has parameters {saved.get('params')!r}, "
                   f"expected {first}..{first + n - 1}")
            _check(isinstance(saved.get("step"), int) and saved["step"] >= 0,
                   f"param_groups[{i}]['step'] is {saved.get('step')!r}")
            _check_hyperparameters(saved, i)
            first += n
        state = {int(k): v for k, v in state_dict.get("state", {}).items()}
        for segment in self._segments:
            for pos, index in enumerate(segment.indices):
                _check(index in state, f"no state for parameter {index}")
                for name, (shape, dtype) in segment.expected_state(pos).items():
                    t = state[index].get(name)
                    _check(isinstance(t, torch.Tensor), f"state[{index}] has no tensor {name!r}")
                    _check(tuple(t.shape) == shape and t.dtype == dtype,
                           f"state[{index}][{name!r}] is {tuple(t.shape)} {t.dtype}, "
                           f"expected {shape} {dtype}")
        for saved, group in zip(groups, self.param_groups):
            group.update({k: v for k, v in saved.items() if k != "params"})
            group["betas"] = tuple(group["betas"])
        for segment in self._segments:
            for pos, index in enumerate(segment.indices):
                segment.write_state(pos, state[index])
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))

    # -- introspection ----------------------------------------------------------------------------

    def state_bytes(self) -> dict[str, int]:
        """{"device": bytes of state on the devices (the slots when paged), "host": paged bytes}."""
        return {"device": sum(s.device_bytes for s in self._stores.values()),
                "host": sum(s.host_bytes for s in self._stores.values())}


def _update(segment: _Segment, page: Page, state: dict[str, torch.Tensor], constants: dict) -> None:
    param = segment.flat_param[page.start : page.end]
    grad = segment.flat_grad[page.start : page.end]
    fast = _kernels() if param.is_cuda else None
    if segment.bits == 32:
        update = fast.adamw32_ if fast else adamw_reference_
        update(param, grad, state["exp_avg"], state["exp_avg_sq"], **constants)
    else:
        update = fast.adamw8bit_ if fast else adamw8bit_reference_
        update(param, grad, state["exp_avg_codes"], state["exp_avg_absmax"], state["exp_avg_sq_codes"],
               state["exp_avg_sq_absmax"], *_tables(param.device), **constants)


def _first_nonfinite(active: list[tuple[_Segment, list[int]]]) -> tuple[_Segment, int] | None:
    """(segment, position) of the first parameter with an inf/nan gradient, or None; one sync
    when all are finite (Note [non-finite gradients])."""
    sums = [segment.flat_grad.sum(dtype=torch.float32) for segment, _ in active]
    total = sums[0] if len(sums) == 1 else torch.stack([s.to(sums[0].device) for s in sums]).sum()
    if math.isfinite(total.item()):
        return None
    for segment, missing in active:
        for pos, view in enumerate(segment.grad_views):
            if pos not in missing and not bool(torch.isfinite(view).all()):
                return segment, pos
    return None  # the float32 sum overflowed; every gradient is finite


def _check_hyperparameters(group: dict, index: int) -> None:
    lr, betas, eps, wd = group.get("lr"), group.get("betas"), group.get("eps"), group.get("weight_decay")
    where = f"AdamW: param group {index}:"
    if not isinstance(lr, (int, float)) or lr < 0:
        raise ValueError(f"{where} lr must be a float >= 0, got {lr!r}")
    if (not isinstance(betas, (tuple, list)) or len(betas) != 2
            or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)):
        raise ValueError(f"{where} betas must be two floats in [0, 1), got {betas!r}")
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"{where} eps must be a float >= 0, got {eps!r}")
    if not isinstance(wd, (int, float)) or wd < 0:
        raise ValueError(f"{where} weight_decay must be a float >= 0, got {wd!r}")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"optimizer state: {message}")


# -- files ---------------------------------------------------------------------------------------


def save_state(optimizer: AdamW, path) -> None:
    """Write optimizer.state_dict() to one .safetensors file: tensors as `state.<index>.<name>`,
    everything else as JSON in the header metadata. Atomic (temporary file, then rename)."""
    from safetensors.torch import save_file

    from .io import atomic_write

    state_dict = optimizer.state_dict()
    tensors = {f"state.{index}.{name}": t.contiguous()
               for index, entry in state_dict["state"].items() for name, t in entry.items()}
    rest = {k: v for k, v in state_dict.items() if k != "state"}
    try:
        text = json.dumps(rest, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"save_state {path}: a param group holds a value JSON cannot store ({e})") from None
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata={METADATA_KEY: text}))


def load_state(optimizer: AdamW, path) -> None:
    """Load a file written by save_state into `optimizer` (which must hold the same parameters)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_state: no file {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a malformed file
        raise ValueError(f"load_state {path}: not a safetensors file ({e})") from None
    if METADATA_KEY not in metadata:
        raise ValueError(f"load_state {path}: no {METADATA_KEY!r} metadata; not an optimizer state file")
    try:
        state_dict = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"load_state {path}: malformed {METADATA_KEY!r} metadata ({e})") from None
    if not isinstance(state_dict, dict):
        raise ValueError(f"load_state {path}: {METADATA_KEY!r} metadata is not a JSON object")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        parts = key.split(".")
        if len(parts) != 3 or parts[0] != "state" or not parts[1].isdigit():
            raise ValueError(f"load_state {path}: unexpected tensor {key!r}")
        state.setdefault(int(parts[1]), {})[parts[2]] = t
    state_dict["state"] = state
    try:
        optimizer.load_state_dict(state_dict)
    except ValueError as e:
        raise ValueError(f"load_state {path}: {e}") from None
