"""Philox4x32-10 and the Box-Muller mapping in integer torch ops.

The same stream as csrc/include/bayes_ext/philox.h (layout in docs/design.md), so the pure-PyTorch
backend draws the same noise as the compiled kernels. 32-bit words live in int64 tensors. A 32x32-bit
product can exceed 2^63: int64 multiplication wraps modulo 2^64 in torch's kernels, which keeps all
64 bits of the product (the known-answer tests in tests/test_philox.py check this on every backend).
Large requests are generated in cache-sized chunks with in-place ops: eager torch ops are memory
bound, and ~130 passes over an L2-resident chunk cost far less than over a 100 MB tensor. Every pass
writes into a workspace allocated once per request (_Workspace): a fresh 512 KB tensor per op costs
about as much as the op, because glibc hands freed memory of that size back to the kernel and the
next allocation page-faults it in again. Measured on 2 cores, normal() of 1M floats, interleaved
A/B: 15.5 ms allocating per op, 12.0 ms with the workspace, 10.8 ms with the Box-Muller products in
contiguous rows. (Stacking words 0 and 2 into one (2, n) tensor per op, to halve the op count, was
slower: 14.5 ms; these ops are bound by bytes, not by their number.)
"""
import math
import threading

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


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int, workspace=None):
    """Ten Philox rounds on counter words c0..c3 (int64 tensors of 32-bit values), key (k0, k1).

    Each round is hi/lo of two 32x32-bit products. The lo words are kept as the whole 64-bit
    products: their upper bits only ever meet XORs before the mask that cleans the next multiplier,
    so one mask per product (the hi word's, after the XORs) is all the bookkeeping needed.
    With a workspace (two pairs of product buffers the size of the words), c0 and c2 are updated in
    place and nothing is allocated; without one, every step is out of place (no out=, so it runs
    under vmap too) and the inputs are left untouched.
    """
    if workspace is None:
        for _ in range(10):
            p0, p1 = c0 * M0, c2 * M1
            c0 = ((p1 >> 32) ^ c1 ^ k0) & MASK32
            c2 = ((p0 >> 32) ^ c3 ^ k1) & MASK32
            c1, c3 = p1, p0
            k0 = (k0 + W0) & MASK32
            k1 = (k1 + W1) & MASK32
        return c0, c1 & MASK32, c2, c3 & MASK32
    for round_ in range(10):
        # round r writes the pair round r - 2 wrote, whose lo words round r - 1 has consumed
        p0, p1 = workspace[round_ & 1]
        torch.mul(c0, M0, out=p0)  # wraps modulo 2^64: still the exact product's bits
        torch.mul(c2, M1, out=p1)
        # >> is arithmetic (sign fill above bit 31 for products >= 2^63): masked after the XORs
        torch.bitwise_right_shift(p1, 32, out=c0).bitwise_xor_(c1).bitwise_xor_(k0).bitwise_and_(MASK32)
        torch.bitwise_right_shift(p0, 32, out=c2).bitwise_xor_(c3).bitwise_xor_(k1).bitwise_and_(MASK32)
        c1, c3 = p1, p0  # lo words with garbage above bit 31
        k0 = (k0 + W0) & MASK32
        k1 = (k1 + W1) & MASK32
    return c0, c1.bitwise_and_(MASK32), c2, c3.bitwise_and_(MASK32)


class _Workspace:
    """Buffers for generating up to `blocks` Philox blocks at a time and their Box-Muller normals."""

    def __init__(self, blocks: int, math_dtype: torch.dtype, device=None):
        def words():
            return torch.empty(blocks, dtype=torch.int64, device=device)
        self.counter = [words() for _ in range(4)]  # c0..c3 in, the words out (c1, c3 in the products)
        self.products = ((words(), words()), (words(), words()))
        self.bits = words()
        self.radius = torch.empty(blocks, dtype=math_dtype, device=device)
        self.angle = torch.empty(blocks, dtype=math_dtype, device=device)
        self.trig = torch.empty(4, blocks, dtype=math_dtype, device=device)
        self.arange = torch.arange(blocks, dtype=torch.int64, device=device)
        self.math_dtype = math_dtype

    def blocks(self, seed: int, offset: int, first_block: int, num_blocks: int):
        """The four words of blocks [first_block, first_block + num_blocks) of stream (seed, offset)."""
        c0, c1, c2, c3 = (t[:num_blocks] for t in self.counter)
        products = tuple((p0[:num_blocks], p1[:num_blocks]) for p0, p1 in self.products)
        # block index = first_block + arange, carried into the high word by hand (first_block may
        # be >= 2^63, which int64 cannot hold)
        lo_sum = torch.add(self.arange[:num_blocks], first_block & MASK32, out=c2)
        torch.bitwise_and(lo_sum, MASK32, out=c0)
        torch.bitwise_right_shift(lo_sum, 32, out=c1).add_(first_block >> 32).bitwise_and_(MASK32)
        c2.fill_(offset & MASK32)
        c3.fill_(offset >> 32)
        return philox4x32_10(c0, c1, c2, c3, seed & MASK32, seed >> 32, products)


