"""The training job's YAML schema as a tree of dataclasses, with command-line overrides.

Example (every section but ``base`` and ``data`` is optional; defaults below)::

    base: {checkpoint: work/mcore, tokenizer: work/hf,     # tokenizer default: the checkpoint dir
           model: gpt}                                     # gpt | hybrid (HybridModel, megatron-core >= 0.19)
    parallel: {tp: 1, pp: 1, ep: 2, vpp: null, sequence_parallel: false,
               micro_batch: 1, global_batch: 8}
    mole: {num_experts: 4, rank: 8, alpha: 16, top_k: 1}   # MoLEConfig keyword arguments, passed through
    factorllm: {pa_loss_coeff: 0.05, balance_loss_coeff: 0.01,  # used with mole: {method: factorllm}
                trainable: experts+routers}                     # or: routers, adapters+routers (mole: rank, alpha)
    optimizer: {lr: 2.0e-4, weight_decay: 0.0, betas: [0.9, 0.999], eps: 1.0e-8, clip_grad: 1.0,
                distributed: true}
    schedule: {max_steps: 100, warmup_steps: 10, decay_style: cosine, min_lr: 0.0}
    data: {paths: [data/train.jsonl], domain_weights: {math: 2, code: 1}, seq_length: 512,
           packing: false, strict: false, seed: 1234}  # or prefix: [data/mix] (megatron-mole preprocess)
    logging: {log_jsonl: train.jsonl, tensorboard_dir: null, interval: 1, progress: true}
    checkpoint: {save_dir: ckpt, interval: 50, keep_last: 2, load_dir: null, load_step: null}
    seed: 1234
    precision: auto                                         # auto: fp32 on CPU, bf16 on GPU
    trainable: adapters                                     # or routers: only an MoE base's routers
    trainable_experts: null                                 # CEFT: analyze's selection.json
    multimodal:                                             # LLaVA bases only (detected from base.checkpoint)
      projector_trainable: null                             # null: true with Parrot, false without
      image_processor: null                                 # default: the tokenizer directory
      parrot: {num_experts: 6, alpha: 0.1, ffn_hidden_size: null, lora_rank: null, lora_alpha: null,
               stage1_steps: 0, seed: null}                 # null section: no Parrot

A LLaVA base (``convert`` of a ``LlavaForConditionalGeneration``) is recognised from its converted
checkpoint; ``data.paths`` then holds image instruction JSONL (training/mm_data.py) and the job
trains through training/llava_family.py. The ``multimodal`` section on a GPT base, or image records
in its data, is a ``ConfigError`` naming the field.

Every key is checked: an unknown key anywhere (except inside the free-form
``data.domain_weights`` mapping) or a value of the wrong type is a ``ConfigError``
naming its dotted path, e.g. ``config 'optimizer.lrr': unknown key``. The ``mole``
mapping is checked by building ``MoLEConfig`` from it at load time, its errors renamed
``mole.<field>`` (``config 'mole.num_expert': unknown key``).
Floats also accept strings such as ``1e-4`` (which YAML 1.1 reads as a string) and
``data.paths`` / ``data.prefix`` accept a single path. Relative paths are kept as written
(relative to the working directory of the job).

Precedence: YAML file, then ``--set a.b=c`` assignments in order (values parsed
as YAML: ``--set parallel.ep=2``, ``--set data.paths=[a.jsonl,b.jsonl]``), then the
named flags (``--max-steps`` etc., ``FLAGS``), which win.
"""
import argparse
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from megatron_mole import errors
from megatron_mole.layers.factorllm import FactorLLMOptions


class ConfigError(errors.ConfigError):
    """A bad training config; ``key`` is the dotted path of the offending entry."""

    def __init__(self, key: str, message: str):
        self.key, self.message = key, message
        super().__init__(f"config '{key}': {message}")

    def under(self, prefix: str) -> "ConfigError":
        return ConfigError(f"{prefix}.{self.key}" if prefix else self.key, self.message)


