"""Compiler building blocks of the numba kernels: jit options, LLVM intrinsics (``popcnt``, bit casts,
software prefetch), 16-bit float loads, a vectorisable ``exp`` and the broadcast-mask row map.

Cached kernels (``cache=True``) are keyed on their own file only: after editing a helper here, delete
``ops/cpu/__pycache__/*.nb*`` so the kernels that inline it are recompiled.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload


FASTMATH = {"reassoc", "contract"}  # vectorised dot products; no nnan/ninf: -inf and NaN are meaningful
# error_model="numpy": no division-by-zero check (and exception) at each ``/``, ``//`` or ``%``, a branch
# that alone keeps LLVM from vectorising a loop (the GELU of the query encoder: 10x); the kernels'
# divisors are checked sizes and counts
JIT = dict(cache=True, nogil=True, error_model="numpy")
PJIT = dict(parallel=True, cache=True, nogil=True, error_model="numpy")


# ----------------------------------------------------------------------------------- intrinsics


@intrinsic
def popcount(typingctx, x):
    """``llvm.ctpop`` of an int64 word (one ``popcnt`` instruction)."""
    if not isinstance(x, types.Integer) or x.bitwidth != 64:
        return None

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return types.int64(x), codegen


@intrinsic
def bits_as_f32(typingctx, x):
    """Reinterpret the low 32 bits of an integer as a float32."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        value = args[0]
        width = value.type.width
        if width > 32:
            value = builder.trunc(value, ir.IntType(32))
        elif width < 32:
            value = builder.zext(value, ir.IntType(32))
        return builder.bitcast(value, ir.FloatType())

    return types.float32(x), codegen


def _prefetch_codegen(locality: int):
    """``llvm.prefetch`` of the line holding ``arr[row, col]``: read, ``locality`` 3 = all cache levels
    (``prefetcht0``), 2 = L2 and below (``prefetcht1``), data cache."""

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1], args[2]], wraparound=False)
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, locality), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return codegen


@intrinsic
def prefetch(typingctx, arr, row, col):
    """Software prefetch (to all cache levels) of the line holding ``arr[row, col]`` of a 2-D array."""
    if not isinstance(arr, types.Array) or arr.ndim != 2:
        return None
    return types.void(arr, types.intp, types.intp), _prefetch_codegen(3)


@intrinsic
def prefetch_l2(typingctx, arr, row, col):
    """Software prefetch to L2, not L1, of the line holding ``arr[row, col]`` of a 2-D array: for rows
    needed a while later (V rows fetched during the logits). Into L1 they would evict the byte tables
    and K rows in use (measured: ``docs/speed.md``)."""
    if not isinstance(arr, types.Array) or arr.ndim != 2:
        return None
    return types.void(arr, types.intp, types.intp), _prefetch_codegen(2)


