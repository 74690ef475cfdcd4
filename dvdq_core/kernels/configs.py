"""Launch configurations per GPU generation (pure Python, no triton import).

GEMM tiles: BM (tokens) x BN (weight rows) x BK, GROUP_M (L2 swizzle), SWAP (weights on the MMA's
register side, transposed tile), num_warps, num_stages, ASM (inline-PTX unpack, four bytes per
instruction) and SPLIT (a program covers SPLIT sub-tiles of BM tokens that share one unpacked
weight tile).
BK is NOT chosen here: ops.w4_gemm always replaces it by the activation layout group
(ops.layout_group: 128 where the width and the scale block allow it, else 64), so each K tile lies
inside one scale block of l; the BK values below only keep the DVDQ_GEMM_CONFIG format.

Hopper (sm_90) values come from bench/kernels.py --variants / --sweep on an H100 (see
docs/kernel-notes.md). The Ampere/Ada values (sm_80/86/89) were compiled for those targets
here (registers, no spills, shared memory under their ~100 KB) and run (results and a tile sweep) on a
Hopper card compiled as sm_80 code; they were NOT run on such a card.
DVDQ_GEMM_CONFIG="BM,BN,BK,GROUP_M,SWAP,warps,stages[,ASM,SPLIT]" overrides the choice (tuning).
"""
import os
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
    ASM: bool = False
    SPLIT: int = 1

    def flags(self) -> dict:
        return {"ASM_UNPACK": self.ASM, "SPLIT": self.SPLIT}

    def to_env(self) -> str:
        return ",".join(str(int(v)) for v in (self.BM, self.BN, self.BK, self.GROUP_M, self.SWAP, self.num_warps,
                                               self.num_stages, self.ASM, self.SPLIT))

    @classmethod
    def parse(cls, text: str) -> "GemmConfig":
        v = [int(t) for t in text.split(",")]
        if len(v) not in (7, 9):
            raise ValueError(f"DVDQ_GEMM_CONFIG needs 7 or 9 comma-separated integers, got {text!r}")
        extra = (bool(v[7]), v[8]) if len(v) == 9 else ()
        if extra and extra[1] not in (1, 2):
            raise ValueError(f"DVDQ_GEMM_CONFIG: SPLIT must be 1 or 2, got {extra[1]}")
        return cls(v[0], v[1], v[2], v[3], bool(v[4]), v[5], v[6], *extra)


def _fast(bm, bn, bk, warps, stages, split=1, group=8):
    return GemmConfig(bm, bn, bk, group, True, warps, stages, True, split)


# Swept by bench/kernels.py --sweep (the first entry is the default). Weights on the MMA's register
# side (SWAP); BN weight rows x BM tokens (x SPLIT).
SM90_CANDIDATES = (
    _fast(128, 128, 128, 8, 4, split=2),
    _fast(128, 128, 128, 8, 3, split=2),
    _fast(128, 64, 128, 4, 4),
    _fast(128, 128, 128, 8, 4),
    _fast(128, 128, 128, 8, 3),
    _fast(64, 128, 128, 4, 4),
)
SM90_DEFAULT = SM90_CANDIDATES[0]
# Ampere/Ada: never timed on such a card. The default is the fastest of these on a Hopper card running
# the sm_80 code (TRITON_OVERRIDE_ARCH=sm80, tests/README.md): 1.19-1.23x the 128 x 128 tile at the
# Wan 14B shapes (bench/RESULTS.md). Why it should carry over: at 240-250 registers per thread a
# 4-warp program leaves room for a second one on any 64K-register SM (sm_80/86/89/90 alike), so one
# program's mma.sync waits overlap the other's; the 8-warp 128 x 128 tile runs one program per SM.
SM8X_CANDIDATES = (
    GemmConfig(64, 128, 128, 8, False, 4, 3, True),
    GemmConfig(128, 64, 128, 8, False, 4, 3, True),
    GemmConfig(128, 128, 64, 8, False, 8, 3, True),
)
INTERPRETER_CONFIG = GemmConfig(16, 32, 64, 4, False, 4, 1)


def wgmma(capability) -> bool:
    """Whether the card has Hopper's warpgroup MMA, which the sm_90 tiles and the Gluon GEMMs are built
    for: sm_90 only. Blackwell (sm_100, and the RTX 50xx's sm_120) has none; Triton 3.6 lowers our
    int8 and 16-bit dots there to mma.sync as on Ampere (bench/compile_targets.py checks), with
    Ampere's ~100 KB of shared memory per block on sm_120, so they take the SM8X tiles (the sm_90 tile
    needs 120 KB and spills)."""
    return tuple(capability) == (9, 0)


def gemm_candidates(capability):
    """The tiles bench/kernels.py --sweep times for this architecture (the first one is the default)."""
    return SM90_CANDIDATES if wgmma(capability) else SM8X_CANDIDATES