def _require(condition: bool, key: str, message: str):
    if not condition:
        raise ConfigError(key, message)


@dataclass
class BaseConfig:
    checkpoint: str  # Megatron-core checkpoint directory (megatron-mole convert hf-to-mcore)
    tokenizer: str | None = None  # Hugging Face tokenizer directory; None: the checkpoint directory
    # Megatron model built from the checkpoint: "gpt" (GPTModel) or "hybrid" (HybridModel of the
    # same weights, megatron-core >= 0.19); adapters are named alike (README "HybridModel").
    model: str = "gpt"
    # Core attention: "sdpa" (torch's fused attention, no [heads, s, s] tensor kept), "local"
    # (Megatron's DotProductAttention) or "auto" (sdpa unless the base needs local: sliding windows)
    attention: str = "auto"

    def __post_init__(self):
        _require(bool(self.checkpoint), "checkpoint", "must name the converted base checkpoint directory")
        _require(self.model in ("gpt", "hybrid"), "model", f"must be 'gpt' or 'hybrid', got {self.model!r}")
        _require(self.attention in ("auto", "local", "sdpa"), "attention",
                 f"must be one of auto, local, sdpa, got {self.attention!r}")

    @property
    def tokenizer_dir(self) -> str:
        return self.tokenizer or self.checkpoint


RECOMPUTE = ("none", "selective", "full")


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    vpp: int | None = None  # virtual pipeline stages per rank (interleaved schedule)
    sequence_parallel: bool = False
    micro_batch: int = 1
    global_batch: int = 8
    # Activation recompute (Megatron's recompute_granularity): "selective" recomputes the
    # core attention of every layer, "full" whole layers chosen by recompute_method
    # ("uniform": chunks of recompute_num_layers layers, "block": the first
    # recompute_num_layers layers of each pipeline stage); defaults uniform, 1.
    recompute: str = "none"
    recompute_method: str | None = None
    recompute_num_layers: int | None = None

    def __post_init__(self):
        for name in ("tp", "pp", "ep", "micro_batch", "global_batch"):
            _require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        _require(self.vpp is None or self.vpp >= 1, "vpp", f"must be >= 1 or null, got {self.vpp}")
        # pp=2 works with unbatched p2p ops, which the training loop selects there (see loop._base_overrides)
        _require(self.vpp in (None, 1) or self.pp >= 2, "vpp", f"vpp={self.vpp} needs pp >= 2, got pp={self.pp}")
        _require(self.global_batch % self.micro_batch == 0, "global_batch",
                 f"global_batch={self.global_batch} is not a multiple of micro_batch={self.micro_batch}")
        _require(not self.sequence_parallel or self.tp > 1, "sequence_parallel", "needs tp > 1")
        _require(self.recompute in RECOMPUTE, "recompute",
                 f"must be one of {', '.join(RECOMPUTE)}, got {self.recompute!r}")
        full = self.recompute == "full"
        _require(self.recompute_method in (None, "uniform", "block"), "recompute_method",
                 f"must be 'uniform', 'block' or null, got {self.recompute_method!r}")
        _require(full or self.recompute_method is None, "recompute_method",
                 f"applies to recompute: full only (recompute is {self.recompute!r})")
        _require(full or self.recompute_num_layers is None, "recompute_num_layers",
                 f"applies to recompute: full only (recompute is {self.recompute!r})")
        _require(self.recompute_num_layers is None or self.recompute_num_layers >= 1, "recompute_num_layers",
                 f"must be >= 1 or null, got {self.recompute_num_layers}")

    def recompute_overrides(self) -> dict:
        """The TransformerConfig fields of this recompute setting."""
        if self.recompute == "none":
            return {}
        if self.recompute == "selective":
            return {"recompute_granularity": "selective"}
        return {"recompute_granularity": "full", "recompute_method": self.recompute_method or "uniform",
                "recompute_num_layers": self.recompute_num_layers or 1}

    def data_parallel_size(self, world_size: int) -> int:
        """Data-parallel size at ``world_size`` ranks; checks that the layout and batch sizes fit."""
        _require(world_size % (self.tp * self.pp) == 0, "tp",
                 f"tp={self.tp} x pp={self.pp} does not divide the world size {world_size}")
        dp = world_size // (self.tp * self.pp)
        _require(self.global_batch % (self.micro_batch * dp) == 0, "global_batch",
                 f"global_batch={self.global_batch} is not a multiple of micro_batch={self.micro_batch} "
                 f"x data-parallel size {dp}")
        return dp