def philox_blocks(seed: int, offset: int, first_block: int, num_blocks: int, device=None):
    """The four words of blocks [first_block, first_block + num_blocks) of stream (seed, offset)."""
    seed, offset, first_block = as_uint64(seed), as_uint64(offset), as_uint64(first_block)
    return _Workspace(num_blocks, torch.float64, device).blocks(seed, offset, first_block, num_blocks)


def _radius(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """sqrt(-2 log u), u = (2 (x >> 9) + 1) 2^-24 in (0, 1): exact in float32 and float64. (Out of
    place, as _angle: normal_at also runs under vmap.)"""
    return (((x >> 8) | 1).to(dtype) * TWO_POW_M24).log().mul(-2.0).sqrt()


def _radius_into(x: torch.Tensor, out: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    # (x >> 8) | 1 is 2 (x >> 9) + 1 in two integer passes
    out.copy_(torch.bitwise_right_shift(x, 8, out=bits).bitwise_or_(1))
    return out.mul_(TWO_POW_M24).log_().mul_(-2.0).sqrt_()


def _angle(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """2 pi v, v = (x >> 8) 2^-24 in [0, 1)."""
    return (x >> 8).to(dtype) * (TWO_POW_M24 * 2.0 * math.pi)


def _angle_into(x: torch.Tensor, out: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    out.copy_(torch.bitwise_right_shift(x, 8, out=bits))
    return out.mul_(TWO_POW_M24 * 2.0 * math.pi)


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    # Always float64: torch's vectorised and scalar (tail) log / cos / sin can differ by an ulp, so
    # float32 math would make normal_at's values depend on where an element falls in a vector;
    # rounded from float64 they agree (a one-ulp float64 difference almost never survives).
    return torch.float64


def _box_muller_into(words, lanes: torch.Tensor, ws: _Workspace) -> None:
    """Box-Muller on the words of each block into lanes, a (blocks, 4) tensor of any float dtype:
    pair p takes its radius from word 2p and its angle from word 2p + 1. The products go to
    contiguous rows of the workspace and one transposing copy interleaves (and rounds) them: an
    op writing with stride 4 runs torch's slow strided loop."""
    n = words[0].numel()
    bits, radius, angle, trig = ws.bits[:n], ws.radius[:n], ws.angle[:n], ws.trig[:, :n]
    for pair, (xr, xa) in enumerate(((words[0], words[1]), (words[2], words[3]))):
        _radius_into(xr, radius, bits)
        _angle_into(xa, angle, bits)
        torch.mul(radius, torch.cos(angle, out=trig[2 * pair]), out=trig[2 * pair])
        torch.mul(radius, angle.sin_(), out=trig[2 * pair + 1])
    lanes.copy_(trig.t())


CHUNK_BLOCKS = 1 << 16  # Philox blocks per chunk: the int64 word arrays (512 KB each) stay in cache
_THREAD_STATE = threading.local()


def _cpu_workspace(math_dtype: torch.dtype) -> _Workspace:
    """normal()'s CPU workspace of CHUNK_BLOCKS blocks (7.5 MB), kept per thread between calls: the
    blocked linear backward asks for a weight's noise in 256K-element blocks, and allocating the
    workspace anew each time page-faults it in again. (normal() hands out no view of it.)"""
    ws = getattr(_THREAD_STATE, "workspace", None)
    if ws is None or ws.math_dtype != math_dtype:
        ws = _THREAD_STATE.workspace = _Workspace(CHUNK_BLOCKS, math_dtype)
    return ws


def normal(numel: int, seed: int, offset: int, dtype=torch.float32, device=None, start: int = 0,
           out: torch.Tensor = None) -> torch.Tensor:
    """Standard normals for elements [start, start + numel) of stream (seed, offset), flattened
    (written into `out`, a contiguous (numel,) tensor of dtype on device, when given)."""
    if out is None:
        out = torch.empty(numel, dtype=dtype, device=device)
    if numel == 0:
        return out
    seed, offset = as_uint64(seed), as_uint64(offset)
    first_block = start // 4
    skip = start - 4 * first_block
    num_blocks = (skip + numel + 3) // 4
    math_dtype = _math_dtype(dtype)
    if out.device.type == "cpu":
        chunk, ws = min(CHUNK_BLOCKS, num_blocks), _cpu_workspace(math_dtype)
    else:  # GPUs prefer one launch
        chunk, ws = num_blocks, _Workspace(num_blocks, math_dtype, out.device)
    for begin in range(0, num_blocks, chunk):
        blocks = min(chunk, num_blocks - begin)
        lo = 4 * begin - skip  # position of this chunk's first element in `out`
        words = ws.blocks(seed, offset, as_uint64(first_block + begin), blocks)
        if lo >= 0 and lo + 4 * blocks <= numel:  # a whole chunk: Box-Muller writes straight into out
            _box_muller_into(words, out[lo:lo + 4 * blocks].view(blocks, 4), ws)
            continue
        eps = torch.empty(blocks, 4, dtype=math_dtype, device=out.device)  # the first or last chunk
        _box_muller_into(words, eps, ws)
        eps = eps.reshape(-1)
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
    # The expressions of _box_muller_into, so the values are bit-identical to normal()'s.
    math_dtype = _math_dtype(dtype)
    r, a = _radius(x_even, math_dtype), _angle(x_odd, math_dtype)
    return torch.where((lane & 1) == 0, r * torch.cos(a), r * torch.sin(a)).to(dtype)
