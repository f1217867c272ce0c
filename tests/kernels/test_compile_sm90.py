"""The NF4 kernels compile for an H100 (sm_90) on a machine without a GPU.

The interpreter tests check the math; this checks what only the GPU compiler sees (layouts,
tl.join/reshape lowering, wgmma with a register operand, atomics, shared memory). Triton's wheel
carries ptxas, so each kernel is compiled ahead of time for sm_90 in a subprocess (the test
session runs the interpreter), with the first autotuning config of every family, both weight
layouts, bias and split-K, and its shared memory must fit the H100's 227 KB per block.

    python -m tests.kernels.test_compile_sm90     prints one line per compiled kernel
"""
import json
import os
import subprocess
import sys

import pytest
import torch

H100_SHARED_BYTES = 232448  # 227 KB, the most one block may use on sm_90


def _compile_all() -> list[dict]:
    """Compile every kernel variant; runs without TRITON_INTERPRET (see the test below)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels import (nf4_dequant, nf4_gemv, nf4_lowrank, nf4_lowrank_mma, nf4_matmul, nf4_mma, nf4_mma_t,
                         nf4_wgmma, rotary)

    names = {torch.int32: "i32", torch.uint8: "u8", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

    def build(fn, args: dict, constexprs: dict, config) -> dict:
        signature, attrs = {}, {}
        for i, name in enumerate(fn.arg_names):
            if name in constexprs or name in config.kwargs:
                signature[name] = "constexpr"
            elif isinstance(args[name], torch.dtype):
                signature[name] = "*" + names[args[name]]
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif isinstance(args[name], float):
                signature[name] = "fp32"
            else:
                signature[name] = "i32"
                if args[name] % 16 == 0:  # as Triton specializes such arguments at run time
                    attrs[(i,)] = [["tt.divisibility", 16]]
        source = ASTSource(fn=fn, signature=signature, constexprs={**constexprs, **config.kwargs}, attrs=attrs)
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
        return {"shared": kernel.metadata.shared}

    def build_wgmma(block_x: int, split: int, warps: int, dtype: torch.dtype, double_quant: bool,
                    has_bias: bool) -> dict:
        """The Gluon kernel (kernels/nf4_wgmma.py), its TMA descriptors described by their type strings;
        its A operand's layout is checked here (convert_layout(assert_trivial=True))."""
        from triton.experimental.gluon import language as gl
        from triton.experimental.gluon._runtime import GluonASTSource
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
        from triton.runtime.jit import mangle_type

        element = gl.bfloat16 if dtype == torch.bfloat16 else gl.float16
        rows = torch.empty(256, 4096, dtype=dtype)  # only its dtype, shape and strides are read
        descriptor = {name: mangle_type(TensorDescriptor.from_tensor(
            rows, [block_x, width], gl.NVMMASharedLayout.get_default_for([block_x, width], element)))
            for name, width in (("x_desc", nf4_wgmma.BLOCK_K), ("y_desc", 16 * warps))}
        types = dict(descriptor, packed_ptr="*u8", absmax_ptr="*u8" if double_quant else "*fp32",
                     nested_absmax_ptr="*fp32", nested_code_ptr="*fp32", offset_ptr="*fp32", code_planes_ptr="*i32",
                     bias_ptr="*" + names[dtype], workspace_ptr="*fp32", tickets_ptr="*i32", N="i32", K="i32")
        constexprs = dict(DOUBLE_QUANT=double_quant, HAS_BIAS=has_bias, SPLIT=split, STAGES=4)
        fn = nf4_wgmma.nf4_wgmma_kernel
        signature = {name: "constexpr" if name in constexprs else types[name] for name in fn.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
                 if name not in constexprs and (types[name].startswith("*") or name in ("N", "K"))}
        source = GluonASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))
        return {"shared": kernel.metadata.shared}

    weight = dict(packed_ptr=torch.uint8, absmax_ptr=torch.uint8, nested_absmax_ptr=torch.float32,
                  nested_code_ptr=torch.float32, offset=torch.float32, code_ptr=torch.float32)
    fmt = dict(BLOCKSIZE=64, DOUBLE_QUANT=True, OFFSET_IS_POINTER=True, TILED=False)
    tiled = dict(fmt, TILED=True)  # kernels/nf4_tiles.py Note [tiled codes]
    sizes = dict(M=4096, N=4096, K=4096, row_bytes=2048, row_words=512, M_BUCKET=4096, stride_xm=4096, stride_gm=4096,
                 stride_om=4096)
    results = []

    def run(label, fn, args, constexprs, config):
        try:
            results.append({"label": label, **build(fn, args, constexprs, config)})
        except Exception as error:  # reported by the test with the label
            results.append({"label": label, "error": f"{type(error).__name__}: {str(error)[:400]}"})

    for layout in (fmt, tiled):
        run(f"dequantize tiled={layout['TILED']}", nf4_dequant._dequantize_kernel.fn,
            dict(weight, out_ptr=torch.bfloat16, numel=4096 * 4096, nbytes=4096 * 2048, nblocks=4096 * 64, K=4096),
            layout, nf4_dequant._CONFIGS[0])

    def gemv_m1(label, dtype, layout, lookup, has_bias):  # one split, M = 1
        run(label, nf4_gemv._gemv_kernel,
            dict(x_ptr=dtype, **weight, byte_code_ptr=torch.float32, code_planes_ptr=torch.int32, bias_ptr=dtype,
                 out_ptr=dtype, **sizes),
            dict(layout, HAS_BIAS=has_bias, SPLIT=1, M_PAD=1, LOOKUP=lookup, IN_REGISTERS=True),
            nf4_gemv._FMA_CONFIGS[0])

    def x_w_t(label, dtype, layout, has_bias, precision, config):  # one split, whole-block rows
        run(label, nf4_matmul._matmul_kernel, dict(x_ptr=dtype, **weight, bias_ptr=dtype, out_ptr=dtype, **sizes),
            dict(layout, WHOLE_BLOCKS=True, HAS_BIAS=has_bias, SPLIT=1, DOT_PRECISION=precision), config)

    gemv_m1("gemv M_PAD=1 prmt tiled", torch.bfloat16, tiled, "prmt", True)
    gemv_m1("gemv M_PAD=1 nibble float32 x", torch.float32, fmt, "nibble", False)
    x_w_t("x @ W.T small-M tiled", torch.bfloat16, tiled, True, "tf32", nf4_matmul._SMALL_M_CONFIGS[0])
    x_w_t("x @ W.T large-M float32 (ieee dot)", torch.float32, fmt, False, "ieee", nf4_matmul._LARGE_M_CONFIGS[0])
    run("g @ W large-M tiled", nf4_matmul._matmul_t_kernel, dict(g_ptr=torch.bfloat16, **weight, out_ptr=torch.bfloat16,
                                                                 **sizes),
        dict(tiled, WHOLE_BLOCKS=True, SPLIT=1, DOT_PRECISION="tf32"), nf4_matmul._LARGE_M_T_CONFIGS[0])
    for whole in (True, False):
        layout = dict(fmt, WHOLE_BLOCKS=whole)
        for split in (1, 2):
            out = torch.bfloat16 if split == 1 else torch.float32
            if whole:  # the GEMV reads whole-block rows only; every M = 1 lookup (prmt: inline PTX)
                for m_pad, lookup, configs in [(1, lookup, nf4_gemv._FMA_CONFIGS) for lookup in nf4_gemv.GEMV_LOOKUPS] \
                        + [(16, lookup, nf4_gemv._DOT_CONFIGS) for lookup in ("prmt", "prmt_bf16", "nibble")]:
                    run(f"gemv M_PAD={m_pad} {lookup} split={split}", nf4_gemv._gemv_kernel,
                        dict(x_ptr=torch.bfloat16, **weight, byte_code_ptr=torch.float32, code_planes_ptr=torch.int32,
                             bias_ptr=torch.bfloat16, out_ptr=out, **sizes),
                        dict(fmt, HAS_BIAS=True, SPLIT=split, M_PAD=m_pad, LOOKUP=lookup, IN_REGISTERS=True),
                        configs[0])
            for kind, configs in (("small-M", nf4_matmul._SMALL_M_CONFIGS), ("large-M", nf4_matmul._LARGE_M_CONFIGS)):
                run(f"x @ W.T {kind} whole={whole} split={split}", nf4_matmul._matmul_kernel,
                    dict(x_ptr=torch.bfloat16, **weight, bias_ptr=torch.bfloat16, out_ptr=out, **sizes),
                    dict(layout, HAS_BIAS=True, SPLIT=split, DOT_PRECISION="tf32"), configs[0])
            for kind, configs in (("small-M", nf4_matmul._SMALL_M_T_CONFIGS), ("large-M", nf4_matmul._LARGE_M_T_CONFIGS)):
                run(f"g @ W {kind} whole={whole} split={split}", nf4_matmul._matmul_t_kernel,
                    dict(g_ptr=torch.bfloat16, **weight, out_ptr=out, **sizes),
                    dict(layout, SPLIT=split, DOT_PRECISION="tf32"), configs[0])
    mma_args = dict(x_ptr=torch.bfloat16, packed_ptr=torch.uint8, absmax_ptr=torch.uint8,
                    nested_absmax_ptr=torch.float32, nested_code_ptr=torch.float32, offset=torch.float32,
                    code_planes_ptr=torch.int32, bias_ptr=torch.bfloat16, scratch_ptr=torch.float32,
                    out_ptr=torch.bfloat16, M=16, N=4096, K=4096, stride_xm=4096, stride_om=4096)
    for i, (blocksize, m_tiles, unroll, float16, double_quant, depth, shared_sums, table, tiles, x_ahead) in enumerate((
            (64, 1, 2, False, True, 1, True, 0, 1, False), (64, 2, 4, False, True, 1, False, 2, 2, False),
            (32, 2, 2, True, True, 2, True, 4, 1, False), (256, 1, 4, False, False, 1, True, 1, 4, False),
            (64, 1, 4, False, True, 2, False, 3, 1, False), (64, 4, 4, False, True, 1, True, 0, 1, False),
            (64, 8, 2, True, True, 1, False, 0, 1, False), (64, 1, 4, False, True, 1, True, 3, 4, False),
            (64, 2, 2, False, True, 1, True, 4, 1, True), (64, 1, 4, False, True, 1, True, 3, 2, True),
            (32, 2, 4, True, True, 1, False, 0, 1, True))):
        dtype = torch.float16 if float16 else torch.bfloat16
        constexprs = dict(BLOCKSIZE=blocksize, DOUBLE_QUANT=double_quant, OFFSET_IS_POINTER=double_quant,
                          HAS_BIAS=True, M_TILES=m_tiles, FLOAT16=float16, KSPLIT=4, UNROLL=unroll,
                          ROW_TILES=1 + (blocksize == 64 and m_tiles == 2 and unroll == 4), DEPTH=depth,
                          SHARED_SUMS=shared_sums, TABLE_QUARTERS=table, X_FRAGMENTS=m_tiles > 4, TILED=i % 2 == 0,
                          TILES=tiles, X_AHEAD=x_ahead)
        if m_tiles == 1:
            constexprs["M"] = 1  # Triton specializes an argument equal to 1 into a constant
        run(f"mma gemv blocksize={blocksize} M_TILES={m_tiles} UNROLL={unroll} ROW_TILES={constexprs['ROW_TILES']} "
            f"DEPTH={depth} SHARED_SUMS={shared_sums} TABLE_QUARTERS={table} X_FRAGMENTS={m_tiles > 4} "
            f"TILED={i % 2 == 0} TILES={tiles} X_AHEAD={x_ahead} {dtype}",
            nf4_mma._mma_gemv_kernel,
            dict(mma_args, x_ptr=dtype, bias_ptr=dtype, out_ptr=dtype,
                 absmax_ptr=torch.uint8 if double_quant else torch.float32), constexprs,
            triton.Config({}, num_warps=4, num_stages=1))
    for m_tiles, blocksize, double_quant, warps, tiled_codes in ((1, 64, True, 4, False), (2, 128, False, 8, True),
                                                                 (2, 64, True, 4, True)):
        constexprs = dict(BLOCKSIZE=blocksize, DOUBLE_QUANT=double_quant, OFFSET_IS_POINTER=double_quant,
                          M_TILES=m_tiles, WARPS=warps, TILED=tiled_codes)
        if m_tiles == 1:
            constexprs["M"] = 1  # Triton specializes an argument equal to 1 into a constant
        run(f"mma g @ W blocksize={blocksize} M_TILES={m_tiles} WARPS={warps} TILED={tiled_codes}",
            nf4_mma_t._mma_t_kernel,
            dict(g_ptr=torch.bfloat16, packed_ptr=torch.uint8,
                 absmax_ptr=torch.uint8 if double_quant else torch.float32, nested_absmax_ptr=torch.float32,
                 nested_code_ptr=torch.float32, offset=torch.float32, code_planes_ptr=torch.int32,
                 out32_ptr=torch.float32, M=16, N=4096, K=4096, stride_gm=4096,
                 rows_per_program=512), constexprs, triton.Config({}, num_warps=warps, num_stages=1))
    for i, config in enumerate(nf4_lowrank._CONFIGS):  # every config; float16 / float32 and blocksize 256 once
        dtype, blocksize = ((torch.bfloat16, 64), (torch.float16, 256), (torch.float32, 64),
                            (torch.bfloat16, 32))[i % 4]
        run(f"W + s B A {config.kwargs} {dtype} blocksize={blocksize} tiled={i == 0}", nf4_lowrank._lowrank_kernel.fn,
            dict(weight, b_ptr=torch.float32, a_ptr=torch.float32, out_ptr=dtype, N=4096, K=4096, R=16, scaling=2.0),
            dict(fmt, BLOCKSIZE=blocksize, R_PAD=16, DOT_FP32=dtype == torch.float32, TILED=i == 0), config)
    for quads, warps, rank, dtype, double_quant, row_blocks in (
            (1, 8, 16, torch.bfloat16, True, True), (2, 4, 16, torch.bfloat16, True, True),
            (2, 4, 7, torch.float16, False, False), (1, 4, 64, torch.bfloat16, True, False)):
        chunks = -(-rank // 16)
        run(f"W + s B A per lane QUADS={quads} WARPS={warps} rank={rank} {dtype} double_quant={double_quant} "
            f"ROW_BLOCKS={row_blocks} TILED={quads == 2}", nf4_lowrank_mma._lowrank_mma_kernel,
            dict(weight, absmax_ptr=torch.uint8 if double_quant else torch.float32, b_ptr=dtype, a_ptr=dtype,
                 out_ptr=dtype, N=4096, K=4096, R=rank, scaling=2.0, rows_per_program=16 * warps * 4),
            dict(fmt, DOUBLE_QUANT=double_quant, OFFSET_IS_POINTER=double_quant, FLOAT16=dtype == torch.float16,
                 QUADS=quads, R_CHUNKS=chunks, EVEN_R=rank % 2 == 0, ROW_BLOCKS=row_blocks, WARPS=warps,
                 TILED=quads == 2),
            triton.Config({}, num_warps=warps, num_stages=1))
    if nf4_wgmma.HAVE_GLUON:
        for block_x, split, warps, dtype, double_quant, has_bias in (
                (256, 1, 8, torch.bfloat16, True, True), (128, 1, 4, torch.float16, False, False),
                (128, 4, 4, torch.bfloat16, True, False)):
            label = f"wgmma block_x={block_x} split={split} warps={warps} {dtype} double_quant={double_quant}"
            try:
                results.append({"label": label, **build_wgmma(block_x, split, warps, dtype, double_quant, has_bias)})
            except Exception as error:
                results.append({"label": label, "error": f"{type(error).__name__}: {str(error)[:400]}"})
    for backward in (False, True):  # q of Llama-3.1-8B at T = 2048: (1, 32, 2048, 128) as a transposed view
        run(f"rotary backward={backward}", rotary._rotary_kernel,
            dict(x_ptr=torch.bfloat16, cos_ptr=torch.bfloat16, sin_ptr=torch.bfloat16, out_ptr=torch.bfloat16,
                 n_rows=65536, H=32, T=2048, stride_xb=8388608, stride_xh=128, stride_xt=4096, stride_ob=8388608,
                 stride_oh=128, stride_ot=4096, stride_cb=262144, stride_ct=128),
            dict(HALF=64, BLOCK_HALF=64, ROWS=32, BACKWARD=backward), triton.Config({}, num_warps=4))
    return results


def _can_compile_here() -> bool:
    """Triton >= 3.3 (the ASTSource signature and attribute format used above) with its ptxas."""
    try:
        import triton
    except ImportError:
        return False
    version = tuple(int(v) for v in triton.__version__.split(".")[:2])
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return version >= (3, 3) and os.path.exists(ptxas)


@pytest.mark.slow
@pytest.mark.skipif(not _can_compile_here(), reason="needs Triton >= 3.3 with its bundled ptxas")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-m", "tests.kernels.test_compile_sm90", "--json"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    from kernels.nf4_wgmma import HAVE_GLUON
    assert len(results) == 63 + (3 if HAVE_GLUON else 0)  # the Gluon kernel where this Triton has Gluon
    errors = [f"{r['label']}: {r['error']}" for r in results if "error" in r]
    assert not errors, "\n".join(errors)
    too_big = [f"{r['label']}: {r['shared']} bytes" for r in results if r["shared"] > H100_SHARED_BYTES]
    assert not too_big, "\n".join(too_big)


if __name__ == "__main__":
    compiled = _compile_all()
    if "--json" in sys.argv:
        print(json.dumps(compiled))
    else:
        for r in compiled:
            print(f"{r['label']:45s} {r.get('error', str(r.get('shared')) + ' bytes of shared memory')}")