@dataclass
class OptimizerConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float = 1.0  # max global grad norm; 0 disables clipping
    distributed: bool = True  # Megatron's distributed optimizer (shards optimizer state over DP)

    def __post_init__(self):
        _require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(all(0 <= b < 1 for b in self.betas), "betas", f"each must lie in [0, 1), got {self.betas}")
        _require(self.eps > 0, "eps", f"must be > 0, got {self.eps}")
        _require(self.clip_grad >= 0, "clip_grad", f"must be >= 0 (0 disables), got {self.clip_grad}")


DECAY_STYLES = ("constant", "linear", "cosine")


@dataclass
class ScheduleConfig:
    max_steps: int = 100
    warmup_steps: int = 0  # linear warmup from 0 to optimizer.lr
    decay_style: str = "cosine"  # from optimizer.lr at the end of warmup to min_lr at max_steps
    min_lr: float = 0.0

    def __post_init__(self):
        _require(self.max_steps >= 1, "max_steps", f"must be >= 1, got {self.max_steps}")
        _require(0 <= self.warmup_steps <= self.max_steps, "warmup_steps",
                 f"must lie in [0, max_steps={self.max_steps}], got {self.warmup_steps}")
        _require(self.decay_style in DECAY_STYLES, "decay_style",
                 f"must be one of {', '.join(DECAY_STYLES)}, got {self.decay_style!r}")
        _require(self.min_lr >= 0, "min_lr", f"must be >= 0, got {self.min_lr}")


@dataclass
class DataConfig:
    paths: list[str] = field(default_factory=list)  # instruction JSONL files (megatron_mole.training.data)
    prefix: list[str] = field(default_factory=list)  # `megatron-mole preprocess` outputs (training.indexed)
    domain_weights: dict[str, float] | None = None  # None: in proportion to the domains' sizes
    seq_length: int = 512
    packing: bool = False
    strict: bool = False  # a bad line is an error instead of being skipped
    seed: int | None = None  # sampler seed; None: the top-level seed

    def __post_init__(self):
        _require(bool(self.paths) != bool(self.prefix), "paths",
                 "give either data.paths (JSONL files) or data.prefix (preprocessed directories), "
                 f"exactly one of them; got paths={self.paths} prefix={self.prefix}")
        _require(self.seq_length >= 2, "seq_length", f"must be >= 2, got {self.seq_length}")
        for domain, weight in (self.domain_weights or {}).items():
            _require(weight >= 0, f"domain_weights.{domain}", f"must be >= 0, got {weight}")


@dataclass
class LoggingConfig:
    log_jsonl: str | None = None  # one JSON object per step, rank 0
    tensorboard_dir: str | None = None
    interval: int = 1  # steps between log lines
    progress: bool = True  # progress bar on rank 0

    def __post_init__(self):
        _require(self.interval >= 1, "interval", f"must be >= 1, got {self.interval}")


