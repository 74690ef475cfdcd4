"""LayerSpec: everything that fixes one quantized layer's math (stored per layer in files)."""
from dataclasses import asdict, dataclass

from .config import QuantConfig
from .hadamard import effective_block

SVD_MAX_W_BITS = 4  # layers with more weight bits (overrides such as `=8`) get no SVD branch


@dataclass(frozen=True)
class LayerSpec:
    w_bits: int
    a_bits: int | None  # None: follow the model's BitState (switched per step)
    method: str
    had_block: int  # effective rotation block (1 when rotation is off)
    scale_block: int  # effective auto-scale block
    rotate: bool
    auto_scale: bool
    granularity: str
    svd_rank: int = 0  # rank of the 16-bit SVD branch (0: none; capped at the layer's dimensions)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LayerSpec":
        # fields added later (svd_rank) take their defaults in older files
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def layer_spec(config: QuantConfig, name: str, in_features: int) -> LayerSpec | None:
    """The spec of layer `name`, or None when the config leaves it unquantized."""
    rule = config.rule_for(name)
    if rule is not None and rule.skip:
        return None
    if rule is None and not config.selects(name):
        return None
    rotate = config.uses_rotation
    w_bits = rule.w_bits if rule and rule.w_bits else config.w_bits
    return LayerSpec(
        w_bits=w_bits,
        a_bits=rule.a_bits if rule else None,
        method=config.method,
        had_block=effective_block(config.had_block, in_features) if rotate else 1,
        scale_block=effective_block(config.scale_block, in_features),
        rotate=rotate,
        auto_scale=config.uses_auto_scale,
        granularity=config.granularity,
        svd_rank=config.svd_rank if config.uses_svd and w_bits <= SVD_MAX_W_BITS else 0,
    )
