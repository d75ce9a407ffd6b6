"""The fingerprint's definition in plain Python, without torch: what every fast path is held to.

For a tensor of global shape S whose dtype has itemsize k <= 8, every element at global
row-major linear index i with raw bits b (an unsigned k-byte integer, zero-extended to 64
bits) contributes ``h(i, b) = mix(b ^ mix(i + 1))``, where ``mix`` is the SplitMix64
finaliser; the fingerprint is the sum of all contributions modulo 2**64, written as 16
lowercase hex digits (DESIGN.md, "The fingerprint").
"""

from __future__ import annotations

from typing import Sequence

MASK64 = (1 << 64) - 1
# The SplitMix64 finaliser's multipliers.
MUL1 = 0xBF58476D1CE4E5B9
MUL2 = 0x94D049BB133111EB


def mix64(z: int) -> int:
    """SplitMix64's finaliser on an unsigned 64-bit integer (the definition's ``mix``)."""
    z &= MASK64
    z ^= z >> 30
    z = (z * MUL1) & MASK64
    z ^= z >> 27
    z = (z * MUL2) & MASK64
    z ^= z >> 31
    return z


def fp_reference(values_bits: Sequence[int], indices: Sequence[int]) -> int:
    """The fingerprint sum over (bits, global index) pairs, straight from the definition.

    ``values_bits[j]`` is the raw bits of an element as an unsigned integer (already
    zero-extended) and ``indices[j]`` its global row-major linear index. Slow; for tests and
    for the kernels' self-checks.
    """
    if len(values_bits) != len(indices):
        raise ValueError(f"fp_reference: {len(values_bits)} values but {len(indices)} indices")
    total = 0
    for b, i in zip(values_bits, indices):
        if not 0 <= b <= MASK64:
            raise ValueError(f"fp_reference: bits {b!r} are not an unsigned 64-bit integer")
        total += mix64(b ^ mix64(i + 1))
    return total & MASK64


def to_hex(x: int) -> str:
    """A fingerprint as the 16 lowercase hex digits the manifest and reports show."""
    if not 0 <= x <= MASK64:
        raise ValueError(f"fingerprint {x!r} is not an unsigned 64-bit integer")
    return f"{x:016x}"