@dataclass
class CheckpointConfig:
    save_dir: str | None = None
    interval: int = 0  # steps between saves; 0: only at the end (when save_dir is set)
    keep_last: int | None = 2  # None keeps every checkpoint
    load_dir: str | None = None
    load_step: int | None = None  # None: the latest in load_dir

    def __post_init__(self):
        _require(self.interval >= 0, "interval", f"must be >= 0, got {self.interval}")
        _require(self.keep_last is None or self.keep_last >= 1, "keep_last",
                 f"must be >= 1 or null, got {self.keep_last}")
        _require(self.load_step is None or self.load_step >= 0, "load_step", f"must be >= 0, got {self.load_step}")
        _require(self.load_step is None or self.load_dir is not None, "load_step",
                 f"load_step={self.load_step} needs checkpoint.load_dir")


@dataclass
class ParrotConfig:
    """Parrot's text-guided MoE between the projector and the LM (layers/parrot.py, DESIGN §6).
    Steps 1..stage1_steps are its stage 1 (the projector alone trains, the MoE bypassed); the rest
    stage 2 (MoE + projector + the LM's MoLE adapters), with a fresh optimizer, as Parrot's
    second run starts one. The LR schedule spans both stages."""
    num_experts: int = 6
    alpha: float = 0.1  # weight of the identity path: H_v' = sum_i w_i E_i(H_v) + alpha H_v
    ffn_hidden_size: int | None = None  # each expert's hidden size; None: the LM's ffn_hidden_size
    lora_rank: int | None = None  # LoRA experts (a shared SwiGLU + rank-r updates) instead of full ones
    lora_alpha: float | None = None
    stage1_steps: int = 0
    seed: int | None = None  # the MoE's initial tensors; None: the top-level seed

    def __post_init__(self):
        _require(self.num_experts >= 1, "num_experts", f"must be >= 1, got {self.num_experts}")
        _require(self.alpha >= 0, "alpha", f"must be >= 0, got {self.alpha}")
        _require(self.ffn_hidden_size is None or self.ffn_hidden_size >= 1, "ffn_hidden_size",
                 f"must be >= 1 or null, got {self.ffn_hidden_size}")
        _require(self.lora_rank is None or self.lora_rank >= 1, "lora_rank", f"must be >= 1 or null, got {self.lora_rank}")
        _require(self.lora_alpha is None or self.lora_rank is not None, "lora_alpha", "needs lora_rank")
        _require(self.stage1_steps >= 0, "stage1_steps", f"must be >= 0, got {self.stage1_steps}")


@dataclass
class MultimodalConfig:
    """What trains on a LLaVA base besides the LM's MoLE adapters (the vision tower stays frozen)."""
    projector_trainable: bool | None = None  # None: True with Parrot (it trains the projector), else False
    image_processor: str | None = None  # HF image processor directory; None: the tokenizer directory
    parrot: ParrotConfig | None = None

    def __post_init__(self):
        if self.parrot is not None and self.parrot.stage1_steps > 0:
            _require(self.projector_trainable is not False, "projector_trainable",
                     "Parrot's stage 1 trains the projector alone; with it frozen set parrot.stage1_steps: 0")

    @property
    def train_projector(self) -> bool:
        return self.parrot is not None if self.projector_trainable is None else self.projector_trainable


PRECISIONS = ("auto", "fp32", "bf16")
TRAINABLE = ("adapters", "routers")


