"""torch.library ops (`torch.ops.graphserve.*`): one module per family, each with schema, fake and reference.

Importing this package registers every family. Platforms add device kernels with
`graphserve.ops._register.get_op(name).impl(dispatch_key, fn)`.
"""
from graphserve.ops import (  # noqa: F401  (registers the ops)
    activation,
    attention,
    fp8,
    gguf,
    layernorm,
    lora,
    moe,
    quant,
    rejection_sampler,
    rotary,
    sampling,
)
