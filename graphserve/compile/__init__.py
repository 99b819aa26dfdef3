"""torch.compile of the model forward and CUDA/HIP graphs per decode batch bucket.

The model code is written for it: everything torch.compile must not trace is an opaque
`torch.ops.graphserve.*` op, and per-step attention state reaches the layers through the forward context
instead of `forward` arguments, so one graph serves every step.

- `wrapper.CompiledForward`: `torch.compile(model.forward, fullgraph=True)` with a counting backend that calls
  inductor's `compile_fx` with the config patches of `CompilationConfig.inductor_compile_config` (per call;
  nothing is set on inductor's or dynamo's global config). The token dimension is marked unbacked, so one
  graph serves 1..max_num_batched_tokens tokens (a backed size would be specialized at 1 and recompile).
- `cuda_graph.CUDAGraphRunner`: at start-up, one graph per decode bucket (1, 2, 4, 8, 16, 24, ... up to
  max_num_seqs, or `--cuda-graph-sizes`), largest first, one shared memory pool. It only captures and replays:
  the graphs read the model runner's persistent input buffers and the attention backend's metadata buffers
  (`build_for_capture` / `prepare_for_replay`), rewritten in place before each replay; padded rows write
  nowhere (slot -1) and read one token of block 0. Mixed prefill/decode steps run the (compiled) forward
  without graphs. Graphs are only captured when the attention backend can be (`AttentionBackend.graph_blockers`)
  and every op's kernel is graph-safe (`Platform.kernel_choices()`); the torch reference attention is not.
- `counters`: process-wide counts of compiled graphs, captures and replays for tests.

Defaults (`EngineArgs.create_compilation_config`): on CUDA/ROCm compile + graphs; on the CPU eager (inductor's
C++ backend costs ~20 s on a first start, ~3 s with a warm cache), `--compile` / `LLM(compile=True)` opts in.
`--enforce-eager` turns both off; `--no-compile` keeps graphs of the eager forward.

Compile cache: inductor's FX-graph and AOTAutograd caches persist in `GRAPHSERVE_COMPILE_CACHE_DIR` (default
`~/.cache/graphserve/torch_compile`; a user's TORCHINDUCTOR_CACHE_DIR wins). Inductor has no per-call option
for its cache directory: it reads TORCHINDUCTOR_CACHE_DIR when it resolves the directory and hands the
environment to its compile workers. So `create_forward_fn` exports it (through `envs`) on the engine's
start-up path, before the first compile, and never at import.

Dynamo keeps its compiled graphs on the code object of the function it compiles. `CompiledForward` compiles each
model's `forward` over a private copy of that code object, so engines in one process never count as recompiles
of each other (without it, the eighth compiled engine of a process hit dynamo's `recompile_limit`).
"""
