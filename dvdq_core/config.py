"""QuantConfig: what to quantize, how, and per-layer overrides."""
import fnmatch
import json
import re
from dataclasses import asdict, dataclass, field, fields

from .activations import check_act_bits
from .weights import check_w_bits

METHODS = ("dvdq", "minmax", "smoothquant", "quarot")
GRANULARITIES = ("block", "pow2", "pow2-fast", "channel")
BLOCK_SIZES = (16, 32, 64, 128, 256)
BACKENDS = ("auto", "reference", "triton")
MAX_SVD_RANK = 256


def check_svd_rank(rank) -> int:
    """rank, when it is a whole number from 0 to MAX_SVD_RANK (ValueError saying so otherwise)."""
    if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank <= MAX_SVD_RANK:
        raise ValueError(f"svd_rank must be a whole number from 0 to {MAX_SVD_RANK}, got {rank!r}")
    return rank


@dataclass(frozen=True)
class LayerRule:
    """What an override does to the layers its glob matches."""
    skip: bool = False
    w_bits: int | None = None
    a_bits: int | None = None  # fixed activation bits (not switched per step)


def parse_rule(text: str) -> LayerRule:
    """`skip`, `16` (= skip), `8` (W8A8), `w4a8`, `w4a16`."""
    t = text.strip().lower()
    if t in ("skip", "16", "fp", "none"):
        return LayerRule(skip=True)
    if re.fullmatch(r"\d+", t):
        b = int(t)
        return LayerRule(w_bits=check_w_bits(b), a_bits=check_act_bits(b))
    m = re.fullmatch(r"w(\d+)a(\d+)", t)
    if m:
        return LayerRule(w_bits=check_w_bits(int(m[1])), a_bits=check_act_bits(int(m[2])))
    raise ValueError(f"unknown precision {text!r}: use skip, 16, a bit-width 2..8 (weights and activations), "
                     "or wXaY such as w4a8")


def parse_overrides(text) -> dict:
    """Parse `glob=precision` lines (or comma-separated) into {glob: LayerRule}.

    Example: "blocks.0.*=8\nhead.*=16" keeps block 0 at W8A8 and the head unquantized.
    """
    if isinstance(text, dict):
        return {k: v if isinstance(v, LayerRule) else parse_rule(str(v)) for k, v in text.items()}
    out = {}
    for n, line in enumerate(re.split(r"[\n,;]", text or ""), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if "=" not in line:
            raise ValueError(f"layer override {line!r}: expected 'glob=precision', e.g. 'blocks.0.*=8' or 'head.*=skip'")
        glob, rule = (s.strip() for s in line.split("=", 1))
        if not glob:
            raise ValueError(f"layer override {line!r}: the layer glob is empty")
        try:
            out[glob] = parse_rule(rule)
        except ValueError as e:
            raise ValueError(f"layer override {line!r}: {e}") from None
    return out


@dataclass
class QuantConfig:
    method: str = "dvdq"
    w_bits: int = 4
    a_bits: int = 8  # activation bits used when nothing switches them per step
    a_low: int = 4  # delta-GBS pair
    a_high: int = 8
    rotate: bool = True  # ARQ options (method "dvdq"; quarot always rotates, the others never)
    had_block: int = 128
    auto_scale: bool = True
    granularity: str = "pow2"  # at 4-bit steps; 6/8-bit steps use "block" ("pow2-fast": none; scale_granularity)
    scale_block: int = 128
    svd_rank: int = 32  # method "dvdq": rank of each 4-bit weight's 16-bit SVD branch (0: none; docs/method.md)
    include: tuple = ("*blocks.*",)  # globs of Linear layers to quantize
    overrides: dict = field(default_factory=dict)  # glob -> LayerRule (or its text)
    backend: str = "auto"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        check_w_bits(self.w_bits)
        for name in ("a_bits", "a_low", "a_high"):
            check_act_bits(getattr(self, name))
        if self.a_low > self.a_high:
            raise ValueError(f"a_low ({self.a_low}) must not exceed a_high ({self.a_high})")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"scale granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        for name in ("had_block", "scale_block"):
            if getattr(self, name) not in BLOCK_SIZES:
                raise ValueError(f"{name} must be one of {BLOCK_SIZES}, got {getattr(self, name)!r}")
        check_svd_rank(self.svd_rank)
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if isinstance(self.include, str):
            self.include = (self.include,)
        self.include = tuple(self.include)
        self.overrides = parse_overrides(self.overrides)

    # what each method means for the layer math
    @property
    def uses_rotation(self) -> bool:
        return self.method == "quarot" or (self.method == "dvdq" and self.rotate)

    @property
    def uses_auto_scale(self) -> bool:
        return self.method == "dvdq" and self.auto_scale

    @property
    def uses_bgr(self) -> bool:
        return self.method == "dvdq"

    @property
    def uses_svd(self) -> bool:
        return self.method == "dvdq" and self.svd_rank > 0

    def rule_for(self, name: str) -> LayerRule | None:
        """The override for a layer name: the last matching glob wins."""
        rule = None
        for glob, r in self.overrides.items():
            if fnmatch.fnmatchcase(name, glob):
                rule = r
        return rule

    def selects(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, g) for g in self.include)

    def to_json(self) -> str:
        d = asdict(self)
        d["include"] = list(self.include)
        d["overrides"] = {k: asdict(v) for k, v in self.overrides.items()}
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "QuantConfig":
        d = json.loads(text)
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d.setdefault("svd_rank", 0)  # configs written before the SVD branch had none
        d["overrides"] = {k: LayerRule(**v) for k, v in d.get("overrides", {}).items()}
        return cls(**d)