# sm_90 GEMM without per-K-block scales (_gluon._w4_gemm_chain_kernel): BM tokens x BN weight rows,
# warps, stages, GROUP_M (the Gluon study "chain-g16", docs/kernel-notes.md: 3 stages keep two programs per SM,
# GROUP_M 16 was 2-5% faster than 8). Used for M > CHAIN_MIN_M; DVDQ_GEMM_IMPL=triton turns it off.
CHAIN_SM90 = {"BM": 128, "BN": 128, "num_warps": 8, "stages": 3, "group_m": 16}
CHAIN_MIN_M = 64
# From U8_MIN_M tokens on, the weights are unpacked into an int8 workspace first and
# _gluon._w4_gemm_u8_kernel runs (the workspace study on an H100, docs/kernel-notes.md: 128 tokens x 256 weight rows,
# 8 warps, 4 stages was the best of 6 tiles at the Wan 14B shapes, 1.2-1.3x the chain kernel).
# --crossover: at 8192 tokens and more unpack + u8 won at the Wan 14B and HunyuanVideo layers timed on the GPU
# (1.16-1.24x; not at Wan 1.3B's 1536 x 1536 qkvo);
# at 4096 it won for Wan 14B's layers but lost for HunyuanVideo's 3072 x 3072 (one more launch).
# The Triton GEMM with per-K-block promotion (8-bit steps) reads the same workspace (W8) there too:
# 4-6% faster with its default tile at the Wan 14B shapes (the workspace study).
U8_SM90 = {"BM": 128, "BN": 256, "num_warps": 8, "stages": 4, "group_m": 16}
U8_MIN_M = 8192


def target_capability(device_capability, env=None):
    """The architecture the kernels are compiled for, as (major, minor): the device's, unless
    TRITON_OVERRIDE_ARCH=smXY (Triton's own setting) asks Triton to compile for another one. Then the
    launch configurations must follow it too: with sm80/sm86/sm89 a Hopper card runs the Ampere/Ada
    code path (mma.sync, cp.async pipelining, the SM8X tiles; Triton assembles it for the card), which
    is how that path is tested here without such a card (tests/README.md)."""
    arch = (os.environ if env is None else env).get("TRITON_OVERRIDE_ARCH", "")
    if not arch:
        return tuple(device_capability)
    digits = arch[2:] if arch.startswith("sm") else ""
    if not digits.isdigit() or len(digits) < 2:
        raise ValueError(f"TRITON_OVERRIDE_ARCH must look like sm80 or sm90, got {arch!r}")
    return int(digits[:-1]), int(digits[-1])


def use_workspace(capability, m: int, a_float: bool, interpret: bool) -> bool:
    """Whether a GEMM of m tokens unpacks the weights into the int8 workspace first (sm_90 only: the
    only card it was measured on)."""
    return wgmma(capability) and not a_float and not interpret and m >= U8_MIN_M

# Activation kernels: a program walks BM rows across K in tiles of C = max(Hadamard block, 64)
# columns, BM = ACT_ELEMS_PER_TILE // C (bench/kernels.py --act-sweep on an H100: best of 2048..16384
# elements, 4/8 warps, 2/3 stages at K = 1536..13824 for the one-multiply quantizer; Ampere/Ada use
# the same, compiled for them only).
ACT_ELEMS_PER_TILE = 8192
ACT_NUM_WARPS = 4
ACT_NUM_STAGES = 3
# Pass 2 of granularity "pow2" (_quantize_pow2_kernel, reads its rows twice) uses the same tile:
# smaller ones (to keep the second read in L2) were slower (bench/kernels.py --act-sweep-pow2).
# Pass 1 of "pow2" (per-channel maxima only, no stores but K atomics) is 2-6% faster with half the
# rows per program at every width (same sweep, fifth kernel session); 5 stages were slower everywhere.
ACT_POW2_PASS1_ELEMS = 4096
# Pass 2 of "pow2" as a persistent grid, this many programs per SM striding over the row blocks (the
# same tile; the rotation matrix loaded once per program): 6-7% faster at K = 1536..13824 than one
# program per block (the persistent-activation probe on an H100, docs/kernel-notes.md; bit-identical codes). Fewer rows per
# block so that a block's second read stays in L2 was 1.5-3x slower (too little in flight).
ACT_POW2_PASS2_PER_SM = 2
# With a LoRA branch's down-projection (ops.LORA_IMPL "fused"), the pass that quantizes X (pow2's pass 2,
# the block form's pass 2, the 16-bit rotation) also multiplies each unrotated tile with the branch's
# [rank, C] slice of A, read from L2 per block of rows: (elements per tile, warps, stages, pow2 pass 2's
# programs per SM), by architecture (act_lora). Off Hopper 8 warps and 2 stages: the extra dot and A tile
# spilled registers on sm_80/120 with 4 warps (bench/compile_targets.py); not timed on such cards.
# sm_90: bench/kernels.py --lora times ACT_LORA_CANDIDATES (H100, Wan 14B, rank 64, call 27: pow2 pass 2 with T
# 0.61 ms with this launch, 1.18 ms with the 8-warp one, 0.48 ms at best with (4096, 4, 3, 2), 0.35 ms without T;
# the GPU tests ran with this one; at the widest padded rank it spills 13 stores outside the K loop,
# bench/compile_targets.py). Even the best gains as much time as cuBLAS's x @ A^T takes, so LORA_IMPL
# "epilogue" stays the default (bench/RESULTS.md).
ACT_LORA_CANDIDATES = ((8192, 8, 2, 1), (8192, 4, 3, 2), (8192, 4, 3, 1), (8192, 4, 4, 2), (8192, 4, 2, 2),
                       (16384, 4, 3, 2), (4096, 4, 3, 2), (4096, 4, 4, 4))
