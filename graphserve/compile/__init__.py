"""torch.compile wrapping of the model forward and CUDA/HIP graph capture per batch bucket.

The model code is written for it already: everything torch.compile must not trace is an opaque
`torch.ops.graphserve.*` op, and per-step attention state reaches the layers through the forward context
instead of `forward` arguments. The compile wrapper and the graph runner are built with the GPU platform.
"""
