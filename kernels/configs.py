"""Launch configurations per GPU generation (pure Python, no triton import).

GEMM tiles: (BM, BN, BK, GROUP_M, SWAP, num_warps, num_stages). SWAP puts the unpacked weights on
the MMA's register side (transposed tile). BK is capped by the effective scale block (each BK tile
must lie inside one block of l). Hopper values come from bench/kernels.py on an H100; the
Ampere/Ada values (sm_80/86/89) are conservative choices that fit their ~100 KB shared memory and
were NOT measured here (no such card was available).
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class GemmConfig:
    BM: int
    BN: int
    BK: int
    GROUP_M: int = 8
    SWAP: bool = False
    num_warps: int = 8
    num_stages: int = 3

    def capped(self, sb: int) -> "GemmConfig":
        bk = self.BK
        while bk > sb:
            bk //= 2
        return self if bk == self.BK else GemmConfig(self.BM, self.BN, bk, self.GROUP_M, self.SWAP, self.num_warps, self.num_stages)


# Candidates swept by bench/kernels.py (the first entry per arch is the default below).
SM90_CANDIDATES = (
    GemmConfig(128, 128, 128, 8, False, 8, 4),
    GemmConfig(128, 256, 128, 8, False, 8, 3),
    GemmConfig(256, 128, 128, 8, False, 8, 3),
    GemmConfig(128, 128, 256, 8, False, 8, 3),
    GemmConfig(128, 128, 128, 8, True, 8, 4),
    GemmConfig(256, 128, 128, 8, True, 8, 3),
    GemmConfig(64, 256, 128, 8, False, 4, 4),
    GemmConfig(128, 64, 128, 8, True, 4, 4),
)
SM8X_CANDIDATES = (
    GemmConfig(128, 128, 64, 8, False, 8, 3),
    GemmConfig(128, 64, 128, 8, False, 4, 3),
    GemmConfig(64, 128, 128, 8, False, 4, 3),
)
INTERPRETER_CONFIG = GemmConfig(16, 32, 64, 4, False, 4, 1)

# Activation kernels: a program walks BM rows across K in tiles of C = max(Hadamard block, 64)
# columns, BM = ACT_ELEMS_PER_TILE // C; two pipeline stages keep shared memory small enough for
# several programs per SM (the rotation matrix itself takes R * R * 2 bytes).
ACT_ELEMS_PER_TILE = 4096
ACT_NUM_WARPS = 4
ACT_NUM_STAGES = 2

# Unpack the 4-bit weights four bytes per 32-bit instruction (inline PTX) on CUDA.
ASM_UNPACK = False


def gemm_config(capability, m: int, n: int, k: int, sb: int, a_float: bool, interpret: bool) -> GemmConfig:
    """Pick the GEMM tile for a problem. Deterministic and shape-only (no autotuning at run time,
    so the first call of a shape costs only the compile and torch.compile sees a fixed launch)."""
    if interpret:
        return INTERPRETER_CONFIG.capped(sb)
    major = capability[0]
    if major >= 9:
        cfg = SM90_DEFAULT
        if m <= 64:
            cfg = GemmConfig(64, 128, 128, 8, False, 4, 4)
    else:
        cfg = SM8X_CANDIDATES[0]
        if m <= 64:
            cfg = GemmConfig(64, 64, 64, 8, False, 4, 3)
    if a_float:  # bf16 tiles are twice the bytes: halve K depth to stay inside shared memory
        cfg = GemmConfig(cfg.BM, cfg.BN, min(cfg.BK, 64), cfg.GROUP_M, False, cfg.num_warps, cfg.num_stages)
    return cfg.capped(sb)


SM90_DEFAULT = SM90_CANDIDATES[0]
