"""Dataclass configs: the quant choice shared across packages, and a training run's sections.

Each package keeps its own small dataclasses next to the code that reads them (PolicyConfig in
rl.policy, GRPOConfig in rl.grpo, ...); `TrainConfig` composes them into one run, loaded from
a flat YAML file in configs/ with `key=value` overrides (`load_config`), using omegaconf for
the merge and type checks. Configs validate themselves in `__post_init__`, so a bad value
fails where it is written, not deep inside a run.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from qerl_rollout.evaluation import EvalConfig
from qerl_rollout.quant import DEFAULT_SCHEME
from qerl_rollout.quant.plan import Precision
from qerl_rollout.rl.aqn import AQNConfig
from qerl_rollout.rl.grpo import GRPOConfig
from qerl_rollout.rl.mismatch import MismatchConfig
from qerl_rollout.rl.policy import ROUTING_REPLAY, PolicyConfig
from qerl_rollout.rollout.types import QUANT_MODES, QUANT_SCHEMES, QuantConfig  # noqa: F401 (re-exported)
from qerl_rollout.sync.verify import VERIFY_MAX_TOL, VERIFY_TOL
from qerl_rollout.tracking import TrackingConfig

# --------------------------------------------------------------------------------------------
# The training run: one dataclass per YAML section (configs/*.yaml), loaded by `load_config`.
# --------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """The policy checkpoint. Empty `path`: build the tiny `tiny_family` model in the run dir."""

    path: str = ""
    tiny_family: str = "qwen3_moe"
    tiny_size: str = "tiny"        # a shape of qerl_rollout.tiny.SIZES (larger ones: qwen3_moe only)
    shape: str = ""                # configs/shapes/<shape>.json: what `plan` reads without model.path

    def __post_init__(self):
        from qerl_rollout.tiny import SIZES

        if not self.path and not self.tiny_family:
            raise ValueError("set model.path (a checkpoint directory) or model.tiny_family")
        if self.tiny_size not in SIZES:
            raise ValueError(f"model.tiny_size must be one of {sorted(SIZES)}, got {self.tiny_size!r}")
        if self.tiny_size != "tiny" and self.tiny_family != "qwen3_moe":
            raise ValueError(f"model.tiny_size={self.tiny_size} is a qwen3_moe shape; "
                             f"model.tiny_family is {self.tiny_family!r}")


TRANSPORTS = ("auto", "object_store", "collective")


@dataclass
class RolloutConfig:
    """The rollout engine and how it samples."""

    scheme: str = DEFAULT_SCHEME
    mode: str = "auto"
    group_size: int = 8            # samples per prompt (the GRPO group)
    prompts_per_step: int = 8
    max_tokens: int = 8
    temperature: float = 1.0
    max_model_len: int = 1024
    kv_cache_gib: int = 1          # vLLM-CPU KV cache in GiB (VLLM_CPU_KVCACHE_SPACE, an integer)
    gpu_memory_utilization: float = 0.5
    bucket_mb: int = 256           # weight-sync bucket size
    num_engines: int = 1           # data-parallel engines; a step's prompts are split across them
    tensor_parallel_size: int = 1  # vLLM tensor parallelism inside each engine (GPUs per engine)
    # Every N steps a BF16 engine, pushed the same policy, generates the same prompts with the
    # same seed: rollout/speedup_vs_bf16 and quant/kl_vs_bf16 (qerl_rollout.rollout.baseline).
    # 0: off (a second engine must fit beside the first).
    baseline_every: int = 0
    # "r3": the engines return the experts each token was routed to and every trainer forward
    # of the step replays them (rollout routing replay, `rl.routing`). MoE models only.
    routing_replay: str = "none"
    # Which quantizable layers get `scheme` (`quant.plan.Precision`); the rest stays BF16:
    # experts (routed + shared), experts_attention (and attention), all_linear (and dense MLPs).
    quant_targets: str = "all_linear"
    bf16_layers: int = 0           # the first and last N decoder layers stay BF16 whole
    # Module kind -> its own scheme instead of `scheme`, e.g. {experts: nvfp4, attention: fp8_block};
    # kinds: experts, attention, dense_mlp (routers, lm_head, embeddings, norms: never quantized).
    quant_overrides: dict[str, str] = field(default_factory=dict)
    # RMSNorm kernel of CPU engines: "torch" (vLLM-CPU's default) or "cpp" (its C++ kernels:
    # 17-23% faster rollouts, numbers a little further from the trainer's; `rollout.cpu_norms`).
    cpu_rmsnorm: str = "torch"
    # How pushed weights reach engine actors on Ray: "object_store" (Ray's shared memory),
    # "collective" (a gloo group from trainer rank 0 straight into each engine,
    # `workers.collective`), "auto" (the object store where every engine is on rank 0's node,
    # else collective: `placement.ray.resolve_transport`). The local placement's engines share
    # the trainer's process and take tensors directly, whatever this says.
    transport: str = "auto"

    @property
    def precision(self) -> Precision:
        return Precision(self.quant_targets, self.bf16_layers, tuple(dict(self.quant_overrides).items()))

    def __post_init__(self):
        QuantConfig(self.scheme, self.mode)   # validates both
        try:
            precision = self.precision
        except ValueError as e:
            raise ValueError(f"rollout.quant_targets / bf16_layers / quant_overrides: {e}") from None
        if precision != Precision() and self.scheme == "bf16":
            raise ValueError("rollout.quant_targets / bf16_layers / quant_overrides choose what rollout.scheme "
                             "quantizes; the bf16 scheme quantizes nothing")
        if self.cpu_rmsnorm not in ("torch", "cpp"):
            raise ValueError(f"rollout.cpu_rmsnorm must be 'torch' or 'cpp', got {self.cpu_rmsnorm!r}")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"rollout.transport must be one of {TRANSPORTS}, got {self.transport!r}")
        if self.routing_replay not in ROUTING_REPLAY:
            raise ValueError(f"rollout.routing_replay must be one of {ROUTING_REPLAY}, got {self.routing_replay!r}")
        if self.temperature <= 0:
            raise ValueError(f"rollout.temperature must be > 0, got {self.temperature} "
                             "(the trainer divides its logits by it)")
        if self.group_size < 2:
            raise ValueError("rollout.group_size must be >= 2: GRPO compares samples within a group")
        if self.baseline_every < 0:
            raise ValueError(f"rollout.baseline_every must be >= 0 (0: off), got {self.baseline_every}")
        if self.num_engines < 1 or self.tensor_parallel_size < 1:
            raise ValueError(f"rollout.num_engines and rollout.tensor_parallel_size must be >= 1, got "
                             f"{self.num_engines} and {self.tensor_parallel_size}")


@dataclass
class TaskConfig:
    """Where prompts and rewards come from: a synthetic task, or a dataset file + reward."""

    synthetic: str = "digits"      # a task of qerl_rollout.rewards.synthetic; "" to use `path`
    path: str = ""                 # jsonl / parquet prompts (see qerl_rollout.data.prompts)
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    reward: str = ""               # registry name or module:function; default: the task's own
    reward_errors: str = "zero"    # a reward fn that raises: "zero" (reward 0, counted) or "raise"
    max_prompt_tokens: int = 512

    def __post_init__(self):
        if not self.synthetic and not self.path:
            raise ValueError("set task.path (a jsonl/parquet of prompts) or task.synthetic")
        if self.reward_errors not in ("zero", "raise"):
            raise ValueError(f"task.reward_errors must be 'zero' or 'raise', got {self.reward_errors!r}")


@dataclass
class SyncConfig:
    """How pushes travel, and the push check (`qerl_rollout.sync.verify`): does each engine
    serve what was pushed?

    delta:         after the first push, send each tensor the engines hold as the 64-byte
                   blocks of its bytes that changed (`wire.delta`); the engines keep a host copy
                   of the pushed weights to apply them to, the trainer 1/8 of that in
                   fingerprints.

    verify_every:  check the first push and every N-th step's; 0: off.
    verify_tol:    bound on the mean |dlogp| over the probe's tokens, the engines' against the
                   trainer's QDQ forward (in sync <= 0.013, one layer wrong >= 0.038);
    verify_max_tol: and on the max (a flipped router 0.134, stale >= 0.37); measured figures
                   in `sync.verify`.
    verify_logits: the logits half, which copies the whole policy in the trainer process
                   (small models, one trainer rank); false: the exact hash half only.
    """

    delta: bool = False
    verify_every: int = 50
    verify_tol: float = VERIFY_TOL
    verify_max_tol: float = VERIFY_MAX_TOL
    verify_logits: bool = True

    def __post_init__(self):
        if self.verify_every < 0 or self.verify_tol <= 0 or self.verify_max_tol <= 0:
            raise ValueError(f"sync.verify_every must be >= 0 (0: off), sync.verify_tol and sync.verify_max_tol "
                             f"> 0, got {self.verify_every}, {self.verify_tol} and {self.verify_max_tol}")


@dataclass
class TrainerConfig:
    """The trainer's processes: `num_workers` FSDP2 ranks in Ray actors (placement split/colocated)."""

    num_workers: int = 1

    def __post_init__(self):
        if self.num_workers < 1:
            raise ValueError(f"trainer.num_workers must be >= 1, got {self.num_workers}")


