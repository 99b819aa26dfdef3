"""The engine around the core: input processing (templates, tokenization, validation, n/best_of fan-out),
the engine core step loop, and output processing (incremental detokenization, stop strings, RequestOutputs)."""