@dataclass
class TrainConfig:
    base: BaseConfig
    data: DataConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    mole: dict[str, Any] = field(default_factory=dict)  # MoLEConfig(**mole), validated at load (_check_mole)
    # FactorLLM's loss weights and trainable set (mole.method == "factorllm"; layers/factorllm.py)
    factorllm: FactorLLMOptions = field(default_factory=FactorLLMOptions)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    seed: int = 1234
    precision: str = "auto"
    # "adapters": the MoLE adapters of ``mole`` train (the base frozen); "routers": only the base's
    # MoE routers train, their weights directly (Router Lens's router tuning; no adapter)
    trainable: str = "adapters"
    # CEFT: a selection file (megatron-mole analyze --select N): LoRA (mole.rank/alpha) on the
    # selected experts' fc1/fc2 only; replaces mole.targets and mole.method
    trainable_experts: str | None = None
    # LLaVA bases: the projector and Parrot (None: the LM's adapters only); refused on a GPT base
    multimodal: MultimodalConfig | None = None

    def __post_init__(self):
        _require(self.trainable in TRAINABLE, "trainable",
                 f"must be one of {', '.join(TRAINABLE)}, got {self.trainable!r}")
        if self.trainable_experts is not None:
            _require(self.trainable == "adapters", "trainable_experts",
                     f"trains adapters on selected experts; it cannot be combined with trainable={self.trainable!r}")
            for name in ("targets", "method"):
                _require(name not in self.mole, f"mole.{name}",
                         "is set by trainable_experts (the selected experts' fc1/fc2, method 'ceft'); remove it")
        _check_mole(self.effective_mole())
        _require(self.precision in PRECISIONS, "precision",
                 f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        _require(self.schedule.min_lr <= self.optimizer.lr, "schedule.min_lr",
                 f"min_lr={self.schedule.min_lr} exceeds optimizer.lr={self.optimizer.lr}")
        parrot = self.multimodal.parrot if self.multimodal else None
        _require(parrot is None or parrot.stage1_steps <= self.schedule.max_steps, "multimodal.parrot.stage1_steps",
                 f"stage1_steps={parrot and parrot.stage1_steps} exceeds schedule.max_steps={self.schedule.max_steps}")

    def effective_mole(self) -> dict:
        """The MoLEConfig arguments: ``mole``, with CEFT's method and targets under ``trainable_experts``."""
        if self.trainable_experts is None:
            return dict(self.mole)
        from megatron_mole.analysis.selection import ceft_targets, read_selection

        try:
            targets = ceft_targets(read_selection(self.trainable_experts), self.trainable_experts)
        except errors.ConfigError as error:
            raise ConfigError("trainable_experts", str(error).removeprefix("trainable_experts: ")) from None
        return dict(self.mole, method="ceft", targets=targets)

    @property
    def data_seed(self) -> int:
        return self.seed if self.data.seed is None else self.data.seed


def _check_mole(values: dict):
    """Build ``MoLEConfig(**values)`` now, so a bad ``mole`` entry is an error naming
    ``mole.<field>`` before any process group starts (not a TypeError on every rank)."""
    from megatron_mole.config import MoLEConfig

    known = [f.name for f in dataclasses.fields(MoLEConfig)]
    for name in values:
        _require(name in known, f"mole.{name}", f"unknown key (allowed here: {', '.join(known)})")
    try:
        MoLEConfig(**values)
    except ValueError as error:  # MoLEConfig (and the routers' check_args) name "MoLEConfig.<field>=<value>: ..."
        text = str(error)
        match = re.match(r"MoLEConfig\.(\w+)", text)
        if match is None:
            raise ConfigError("mole", text) from None
        name = match.group(1)
        given = f"{match.group(0)}={values.get(name)!r}: "
        message = (f"{text[len(given):]} (got {values[name]!r})" if name in values and text.startswith(given)
                   else text[match.end():].lstrip("=: "))
        raise ConfigError(f"mole.{name}", message) from None


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp, value, key: str):
    """``value`` checked (and lightly coerced) to the annotated type ``tp``; errors name ``key``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, key)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is list:
        if isinstance(value, str):
            value = [value]
        _require(isinstance(value, list), key, f"expected a list, got {value!r}")
        return [_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        _require(isinstance(value, (list, tuple)) and len(value) == len(args), key,
                 f"expected a list of {len(args)} values, got {value!r}")
        return tuple(_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        _require(isinstance(value, dict), key, f"expected a mapping, got {value!r}")
        return {_convert(args[0], k, key): _convert(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(key, f"expected a number, got {value!r}") from None
    ok = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}[tp]
    _require(isinstance(value, ok) and (tp is bool or not isinstance(value, bool)), key,
             f"expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return tp(value)


def _build(cls, raw, key: str):
    _require(isinstance(raw, dict), key or "<top level>", f"expected a mapping, got {raw!r:.60}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for name in raw:
        _require(name in known, f"{key}.{name}" if key else str(name),
                 f"unknown key (allowed here: {', '.join(known)})")
    for name, spec in known.items():
        required = spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING
        _require(name in raw or not required, f"{key}.{name}" if key else name, "missing required key")
    kwargs = {name: _convert(hints[name], value, f"{key}.{name}" if key else name) for name, value in raw.items()}
    try:
        return cls(**kwargs)
    except ConfigError as error:
        raise error.under(key) from None


def config_from_dict(raw: dict) -> TrainConfig:
    return _build(TrainConfig, raw, "")


def config_to_dict(cfg: TrainConfig) -> dict:
    """Plain dict (lists for tuples) that ``config_from_dict`` turns back into an equal config."""
    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value
    return plain(dataclasses.asdict(cfg))


def save_config(cfg: TrainConfig, path):
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(config_to_dict(cfg), handle, sort_keys=False)


def set_dotted(raw: dict, dotted: str, value):
    """``raw[a][b] = value`` for ``dotted == "a.b"``, creating missing mappings."""
    *parents, leaf = dotted.split(".")
    node = raw
    for depth, part in enumerate(parents):
        node = node.setdefault(part, {})
        _require(isinstance(node, dict), ".".join(parents[: depth + 1]),
                 f"cannot set {dotted!r}: this entry is not a mapping")
    node[leaf] = value


def apply_assignments(raw: dict, assignments) -> dict:
    """Apply ``a.b=c`` strings to a raw config mapping (values parsed as YAML); returns ``raw``."""
    for assignment in assignments:
        dotted, sep, text = assignment.partition("=")
        _require(bool(sep) and bool(dotted), assignment, "expected KEY=VALUE, e.g. optimizer.lr=1e-4")
        set_dotted(raw, dotted, yaml.safe_load(text) if text else None)
    return raw


def load_train_config(path, assignments=(), overrides: dict | None = None) -> TrainConfig:
    """Read the YAML at ``path``, apply ``--set`` assignments, then ``{dotted key: value}`` overrides."""
    with open(path, encoding="utf-8") as handle:
        try:
            raw = yaml.safe_load(handle)
        except yaml.YAMLError as error:
            raise ConfigError(str(path), f"invalid YAML: {error}") from None
    raw = {} if raw is None else raw
    _require(isinstance(raw, dict), str(path), f"the file must hold a mapping, got {type(raw).__name__}")
    apply_assignments(raw, assignments)
    for dotted, value in (overrides or {}).items():
        set_dotted(raw, dotted, value)
    return config_from_dict(raw)


# Named command-line flags -> (dotted config key, type).
FLAGS = {
    "max_steps": ("schedule.max_steps", int),
    "save": ("checkpoint.save_dir", str),
    "save_interval": ("checkpoint.interval", int),
    "load": ("checkpoint.load_dir", str),
    "load_step": ("checkpoint.load_step", int),
    "log_jsonl": ("logging.log_jsonl", str),
}


def add_config_arguments(parser: argparse.ArgumentParser):
    """``--config FILE``, the named flags of ``FLAGS`` and ``--set KEY=VALUE`` (repeatable)."""
    parser.add_argument("--config", required=True, help="training YAML (megatron_mole.training.train_config)")
    for dest, (dotted, kind) in FLAGS.items():
        parser.add_argument("--" + dest.replace("_", "-"), dest=dest, type=kind, default=None,
                            help=f"overrides {dotted}")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config entry, e.g. --set optimizer.lr=1e-4 (value parsed as YAML)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides = {dotted: getattr(args, dest) for dest, (dotted, _) in FLAGS.items()
                 if getattr(args, dest, None) is not None}
    return load_train_config(args.config, args.assignments, overrides)