PLACEMENT_MODES = ("local", "split", "colocated")


@dataclass
class PlacementConfig:
    """Where trainer and engines run (the layouts: `qerl_rollout.layout`).

    local:     trainer and one engine in this process (one device).
    split:     trainer workers and engines in Ray actors on disjoint GPUs (or CPUs).
    colocated: trainer worker i and engine i share GPU i; the engine sleeps while the trainer
               steps and the trainer's state leaves the GPU while the engine generates.
    """

    mode: str = "local"
    ray_address: str = ""          # "" starts a local Ray; "auto" joins the running cluster
    use_gpus: str = "auto"         # auto: when the Ray cluster has GPUs; "true" / "false"
    trainer_num_cpus: float = 1.0  # per trainer worker
    rollout_num_cpus: float = 1.0  # per engine
    gpu_gib: float = 80.0          # memory of each GPU the plan checks a GPU run against

    def __post_init__(self):
        if self.mode == "ray":
            raise ValueError("placement.mode=ray is now placement.mode=split (trainer and engines in "
                             "Ray actors) or colocated (sharing GPUs)")
        if self.mode not in PLACEMENT_MODES:
            raise ValueError(f"placement.mode must be one of {PLACEMENT_MODES}, got {self.mode!r}")
        if self.use_gpus not in ("auto", "true", "false"):
            raise ValueError(f"placement.use_gpus must be auto, true or false, got {self.use_gpus!r}")
        if self.gpu_gib <= 0:
            raise ValueError(f"placement.gpu_gib must be positive, got {self.gpu_gib}")