@intrinsic
def compress16(typingctx, flags, start, base, out, pos):
    """Append the positions ``base + start + k`` (int32) of the non-zero bytes among ``flags[start :
    start + 16]`` to ``out[pos:]`` and return how many: one vector compress (AVX-512's ``vpcompressd``
    where the CPU has it, LLVM's expansion elsewhere). ``flags`` holds at least ``start + 16`` bytes;
    ``out`` has room for 16 entries from ``pos`` (all 16 are written, the count is what counts)."""
    if not (isinstance(flags, types.Array) and flags.dtype in (types.uint8, types.boolean) and flags.ndim == 1):
        return None
    if not (isinstance(out, types.Array) and out.dtype == types.int32 and out.ndim == 1):
        return None

    def codegen(context, builder, signature, args):
        flag_ty, _, _, out_ty, _ = signature.args
        flag_arr = context.make_array(flag_ty)(context, builder, args[0])
        out_arr = context.make_array(out_ty)(context, builder, args[3])
        i8, i16, i32, i64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
        v16i8, v16i32, v16i1 = ir.VectorType(i8, 16), ir.VectorType(i32, 16), ir.VectorType(ir.IntType(1), 16)
        start = context.cast(builder, args[1], signature.args[1], types.int64)
        pos = context.cast(builder, args[4], signature.args[4], types.int64)
        src = builder.gep(builder.bitcast(flag_arr.data, i8.as_pointer()), [start])
        loaded = builder.load(builder.bitcast(src, v16i8.as_pointer()), align=1)
        mask = builder.icmp_unsigned("!=", loaded, ir.Constant(v16i8, [0] * 16))
        first = builder.trunc(builder.add(context.cast(builder, args[2], signature.args[2], types.int64), start), i32)
        splat = builder.shuffle_vector(builder.insert_element(ir.Constant(v16i32, ir.Undefined), first,
                                                              ir.Constant(i32, 0)),
                                       ir.Constant(v16i32, ir.Undefined), ir.Constant(v16i32, [0] * 16))  # fmt: skip
        values = builder.add(splat, ir.Constant(v16i32, list(range(16))))
        dest = builder.gep(builder.bitcast(out_arr.data, i32.as_pointer()), [pos])
        # compress in a register, then one plain store of all 16 lanes (the memory form of vpcompressd
        # is microcoded on AMD Zen 4: 3x slower than a scalar loop)
        fnty = ir.FunctionType(v16i32, [v16i32, v16i1, v16i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.experimental.vector.compress.v16i32")
        packed = builder.call(fn, [values, mask, ir.Constant(v16i32, ir.Undefined)])
        builder.store(packed, builder.bitcast(dest, v16i32.as_pointer()), align=4)
        count = builder.call(cgutils.get_or_insert_function(builder.module, ir.FunctionType(i16, [i16]),
                                                            "llvm.ctpop.i16"), [builder.bitcast(mask, i16)])  # fmt: skip
        return builder.zext(count, i64)

    return types.int64(flags, start, base, out, pos), codegen


AHEAD = 16  # selected rows prefetched ahead: sparse gathers are latency-bound without it


BF16, F16 = 1, 2
"""``half`` codes: 16-bit K/V arrive as raw ``uint16`` bits, one compiled kernel serving both formats."""


def load_f32(x, half):  # pragma: no cover - replaced by the overload in compiled code
    raise NotImplementedError


@overload(load_f32)
def _load_f32_overload(x, half):
    """Load one element as float32: floats are cast; ``uint16`` bits are bfloat16 (``half == BF16``) or
    float16 (``half == F16``). ``half`` is loop-invariant, so LLVM unswitches the loops on it."""
    if isinstance(x, types.Float):
        return lambda x, half: np.float32(x)
    if x == types.uint16:

        def load16(x, half):
            h = np.uint32(x)
            if half == BF16:
                return bits_as_f32(h << 16)
            o = (h & 0x7FFF) << 13
            f = bits_as_f32(o) * np.float32(5.192296858534828e33)  # 2 ** 112 rebiases, subnormals too
            if (h & 0x7C00) == 0x7C00:
                f = bits_as_f32(o | 0x7F800000)  # inf / nan
            return -f if h & 0x8000 else f

        return load16
    return None


@njit(**JIT)
def mask_row(row, dims):
    """Row of a broadcast mask for flat row ``(b, h, t)``; ``dims = (H, T, Bm, Hm, Tm)``."""
    heads, tokens, mb, mh, mt = dims[0], dims[1], dims[2], dims[3], dims[4]
    t = row % tokens
    h = (row // tokens) % heads
    b = row // (tokens * heads)
    return ((b % mb) * mh + (h % mh)) * mt + (t % mt)


@njit(fastmath=FASTMATH, inline="always", **JIT)
def expf(x):
    """``exp(x)`` for ``x <= 0`` in float32 without a libm call (Cephes' expf polynomial, about 1 ulp),
    so that the loop over a chunk's logits vectorises; ``0`` below ``-87.3`` and for ``-inf``."""
    xc = max(x, np.float32(-87.3))
    n = np.floor(xc * np.float32(1.4426950408889634) + np.float32(0.5))
    r = xc - n * np.float32(0.693359375) + n * np.float32(2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    y = (p * r * r + r + np.float32(1.0)) * bits_as_f32((np.int32(n) + np.int32(127)) << np.int32(23))
    return y if x >= np.float32(-87.3) else np.float32(0.0)


@njit(inline="always", **JIT)
def task_span(task, nch, kheads, kbatch, seq, chunk, kstride):
    """``(b, KV head, chunk, first K row of that head, s0, s1)`` of task number ``task``: tasks are
    (batch, KV head, chunk) triples, chunk fastest; ``kbatch`` is 1 when K is shared by the batch;
    ``kstride`` is the rows between two heads' first keys (``seq``, or a growing cache's capacity)."""
    c = task % nch
    kvh = (task // nch) % kheads
    b = task // (nch * kheads)
    kbase = ((b % kbatch) * kheads + kvh) * kstride
    s0 = c * chunk
    return b, kvh, c, kbase, s0, min(seq, s0 + chunk)