ACT_LORA = (8192, 8, 2, 1)
ACT_LORA_SM90 = (8192, 4, 3, 2)


def act_lora(capability) -> tuple:
    """The activation pass's launch with a branch's down-projection for this architecture (see above)."""
    return ACT_LORA_SM90 if tuple(capability) == (9, 0) else ACT_LORA


# The Wan block's elementwise kernels (_norm_rope_kernel, _modulated_norm_kernel,
# _gated_residual_kernel): one token's whole row per program. bench/wan_ops.py on an H100: 2.3-2.8
# TB/s at C = 5120 with 4 warps; 8 no faster (but for the rotation without norm, by 1%), 16 slower.
WAN_OPS_NUM_WARPS = 4


def gemm_config(capability, m: int, n: int, k: int, sb: int, a_float: bool, interpret: bool) -> GemmConfig:
    """Pick the GEMM tile for a problem. Deterministic and shape-only (no autotuning at run time,
    so the first call of a shape costs only the compile and torch.compile sees a fixed launch)."""
    if interpret:
        return INTERPRETER_CONFIG
    env = os.environ.get("DVDQ_GEMM_CONFIG")
    if env and not a_float:
        return GemmConfig.parse(env)
    if wgmma(capability):
        cfg = SM90_DEFAULT
        if m <= 64:
            cfg = _fast(64, 64, 128, 4, 4)
        if a_float:  # 16-bit activations: weights converted to bf16/fp16 in registers
            cfg = GemmConfig(128, 128, 64, 8, False, 8, 4)
    else:
        cfg = SM8X_CANDIDATES[0]
        if m <= 64:
            cfg = GemmConfig(64, 64, 64, 8, False, 4, 3, True)
        if a_float:
            cfg = GemmConfig(64, 128, 64, 8, False, 4, 3)
    return cfg