@dataclass
class RunConfig:
    steps: int = 40
    seed: int = 0
    output_dir: str = "runs"
    save_every: int = 0            # checkpoint (qerl_rollout.checkpoint) every N steps; always at the end
    keep_checkpoints: int = 2      # the newest K checkpoints are kept
    resume: bool = False           # continue tracking.run_name's run from its newest checkpoint
    # Every N steps (MoE models), the engines return the experts they routed each sampled token
    # to, and the trainer's training forward compares its own: router/topk_agreement,
    # router/flip_rate and experts/rollout/* (`rl.routing`). 0: off. Every step under r3.
    router_stats_every: int = 1

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"run.steps must be >= 1, got {self.steps}")
        if self.save_every < 0 or self.keep_checkpoints < 1:
            raise ValueError(f"run.save_every must be >= 0 and run.keep_checkpoints >= 1, got "
                             f"{self.save_every} and {self.keep_checkpoints}")
        if self.router_stats_every < 0:
            raise ValueError(f"run.router_stats_every must be >= 0 (0: off), got {self.router_stats_every}")


@dataclass
class TrainConfig:
    """A whole GRPO run. `configs/<name>.yaml` sets any subset of these sections."""

    name: str = "grpo_tiny_cpu"
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    mismatch: MismatchConfig = field(default_factory=MismatchConfig)
    aqn: AQNConfig = field(default_factory=AQNConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        if self.task.max_prompt_tokens + self.rollout.max_tokens > self.rollout.max_model_len:
            raise ValueError(f"task.max_prompt_tokens ({self.task.max_prompt_tokens}) + rollout.max_tokens "
                             f"({self.rollout.max_tokens}) exceed rollout.max_model_len "
                             f"({self.rollout.max_model_len})")
        self._check_policy_fields()
        if self.run.resume and not self.tracking.run_name:
            raise ValueError("run.resume=true needs tracking.run_name: the run to continue")
        self._check_placement()
        # One key: the GRPO group is the samples per prompt (`load_config` refuses grpo.group_size).
        self.grpo = replace(self.grpo, group_size=self.rollout.group_size)


    @property
    def wants_baseline(self) -> bool:
        """A BF16 engine measures the speedup and the accuracy gap (eval.bf16), unless neither
        is asked for or the run is already BF16."""
        wanted = self.rollout.baseline_every or (self.eval.every and self.eval.bf16)
        return bool(wanted) and self.rollout.scheme != "bf16"

    @property
    def engines_per_local_gpu(self) -> int:
        """Engines in the one process of a local run: the rollout engine, and the BF16 one."""
        return 1 + self.wants_baseline

    def _check_placement(self) -> None:
        """What the config alone decides; the model and the cluster are checked in `layout`."""
        p, r = self.placement, self.rollout
        if p.mode == "local" and (self.trainer.num_workers, r.num_engines, r.tensor_parallel_size) != (1, 1, 1):
            raise ValueError("placement.mode=local runs one trainer and one engine in this process; "
                             "use placement.mode=split or colocated for trainer.num_workers, "
                             "rollout.num_engines or rollout.tensor_parallel_size > 1")
        rows = r.prompts_per_step * r.group_size
        if rows < self.trainer.num_workers:
            raise ValueError(f"{rows} samples per step cannot give each of trainer.num_workers="
                             f"{self.trainer.num_workers} ranks a row")
        if r.prompts_per_step < r.num_engines:
            raise ValueError(f"rollout.prompts_per_step={r.prompts_per_step} leaves some of "
                             f"rollout.num_engines={r.num_engines} engines without prompts")

    # PolicyConfig fields the run sets from other sections: one source each.
    _POLICY_SOURCES = {"model_path": "model.path", "total_steps": "run.steps", "seed": "run.seed",
                       "temperature": "rollout.temperature", "routing_replay": "rollout.routing_replay"}

    def _check_policy_fields(self) -> None:
        """A policy field the run derives may be left alone, or set to the same value."""
        derived = {"model_path": self.model.path, "total_steps": self.run.steps,
                   "seed": self.run.seed, "temperature": self.rollout.temperature,
                   "routing_replay": self.rollout.routing_replay}
        default = PolicyConfig()
        for field_name, source in self._POLICY_SOURCES.items():
            given = getattr(self.policy, field_name)
            if given != getattr(default, field_name) and given != derived[field_name]:
                raise ValueError(f"policy.{field_name}={given!r} contradicts {source}="
                                 f"{derived[field_name]!r}; set {source} only")


CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def config_path(name_or_path: str) -> Path:
    """`grpo_qwen3_30b` -> configs/grpo_qwen3_30b.yaml; a path to a .yaml file is used as is."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        return path
    path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"no config named {name_or_path!r}; known: {known}")
    return path


def load_config(argv: list[str]) -> TrainConfig:
    """`["config=NAME", "policy.lr=1e-3", ...]` -> a validated TrainConfig.

    The YAML file is merged over the dataclass defaults, then the `key=value` overrides over
    that; unknown keys and values of the wrong type are errors that name the key.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

    overrides = [a for a in argv if not a.startswith("config=")]
    bad = [a for a in overrides if "=" not in a]
    if bad:
        raise ValueError(f"arguments must be key=value, got {bad}")
    names = [a.split("=", 1)[1] for a in argv if a.startswith("config=")]
    schema = OmegaConf.structured(TrainConfig)
    try:
        layers = [OmegaConf.load(config_path(n)) for n in names[-1:]]
        if any(OmegaConf.select(layer, "grpo.group_size") is not None for layer in layers) or any(
                a.startswith("grpo.group_size=") for a in overrides):
            raise ValueError("grpo.group_size is rollout.group_size (the samples per prompt, the GRPO "
                             "group); set rollout.group_size")
        dotlist = OmegaConf.from_dotlist([_quote_yaml11_bool(a) for a in overrides])
        merged = OmegaConf.merge(schema, *layers, dotlist)
        return OmegaConf.to_object(merged)
    except ConfigKeyError as e:
        raise ValueError(_unknown_key_message(e.full_key, schema)) from None
    except OmegaConfBaseException as e:
        first = str(e).splitlines()[0]
        where = f" ({e.full_key})" if getattr(e, "full_key", None) else ""
        raise ValueError(f"bad config{where}: {first}") from None


# YAML 1.1 reads these as booleans; a string field given one (tracking.run_name=off) got "False".
_YAML11_BOOLS = {"yes", "no", "on", "off"}


def _quote_yaml11_bool(arg: str) -> str:
    """`key=off` -> `key='off'`: a string stays itself, a bool field still parses it as one."""
    key, value = arg.split("=", 1)
    return f"{key}='{value}'" if value.lower() in _YAML11_BOOLS else arg


def _unknown_key_message(key: str, schema) -> str:
    """One line: the unknown key and the closest valid ones."""
    import difflib

    from omegaconf import OmegaConf

    tree = OmegaConf.to_container(schema)
    section = key.split(".", 1)[0]
    if section not in tree:          # a misspelt section: suggest sections
        valid = list(tree)
        key = section
    else:
        valid = [f"{section}.{k}" for k in tree[section]]
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return f"unknown config key {key!r}{hint}"


def config_dict(cfg: TrainConfig) -> dict:
    """The config as plain data (for the run directory and the tracker)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
