"""Philox4x32-10 and the Box-Muller mapping in integer torch ops.

The same stream as csrc/include/bayes_ext/philox.h (layout in docs/design.md), so the pure-PyTorch
backend draws the same noise as the compiled kernels. 32-bit words live in int64 tensors. A 32x32-bit
product can exceed 2^63: int64 multiplication wraps modulo 2^64 in torch's kernels, which keeps all
64 bits of the product (the known-answer tests in tests/test_philox.py check this on every backend).
Large requests are generated in cache-sized chunks with in-place ops: eager torch ops are memory
bound, and ~130 passes over an L2-resident chunk cost far less than over a 100 MB tensor.
"""
import math

import torch

M0 = 0xD2511F53
M1 = 0xCD9E8D57
W0 = 0x9E3779B9
W1 = 0xBB67AE85
MASK32 = 0xFFFFFFFF
TWO_POW_M24 = 2.0 ** -24


def as_uint64(value: int) -> int:
    """An int64 (possibly negative) read as the unsigned 64-bit value with the same bits."""
    return int(value) & 0xFFFFFFFFFFFFFFFF


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Ten Philox rounds on counter words c0..c3 (int64 tensors of 32-bit values), key (k0, k1).

    Each round is hi/lo of two 32x32-bit products. The lo words are kept as the whole 64-bit
    products: their upper bits only ever meet XORs before the mask that cleans the next multiplier,
    so one mask per product (the hi word's, after the XORs) is all the bookkeeping needed.
    """
    for _ in range(10):
        p0 = c0 * M0  # wraps modulo 2^64: still the exact product's bits
        p1 = c2 * M1
        # >> is arithmetic (sign fill above bit 31 for products >= 2^63): masked after the XORs
        c0 = (p1 >> 32).bitwise_xor_(c1).bitwise_xor_(k0).bitwise_and_(MASK32)
        c2 = (p0 >> 32).bitwise_xor_(c3).bitwise_xor_(k1).bitwise_and_(MASK32)
        c1, c3 = p1, p0  # lo words with garbage above bit 31
        k0 = (k0 + W0) & MASK32
        k1 = (k1 + W1) & MASK32
    return c0, c1.bitwise_and_(MASK32), c2, c3.bitwise_and_(MASK32)


def philox_blocks(seed: int, offset: int, first_block: int, num_blocks: int, device=None):
    """The four words of blocks [first_block, first_block + num_blocks) of stream (seed, offset)."""
    seed, offset, first_block = as_uint64(seed), as_uint64(offset), as_uint64(first_block)
    block = torch.arange(num_blocks, dtype=torch.int64, device=device)
    # block index = first_block + arange, carried into the high word by hand (first_block may be
    # >= 2^63, which int64 cannot hold).
    lo_sum = block + (first_block & MASK32)
    c0 = lo_sum & MASK32
    c1 = ((lo_sum >> 32) + (first_block >> 32)) & MASK32
    c2 = torch.full_like(block, offset & MASK32)
    c3 = torch.full_like(block, offset >> 32)
    return philox4x32_10(c0, c1, c2, c3, seed & MASK32, seed >> 32)


def _radius(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """sqrt(-2 log u), u = (2 (x >> 9) + 1) 2^-24 in (0, 1): exact in float32 and float64."""
    u = ((x >> 9) << 1 | 1).to(dtype).mul_(TWO_POW_M24)
    return u.log_().mul_(-2.0).sqrt_()


def _angle(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """2 pi v, v = (x >> 8) 2^-24 in [0, 1)."""
    return (x >> 8).to(dtype).mul_(TWO_POW_M24 * 2.0 * math.pi)


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    # Always float64: torch's vectorised and scalar (tail) log / cos / sin can differ by an ulp, so
    # float32 math would make normal_at's values depend on where an element falls in a vector;
    # rounded from float64 they agree (a one-ulp float64 difference almost never survives).
    return torch.float64


def normal_from_words(x0, x1, x2, x3, dtype: torch.dtype, out: torch.Tensor = None) -> torch.Tensor:
    """Box-Muller on the words of each block; the normals in element order, flattened (into `out`,
    a contiguous (4 * blocks,) tensor of dtype, when given)."""
    math_dtype = _math_dtype(dtype)
    result = out if out is not None and out.dtype == math_dtype else \
        torch.empty(4 * x0.numel(), dtype=math_dtype, device=x0.device)
    lanes = result.view(-1, 4)
    for pair, (xr, xa) in enumerate(((x0, x1), (x2, x3))):
        r, a = _radius(xr, math_dtype), _angle(xa, math_dtype)
        torch.mul(r, torch.cos(a), out=lanes[:, 2 * pair])
        torch.mul(r, a.sin_(), out=lanes[:, 2 * pair + 1])
    if out is not None and out is not result:
        return out.copy_(result)  # rounds to out's dtype
    return result if result.dtype == dtype else result.to(dtype)


CHUNK_BLOCKS = 1 << 16  # Philox blocks per chunk: the int64 word arrays (512 KB each) stay in cache


def normal(numel: int, seed: int, offset: int, dtype=torch.float32, device=None, start: int = 0) -> torch.Tensor:
    """Standard normals for elements [start, start + numel) of stream (seed, offset), flattened."""
    out = torch.empty(numel, dtype=dtype, device=device)
    if numel == 0:
        return out
    first_block = start // 4
    skip = start - 4 * first_block
    num_blocks = (skip + numel + 3) // 4
    chunk = CHUNK_BLOCKS if out.device.type == "cpu" else num_blocks  # GPUs prefer one big launch
    for begin in range(0, num_blocks, chunk):
        blocks = min(chunk, num_blocks - begin)
        lo = 4 * begin - skip  # position of this chunk's first element in `out`
        words = philox_blocks(seed, offset, first_block + begin, blocks, device=out.device)
        if lo >= 0 and lo + 4 * blocks <= numel:  # a whole chunk: Box-Muller writes straight into out
            normal_from_words(*words, dtype=dtype, out=out[lo:lo + 4 * blocks])
            continue
        eps = normal_from_words(*words, dtype=dtype)
        out[max(lo, 0):lo + eps.numel()] = eps[max(-lo, 0):numel - lo]
    return out


def normal_at(elements: torch.Tensor, seed: int, offset: int, dtype=torch.float32) -> torch.Tensor:
    """Standard normals of stream (seed, offset) at arbitrary element indices (an int64 tensor of
    any shape, values in [0, 2^62)), in that shape: ``normal(...)[elements]`` without generating the
    elements in between (rows of a table looked up by an embedding)."""
    seed, offset = as_uint64(seed), as_uint64(offset)
    e = elements.to(torch.int64)
    block = e >> 2
    lane = e & 3
    c0 = block & MASK32
    c1 = block >> 32
    c2 = torch.full_like(block, offset & MASK32)
    c3 = torch.full_like(block, offset >> 32)
    x0, x1, x2, x3 = philox4x32_10(c0, c1, c2, c3, seed & MASK32, seed >> 32)
    high_pair = lane >= 2  # lanes 2, 3 use (x2, x3)
    x_even = torch.where(high_pair, x2, x0)
    x_odd = torch.where(high_pair, x3, x1)
    # The expressions of normal_from_words, so the values are bit-identical to normal()'s.
    math_dtype = _math_dtype(dtype)
    r, a = _radius(x_even, math_dtype), _angle(x_odd, math_dtype)
    return torch.where((lane & 1) == 0, r * torch.cos(a), r * torch.sin(a)).to(dtype)
