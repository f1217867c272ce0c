"""`Linear4bit`: a linear layer whose weight is stored as 4-bit codes (NF4 or FP4).

    y = x W^T + b        W = dequantize_4bit(weight, quant_state)  (out, in), in compute_dtype

The layer holds the packed codes (`weight`, uint8 ((out*in+1)//2, 1)), the block statistics as
buffers, an optional bias and a compute dtype; there is never a full-precision copy of W. Forward
and backward each dequantize W for one matmul and drop it (see `_matmul_4bit` and
`_matmul_4bit_t`: CUDA fp16/bf16 inputs take the Triton kernels of `kernels/`, others `dequantize`
and a matmul; on the GPU `dequantize` is the kernels' dequantization in every dtype, the values of
`dequantize_4bit` bit for bit). The weight is frozen: the backward returns a gradient for the input
(and, through autograd, for the bias).

Note [the bitsandbytes state dict]
    For a layer at prefix P, `state_dict()` holds exactly what bitsandbytes writes, so pre-quantized
    `*-bnb-4bit` checkpoints load without re-quantizing and ours load in bitsandbytes:
        P.weight                                   uint8 ((out*in+1)//2, 1)
        P.bias                                     if the layer has one
        P.weight.absmax                            uint8 (nblocks,) with double quant, else fp32
        P.weight.quant_map                         fp32 (16,)
        P.weight.nested_absmax                     fp32 (ceil(nblocks/256),)   double quant only
        P.weight.nested_quant_map                  fp32 (256,)                 double quant only
        P.weight.quant_state.bitsandbytes__nf4     uint8 bytes of the JSON (quant_type, blocksize,
                                                   dtype, shape, nested_blocksize/_dtype/_offset)
    Keys with dots cannot be buffer names, so the statistics live in buffers named `absmax`,
    `quant_map`, `nested_absmax`, `nested_quant_map` and `offset` (0-d fp32; in the file it is
    the JSON's nested_offset), and `_save_to_state_dict` / `_load_from_state_dict` translate.
    Loading takes the layout (blocksize, double quant, quant type, dtype) from the file's JSON
    and checks every statistic against it and against in/out_features. With
    `load_state_dict(assign=True)` the file's tensors become the buffers (a model built and
    quantized on the `meta` device is filled this way); otherwise they are copied to the layer's
    device. A floating-point `P.weight` of shape (out, in) with no quant_state is quantized on
    load with the layer's own settings.

Note [tiled codes on the GPU]
    On a GPU a layer holds its packed codes in the order the kernels read fastest (kernels/nf4_tiles.py
    Note [tiled codes]: the same bytes permuted in bands of 16 rows, no memory added; H100, run 151:
    x @ W.T at M = 1 2.45-2.88x -> 2.69-3.47x of torch's bf16 product, M = 16 1.94-2.38x ->
    2.13-2.64x; a graphed 8B decoding step 7.53 -> 7.21 ms; the dequantization for large M 3-6%
    slower). `layer.tile_codes(False)` (or `quant.tile_codes(model, False)`) keeps them in
    bitsandbytes' row order instead; the layer keeps the choice across loads and device moves. Off
    the GPU, or where the shape does not tile (kernels.tiles_fit), the codes are in rows.
    So on a GPU `weight` is not bitsandbytes' layout: `row_codes()` is (`codes_tiled` says which
    `weight` holds). `state_dict()` writes row order, `dequantize()` reads either, and
    `quant.dequantize_4bit` takes `row_codes()`, never a tiled `weight`. Both layouts give the same
    outputs bit for bit but at 65-1024 rows of x on Hopper, where tiled codes may take the wgmma kernel
    (kernels/nf4_wgmma.py: W rounded in 16 bits with its block scale, within the kernels' tolerance).

Note [statistics keep float32]
    `model.to(torch.bfloat16)` or `.half()` cast every floating-point buffer. The fp32 absmax,
    codebooks and offset must not be rounded, so `_apply` moves them to the new device but keeps
    their dtype. The bias follows the cast like any parameter; `compute_dtype` does not change.
"""
import functools
import math

import torch
import torch.nn as nn

from .codebooks import QUANT_TYPES
from .nf4 import (
    QuantState, check_blocksize, check_quant_type, dequantize_4bit, num_blocks,
    packed_shape, quant_state_key, quantize_4bit, state_from_dict, state_to_dict, NESTED_BLOCKSIZE,
    SUPPORTED_DTYPES,
)