# 8-bit attention (_attention.py): BM query rows x BN keys per step (BN is also the key block that shares
# one INT8 scale), warps, stages, and the kernel's options (docs/attention.md). bench/attention.py --sweep times
# the tile candidates (the first one per form is the default), --variants the sm_90 FP8 options. Compiled for each
# target (bench/compile_targets.py): the sm_90 candidates have no spills (248-253 registers); on sm_80/89/120 a 64 x 64 tile
# with 4 warps spilled in the loop and 128 x 64 with 8 warps and 2 stages did not (52 spill stores outside
# it), 128 x 32 none at all. 128 x 128 with 16-bit P.V spilled in the loop on sm_90.
@dataclass(frozen=True)
class AttentionConfig:
    BM: int
    BN: int
    num_warps: int
    num_stages: int
    magic: int = 0  # INT8 scores -> float32: 0 conversion, 1 and 2 through the accumulator's start (_attention._scores;
    # the Gluon kernel: 0 or 1)
    acc_r: int = 1  # FP8 P.V: 1 a fresh MMA accumulator per key block (added outside the MMA), 0 accumulate in the MMA
    tma: bool = False  # FP8 form: K and V tiles by TMA (tensor descriptors) instead of cp.async
    ws: bool = False  # Triton's warp specialization of the key loop
    gluon: bool = False  # FP8 form on sm_90: the Gluon kernel (_gluon_attention.py; BM 128 = two 64-row warpgroups)
    pingpong: bool = False  # the Gluon kernel's warpgroups take turns issuing their MMAs (FlashAttention-3's order)

    @classmethod
    def parse(cls, text: str) -> "AttentionConfig":
        """"BM,BN,warps,stages" and optional "magic=M", "acc=R", "tma=0|1", "ws=0|1", "gluon=0|1", "pp=0|1" fields."""
        fields = [t.strip() for t in text.split(",") if t.strip()]
        try:
            v = [int(t) for t in fields[:4]]
            extra = dict(t.split("=", 1) for t in fields[4:])
            named = {"magic": int(extra.pop("magic", 0)), "acc_r": int(extra.pop("acc", 1)),
                     "tma": _flag(extra.pop("tma", "0")), "ws": _flag(extra.pop("ws", "0")),
                     "gluon": _flag(extra.pop("gluon", "0")), "pingpong": _flag(extra.pop("pp", "0"))}
        except ValueError:
            v, extra = [], {}
        if len(v) != 4 or extra or named["magic"] not in (0, 1, 2) or named["acc_r"] not in (0, 1):
            raise ValueError("DVDQ_ATTN_CONFIG needs BM,BN,warps,stages and optionally magic=M,acc=R,tma=0|1,"
                             f"ws=0|1,gluon=0|1,pp=0|1, got {text!r}")
        if named["gluon"] and (named["magic"] > 1 or named["acc_r"] != 1 or named["tma"] or named["ws"]
                               or v[:3] != [128, 128, 4] or v[3] < 2):
            raise ValueError("DVDQ_ATTN_CONFIG: the Gluon kernel (gluon=1) runs the tile 128,128,4,S with S >= 2 "
                             f"stages and takes magic=0|1 and pp=0|1 only, got {text!r}")
        if named["pingpong"] and not named["gluon"]:
            raise ValueError(f"DVDQ_ATTN_CONFIG: pp=1 is an option of the Gluon kernel (gluon=1), got {text!r}")
        return cls(*v, **named)

    def to_env(self) -> str:
        return (f"{self.BM},{self.BN},{self.num_warps},{self.num_stages},magic={self.magic},acc={self.acc_r},"
                f"tma={int(self.tma)},ws={int(self.ws)},gluon={int(self.gluon)},pp={int(self.pingpong)}")


def _flag(text: str) -> bool:
    if text not in ("0", "1"):
        raise ValueError(text)
    return text == "1"


_A = AttentionConfig.parse
# sm_90, FP8 P.V: 64 query rows x 128 keys, 4 warps, 3 stages timed fastest of the 14 variants on an H100 (1.26x
# SDPA at Wan 14B 480p, 1.33x at 1.3B; 128 x 128 with 8 warps 1.12x / 1.11x): two programs per SM are not held
# in lockstep, so one's softmax overlaps the other's MMAs (bench/RESULTS.md, docs/attention.md).
ATTN_SM90_FP8 = (_A("64,128,4,3"), _A("128,128,8,4"), _A("128,128,8,3"))
# What bench/attention.py --variants times on sm_90 (FP8 P.V): the default, then the kernel's options and tiles
# (docs/attention.md says what each changes in the compiled loop)
ATTN_SM90_FP8_VARIANTS = tuple(_A(t) for t in (
    "64,128,4,3", "128,128,8,4", "128,128,8,4,magic=1", "128,128,8,4,magic=2", "128,128,8,4,acc=0", "128,128,8,4,magic=2,acc=0",
    "128,128,8,3,magic=2,acc=0", "128,128,8,3,tma=1", "128,128,8,3,tma=1,magic=2,acc=0", "128,128,8,4,ws=1",
    "64,128,4,2,magic=2,acc=0", "64,128,4,3,magic=2,acc=0", "64,64,4,3,magic=2", "128,64,8,4,magic=2,acc=0",
    "64,128,4,3,magic=1", "128,128,4,3,gluon=1", "128,128,4,3,magic=1,gluon=1", "128,128,4,2,magic=1,gluon=1",
    "128,128,4,4,magic=1,gluon=1", "128,128,4,3,magic=1,gluon=1,pp=1"))
ATTN_SM90_16 = (AttentionConfig(128, 64, 8, 3), AttentionConfig(128, 64, 8, 4))
ATTN_SM8X = (AttentionConfig(128, 64, 8, 2), AttentionConfig(128, 32, 8, 2), AttentionConfig(128, 64, 8, 3))
ATTN_INTERPRETER = AttentionConfig(32, 16, 4, 1)


def attention_candidates(capability, fp8: bool):
    if wgmma(capability):
        return ATTN_SM90_FP8 if fp8 else ATTN_SM90_16
    return ATTN_SM8X


def attention_config(capability, fp8: bool, interpret: bool = False, env=None) -> AttentionConfig:
    """The tile for this card and P.V form; DVDQ_ATTN_CONFIG=BM,BN,warps,stages overrides it (tuning)."""
    text = (os.environ if env is None else env).get("DVDQ_ATTN_CONFIG", "")
    if text:
        return AttentionConfig.parse(text)
    if interpret:
        return ATTN_INTERPRETER
    return attention_candidates(capability, fp8)[0]
