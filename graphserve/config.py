"""One typed tree of frozen dataclasses; each component receives only its slice.

This module imports no torch so that `core/` can depend on it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from graphserve.spec_decode.config import SpeculativeConfig

_DTYPES = ("auto", "float32", "float16", "bfloat16")
_DTYPE_ALIASES = {"float": "float32", "half": "float16", "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def normalize_dtype(dtype: str) -> str:
    """Map user spellings ('half', 'float', ...) to one of auto/float32/float16/bfloat16."""
    if not isinstance(dtype, str):
        dtype = str(dtype).removeprefix("torch.")
    name = _DTYPE_ALIASES.get(dtype, dtype)
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES + tuple(_DTYPE_ALIASES)}, got {dtype!r}")
    return name


@dataclass(frozen=True)
class ModelConfig:
    """What the model is: resolved from the checkpoint's config.json (or GGUF metadata)."""

    model: str  # local directory (or the default model's cache directory)
    architecture: str  # e.g. "LlamaForCausalLM"
    hf_config: Any  # a transformers PretrainedConfig
    dtype: str  # resolved: float32 | float16 | bfloat16 (never "auto")
    max_model_len: int
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    tokenizer: str  # directory holding the tokenizer files
    gguf_file: str | None = None  # file name inside `model` when loading GGUF
    load_format: str = "auto"  # auto | safetensors | gguf | dummy
    eos_token_ids: tuple[int, ...] = ()  # config + generation_config EOS ids
    bos_token_id: int | None = None
    sliding_window: int | None = None
    seed: int = 0
    quantization: str | None = None  # awq | gptq | squeezellm (graphserve/quantization), None = unquantized
    quantization_config: dict[str, Any] | None = None  # the checkpoint's config of that method, validated


KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache geometry and memory budget."""

    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes for the KV pool; None = fraction of free memory
    gpu_memory_utilization: float = 0.9
    num_blocks: int | None = None  # resolved by the worker after sizing
    enable_prefix_caching: bool = True  # share full KV blocks between requests by content hash
    cache_dtype: str = "auto"  # auto (the model dtype) | fp8 (= fp8_e4m3) | fp8_e4m3 | fp8_e5m2

    def __post_init__(self) -> None:
        if self.cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.cache_dtype!r}")
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be a power of two in [1, 128], got {self.block_size}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be positive, got {self.kv_cache_memory}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous-batching limits: one token budget per step shared by prefills and decodes."""

    max_model_len: int
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    # Schedule and launch step N+1 before step N's sampled tokens reach the host, so the CPU work of one step
    # overlaps the device work of the other (a request that stops at step N computes one discarded token).
    async_scheduling: bool = False

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                "max_num_batched_tokens must be >= max_model_len when chunked prefill is disabled "
                f"({self.max_num_batched_tokens} < {self.max_model_len})"
            )


@dataclass(frozen=True)
class DeviceConfig:
    """Where the model runs and with which attention backend (both resolved by EngineArgs)."""

    device: str = "auto"  # as the user gave it: auto | cpu | cuda
    platform: str = "cpu"  # resolved once through the platform layer: cpu | cuda | rocm
    attention_backend: str | None = None  # a registered backend name; None = the platform's default


def default_cudagraph_capture_sizes(max_num_seqs: int) -> tuple[int, ...]:
    """1, 2, 4, then every multiple of 8, up to max_num_seqs (itself included, so every decode batch has a bucket)."""
    sizes = [s for s in (1, 2, 4) if s <= max_num_seqs] + list(range(8, max_num_seqs + 1, 8))
    if sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return tuple(sizes)


class CompilationLevel:
    """How the model forward runs (vLLM's `compilation_config.level` numbering, first two levels)."""

    NO_COMPILATION = 0  # eager PyTorch
    INDUCTOR = 1  # torch.compile(fullgraph=True) with inductor; custom ops opaque, only the token dim dynamic


@dataclass(frozen=True)
class CompilationConfig:
    """torch.compile and CUDA/HIP graph settings, resolved per platform by EngineArgs (graphserve/compile/)."""

    level: int = CompilationLevel.NO_COMPILATION
    use_cudagraph: bool = False  # replay decode batches from graphs captured at start-up
    cudagraph_capture_sizes: tuple[int, ...] = ()  # decode batch buckets, ascending; a batch pads up to one
    # Inductor config patches, passed to each compile call (never set on the global inductor config).
    inductor_compile_config: dict[str, Any] = field(default_factory=dict)
    cache_dir: str | None = None  # persistent inductor cache; None leaves torch's own default

    def __post_init__(self) -> None:
        if self.level not in (CompilationLevel.NO_COMPILATION, CompilationLevel.INDUCTOR):
            raise ValueError(f"compilation level must be 0 (eager) or 1 (inductor), got {self.level}")
        sizes = self.cudagraph_capture_sizes
        if any(not isinstance(s, int) or s < 1 for s in sizes) or list(sizes) != sorted(set(sizes)):
            raise ValueError(f"cuda_graph_sizes must be distinct positive integers in ascending order, got {sizes}")
        if self.use_cudagraph and not sizes:
            raise ValueError("CUDA graphs need at least one capture size")

    @property
    def max_capture_size(self) -> int:
        """The largest decode batch replayed from a graph (0 without graphs)."""
        return self.cudagraph_capture_sizes[-1] if self.use_cudagraph else 0


# Ranks the stacked adapter buffers may be sized for (vLLM's choices).
SUPPORTED_LORA_RANKS = (8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class LoRAConfig:
    """Multi-LoRA serving (`--enable-lora`): adapter slots on the device and adapters kept on the host."""

    max_loras: int = 1  # adapters one step may use = device slots of the stacked LoRA weights
    max_lora_rank: int = 16  # the slots' rank; an adapter of a larger rank is refused
    max_cpu_loras: int | None = None  # adapters kept loaded on the host (LRU); None = max_loras

    def __post_init__(self) -> None:
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {self.max_loras}")
        if self.max_lora_rank not in SUPPORTED_LORA_RANKS:
            raise ValueError(f"max_lora_rank must be one of {SUPPORTED_LORA_RANKS}, got {self.max_lora_rank}")
        if self.max_cpu_loras is None:
            object.__setattr__(self, "max_cpu_loras", self.max_loras)
        elif self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")


@dataclass(frozen=True)
class EngineConfig:
    """The whole tree, built once by `EngineArgs.create_engine_config()`."""

    model_config: ModelConfig
    cache_config: CacheConfig
    scheduler_config: SchedulerConfig
    device_config: DeviceConfig = field(default_factory=DeviceConfig)
    compilation_config: CompilationConfig = field(default_factory=CompilationConfig)
    lora_config: LoRAConfig | None = None  # None: LoRA adapters are refused
    speculative_config: SpeculativeConfig | None = None  # None: one token per request per step