__all__ = ["Linear4bit"]

_STATISTICS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "offset")


@functools.cache
def _kernels_available() -> bool:
    import kernels
    return kernels.available()


def _tiles_fit(n_rows: int, n_cols: int, blocksize: int) -> bool:
    import kernels
    return kernels.tiles_fit((n_rows, n_cols), blocksize)


def _on_kernels(t: torch.Tensor) -> bool:
    """CUDA half-precision inputs take the Triton kernels; everything else the reference path."""
    return t.is_cuda and t.dtype in (torch.float16, torch.bfloat16) and _kernels_available()


def _matmul_4bit(x: torch.Tensor, layer: "Linear4bit") -> torch.Tensor:
    """x @ W^T: (M, in) -> (M, out), in x's dtype (the layer's compute dtype)."""
    if _on_kernels(x):
        import kernels
        return kernels.matmul_nf4(x, layer.weight, layer.kernel_weight())
    return x @ layer.dequantize(x.dtype).t()


def _matmul_4bit_t(grad: torch.Tensor, layer: "Linear4bit") -> torch.Tensor:
    """grad @ W: (M, out) -> (M, in), the input's gradient, in grad's dtype."""
    if _on_kernels(grad):
        import kernels
        return kernels.matmul_nf4_t(grad, layer.weight, layer.kernel_weight())
    return grad @ layer.dequantize(grad.dtype)


