"""Byte units and element sizes, defined once."""

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
TIB = 1 << 40

# Bytes per element
BF16 = 2
FP32 = 4
# OCP MXFP4: 4-bit E2M1 values + one 8-bit E8M0 scale per 32 values = 4.25 bits per parameter
# (gpt-oss model card, arXiv:2508.10925).
MXFP4 = 4.25 / 8


def gib(n: float) -> float:
    return n / GIB