class _MatMul4bit(torch.autograd.Function):
    """y = x W^T with W frozen and 4-bit: saves only the layer (its codes), not W or x."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "Linear4bit") -> torch.Tensor:
        ctx.layer = layer
        return _matmul_4bit(x, layer)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_x = _matmul_4bit_t(grad, ctx.layer) if ctx.needs_input_grad[0] else None
        return grad_x, None


class Linear4bit(nn.Module):
    """A frozen 4-bit linear layer: y = x dequantize(W)^T + b, computed in `compute_dtype`.

    See the module docstring. The constructor initialises W as nn.Linear does (Kaiming uniform)
    and quantizes it; on the `meta` device it only allocates. `from_linear` / `from_weight`
    quantize a given weight.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        blocksize: int = 64,
        double_quant: bool = True,
        quant_type: str = "nf4",
        compute_dtype: torch.dtype = torch.bfloat16,
        device=None,
    ):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Linear4bit: {name} must be a positive integer, got {value!r}")
        check_blocksize(blocksize)
        check_quant_type(quant_type)
        if compute_dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"Linear4bit: compute_dtype must be one of {SUPPORTED_DTYPES}, got {compute_dtype}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        device = torch.device("cpu") if device is None else torch.device(device)
        weight = torch.empty(out_features, in_features, device=device, dtype=compute_dtype)
        if device.type != "meta":
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # as nn.Linear
        self._set_quantized(weight, blocksize, double_quant, quant_type)
        if bias:
            bound = 1.0 / math.sqrt(in_features)
            b = torch.empty(out_features, device=device, dtype=compute_dtype)
            self.bias = nn.Parameter(b if device.type == "meta" else b.uniform_(-bound, bound))
        else:
            self.bias = None

    # ----- construction -------------------------------------------------------------------

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        blocksize: int = 64,
        double_quant: bool = True,
        quant_type: str = "nf4",
        compute_dtype: torch.dtype | None = None,
    ) -> "Linear4bit":
        """Quantize an (out, in) weight; the bias (out,) is kept as it is (same tensor storage).

        compute_dtype None means the weight's dtype. A `meta` weight gives an unfilled layer."""
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise ValueError(f"Linear4bit.from_weight needs an (out, in) weight, got {shape}")
        out_features, in_features = weight.shape
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(
                f"Linear4bit.from_weight: bias has shape {tuple(bias.shape)}, expected ({out_features},)"
            )
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = in_features, out_features
        layer.compute_dtype = weight.dtype if compute_dtype is None else compute_dtype
        if layer.compute_dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"Linear4bit: compute_dtype must be one of {SUPPORTED_DTYPES}, got {layer.compute_dtype}"
            )
        layer._set_quantized(weight.detach(), blocksize, double_quant, quant_type)
        if bias is None:
            layer.bias = None
        else:
            layer.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias.detach())
        return layer

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        blocksize: int = 64,
        double_quant: bool = True,
        quant_type: str = "nf4",
        compute_dtype: torch.dtype | None = None,
    ) -> "Linear4bit":
        """Quantize an nn.Linear's weight; its bias Parameter is shared, not copied."""
        return cls.from_weight(
            linear.weight, linear.bias, blocksize=blocksize, double_quant=double_quant,
            quant_type=quant_type, compute_dtype=compute_dtype,
        )

    def _set_quantized(self, weight: torch.Tensor, blocksize: int, double_quant: bool, quant_type: str):
        """Quantize `weight` into this layer's parameter and buffers (shapes only on `meta`)."""
        if weight.device.type == "meta":
            check_blocksize(blocksize)
            check_quant_type(quant_type)
            if weight.dtype not in SUPPORTED_DTYPES:
                raise TypeError(f"Linear4bit needs a float32, float16 or bfloat16 weight, got {weight.dtype}")
            packed = torch.empty(packed_shape(weight.numel()), dtype=torch.uint8, device="meta")
            nblocks = num_blocks(weight.numel(), blocksize)
            meta = lambda *shape, dtype=torch.float32: torch.empty(shape, dtype=dtype, device="meta")  # noqa: E731
            state = QuantState(
                absmax=meta(nblocks, dtype=torch.uint8 if double_quant else torch.float32),
                shape=weight.shape, dtype=weight.dtype, blocksize=blocksize,
                quant_type=quant_type, code=meta(16),
            )
            if double_quant:
                state.nested_absmax = meta(num_blocks(nblocks, NESTED_BLOCKSIZE))
                state.nested_code, state.offset = meta(256), meta()
        else:
            packed, state = quantize_4bit(weight, blocksize, double_quant, quant_type)
        self._set_state(packed, state)

    def _set_state(self, packed: torch.Tensor, state: QuantState) -> None:
        """Take the packed codes and statistics of `state` as this layer's tensors."""
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.codes_tiled = False  # see Note [tiled codes on the GPU]
        self.blocksize = state.blocksize
        self.quant_type = state.quant_type
        self.double_quant = state.double_quant
        self.weight_dtype = state.dtype  # the dtype W had before quantization (the JSON's "dtype")
        offset = state.offset
        if offset is not None and not isinstance(offset, torch.Tensor):
            offset = torch.tensor(float(offset), dtype=torch.float32, device=packed.device)
        self.register_buffer("absmax", state.absmax)
        self.register_buffer("quant_map", state.code)
        self.register_buffer("nested_absmax", state.nested_absmax)
        self.register_buffer("nested_quant_map", state.nested_code)
        self.register_buffer("offset", offset)
        self._sync_layout()

    # ----- the quantized weight ------------------------------------------------------------

    @property
    def quant_state(self) -> QuantState:
        """A QuantState over this layer's buffers (no copies)."""
        return QuantState(
            absmax=self.absmax, shape=torch.Size((self.out_features, self.in_features)),
            dtype=self.weight_dtype, blocksize=self.blocksize, quant_type=self.quant_type,
            code=self.quant_map, nested_absmax=self.nested_absmax,
            nested_code=self.nested_quant_map, offset=self.offset,
        )

    def tile_codes(self, enabled: bool = True) -> bool:
        """Hold the packed codes in the kernels' tile order while on a GPU (the default; Note [tiled
        codes on the GPU]), or in rows with enabled=False; returns whether they are tiled now."""
        self.__dict__["_tiles_wanted"] = enabled
        self._sync_layout()
        return self.codes_tiled

    def _sync_layout(self) -> None:
        """Tile or untile the codes as wanted and possible: CUDA, the kernels, a shape that tiles."""
        if self.weight.device.type == "meta":
            return
        want = (self.__dict__.get("_tiles_wanted", True) and self.weight.is_cuda and _kernels_available()
                and _tiles_fit(self.out_features, self.in_features, self.blocksize))
        if want != self.codes_tiled:
            import kernels
            convert = kernels.tile_codes if want else kernels.untile_codes
            self.weight.data = convert(self.weight.data, self.quant_state)
            self.codes_tiled = want
            self.__dict__.pop("_kernel_weight", None)

    def row_codes(self) -> torch.Tensor:
        """The packed codes in bitsandbytes' row order: `weight`, or a new tensor if they are tiled."""
        if not self.codes_tiled:
            return self.weight
        import kernels
        return kernels.untile_codes(self.weight.detach(), self.quant_state)

    def kernel_weight(self):
        """The weight as the Triton kernels take it (kernels.prepare), checked once and kept until
        the packed codes or statistics move (a new device, a load with assign=True, tiling)."""
        import kernels
        key = (self.weight.data_ptr(), self.absmax.data_ptr(), self.weight.device)
        cached = self.__dict__.get("_kernel_weight")
        if cached is None or cached[0] != key:
            cached = (key, kernels.prepare(self.weight, self.quant_state, tiled=self.codes_tiled))
            self.__dict__["_kernel_weight"] = cached
        return cached[1]

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W (out, in) in `dtype` (default: compute_dtype), a new tensor, not tracked by autograd."""
        dtype = dtype or self.compute_dtype
        with torch.no_grad():
            # On the GPU the kernel writes the reference's values bit for bit, in float32 too, from
            # either layout (a float32 reference call would first untile the codes: row_codes()).
            if self.weight.is_cuda and dtype in (torch.float32, torch.float16, torch.bfloat16) and _kernels_available():
                import kernels
                return kernels.dequantize_nf4(self.weight, self.kernel_weight(), dtype)
            return dequantize_4bit(self.row_codes(), self.quant_state, dtype=dtype)

    def dequantize_lowrank(self, lora_b: torch.Tensor, lora_a: torch.Tensor, scaling: float,
                           dtype: torch.dtype | None = None) -> torch.Tensor:
        """W + scaling * lora_b @ lora_a (out, in) in `dtype` (default: compute_dtype), summed in float32
        and rounded once, lora_b (out, r) and lora_a (r, in) rounded to `dtype` first; one pass on
        the GPU (kernels/nf4_lowrank.py). A LoRA layer's input gradient uses it (lora/function.py)."""
        dtype = dtype or self.compute_dtype
        with torch.no_grad():
            if self.weight.is_cuda and dtype in (torch.float16, torch.bfloat16) and _kernels_available():
                import kernels
                return kernels.dequantize_nf4_lowrank(self.weight, self.kernel_weight(), lora_b, lora_a, scaling, dtype)
            from kernels import reference  # plain PyTorch, no Triton: the same formula as the kernel
            return reference.add_lowrank(self.dequantize(torch.float32), lora_b, lora_a, scaling, dtype)

    def input_gradient(self, grad: torch.Tensor, lora_b: torch.Tensor, lora_a: torch.Tensor, scaling: float,
                       grad_b: torch.Tensor | None = None) -> torch.Tensor:
        """grad @ (W + scaling * lora_b @ lora_a): (M, out) -> (M, in) in grad's dtype, the input
        gradient of a LoRA layer over this one (lora/function.py). grad_b: grad @ lora_b, if the
        caller has it. On the GPU kernels.matmul_nf4_t_lowrank picks by M between streaming W
        (small M) and the merged weight of `dequantize_lowrank`; elsewhere the merged weight."""
        with torch.no_grad():
            if _on_kernels(grad):
                import kernels
                return kernels.matmul_nf4_t_lowrank(grad, self.weight, self.kernel_weight(), lora_b, lora_a, scaling,
                                                    grad_b)
            return grad @ self.dequantize_lowrank(lora_b, lora_a, scaling, grad.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"Linear4bit: input of shape {tuple(x.shape)} does not end in in_features="
                f"{self.in_features}"
            )
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(self.compute_dtype)  # (M, in)
        y = _MatMul4bit.apply(x2, self)  # (M, out)
        if self.bias is not None:
            y = y + self.bias.to(self.compute_dtype)
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, quant_type={self.quant_type}, "
            f"blocksize={self.blocksize}, double_quant={self.double_quant}, "
            f"compute_dtype={self.compute_dtype}"
        )

    # ----- devices and dtypes: see Note [statistics keep float32] ---------------------------

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_kernel_weight", None)  # it holds the buffers of the old device
        before = {name: getattr(self, name) for name in _STATISTICS}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = getattr(self, name)
            if old is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        self._sync_layout()  # Note [tiled codes on the GPU]: rows off the GPU, tiles back on it
        return self

    # ----- state dict: see Note [the bitsandbytes state dict] -------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        keep = lambda t: t if keep_vars else t.detach()  # noqa: E731
        destination[prefix + "weight"] = keep(self.row_codes())  # Note [tiled codes on the GPU]
        if self.bias is not None:
            destination[prefix + "bias"] = keep(self.bias)
        state = self.quant_state
        on_meta = self.absmax.device.type == "meta"
        if on_meta and state.double_quant:
            state.offset = 0.0  # unknown until loaded; the keys and shapes are still right
        for key, tensor in state_to_dict(state).items():
            if on_meta:
                tensor = tensor.to("meta")
            destination[prefix + "weight." + key] = keep(tensor)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        assign = local_metadata.get("assign_to_params_buffers", False)
        ours = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        json_keys = [k for k in ours if k.startswith("weight.quant_state.")]
        stats = {k[len("weight."):]: v for k, v in ours.items() if k.startswith("weight.")}
        used = set()
        if len(json_keys) > 1:
            raise ValueError(f"state dict: more than one quant_state for {prefix}weight: {json_keys}")
        if json_keys:
            json_key = json_keys[0][len("weight."):]
            suffix = json_key.rsplit("bitsandbytes__", 1)
            if len(suffix) != 2 or suffix[1] not in QUANT_TYPES:
                raise ValueError(
                    f"state dict: {prefix}weight.{json_key} is not one of "
                    f"{[quant_state_key(t) for t in QUANT_TYPES]}"
                )
            if "weight" not in ours:
                raise ValueError(f"state dict: missing {prefix}weight (the packed 4-bit codes)")
            state = state_from_dict(
                stats, json_key, prefix + "weight.", torch.Size((self.out_features, self.in_features))
            )
            packed = ours["weight"]
            expected = packed_shape(self.out_features * self.in_features)
            if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.shape != expected:
                got = f"{packed.dtype} {tuple(packed.shape)}" if isinstance(packed, torch.Tensor) else type(packed).__name__
                raise ValueError(
                    f"state dict: {prefix}weight is {got}, expected packed uint8 {tuple(expected)} "
                    f"for a {self.out_features}x{self.in_features} layer"
                )
            if not assign:
                device = self.weight.device
                packed = packed.to(device)
                for field in ("absmax", "code", "nested_absmax", "nested_code", "offset"):
                    value = getattr(state, field)
                    if value is not None:
                        setattr(state, field, value.to(device))
            self._set_state(packed.detach(), state)
            used |= {"weight", "weight." + json_key, "weight.absmax", "weight.quant_map"}
            if state.double_quant:
                used |= {"weight.nested_absmax", "weight.nested_quant_map"}
        elif "weight" in ours:
            self._load_float_weight(ours["weight"], prefix, assign)
            used.add("weight")
        else:
            missing_keys.append(prefix + "weight")
        if self.bias is not None:
            if "bias" in ours:
                self._load_bias(ours["bias"], prefix, assign)
                used.add("bias")
            else:
                missing_keys.append(prefix + "bias")
        if strict:
            unexpected_keys.extend(prefix + k for k in ours if k not in used)

    def _load_float_weight(self, weight, prefix: str, assign: bool) -> None:
        """A full-precision (out, in) weight: quantize it with this layer's settings."""
        expected = (self.out_features, self.in_features)
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != expected or not weight.is_floating_point():
            got = f"{weight.dtype} {tuple(weight.shape)}" if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise ValueError(
                f"state dict: {prefix}weight is {got} with no {prefix}weight.quant_state.* entry; "
                f"expected a floating-point {expected} weight to quantize, or bitsandbytes 4-bit "
                f"entries"
            )
        if not assign:
            weight = weight.to(self.weight.device)
        try:
            self._set_quantized(weight.detach(), self.blocksize, self.double_quant, self.quant_type)
        except (TypeError, ValueError) as e:
            raise ValueError(f"state dict: {prefix}weight: {e}") from None

    def _load_bias(self, bias, prefix: str, assign: bool) -> None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (self.out_features,) or not bias.is_floating_point():
            got = f"{bias.dtype} {tuple(bias.shape)}" if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(
                f"state dict: {prefix}bias is {got}, expected a floating-point ({self.out_features},)"
            )
        if assign:
            self.bias = nn.Parameter(bias.detach(), requires_grad=self.bias.requires_grad)
        else:
            with torch.no_grad():
                self.bias.copy_(bias)
