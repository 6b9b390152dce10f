"""The run config: one typed schema, loaded from YAML, overridable with ``--set a.b=c``.

Every problem in a config is reported at once, each with its key path and the fix. Relative data and
model paths are resolved against the config file's folder (so a config can be run from anywhere);
``output.dir`` and paths given with ``--set`` are resolved against the current directory.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.errors import ConfigError

TASKS = ("sequence_classification", "token_classification", "question_answering", "causal_lm")
DATA_FORMATS = ("auto", "jsonl", "json", "parquet", "csv", "conll", "squad")


class _Section(BaseModel):
    # frozen: a config is checked once, as a whole; code that needs another value builds another config
    # (model_copy), so nothing can change it past its checks.
    model_config = ConfigDict(extra="forbid", frozen=True)

    def rules(self) -> list[str]:
        """Values valid alone but not together, each problem naming its key path and the fix (none here)."""
        return []

    @model_validator(mode="after")
    def _check_rules(self):
        problems = self.rules()
        if problems:
            raise ValueError("\n".join(problems))  # load_config lists them one per line
        return self


class LoraConfig(_Section):
    enabled: bool = False
    r: int = Field(8, ge=1, description="adapter rank")
    alpha: int = Field(16, ge=1, description="scaling numerator: the update is scaled by alpha / r")
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: Optional[list[str]] = Field(None, description="None picks a default per architecture")
    merge: bool = Field(False, description="also export the adapter merged into a full model")


class ModelConfig(_Section):
    name_or_path: str = Field(
        ...,
        description="a local Hugging Face folder, a hub id (needs network), or package:MODULE/SUBDIR for a "
        "model shipped inside an installed Python package",
    )
    trust_remote_code: bool = False
    lora: LoraConfig = LoraConfig()


class DataConfig(_Section):
    train: Union[str, list[str]] = Field(..., description="file, glob, folder of shards, URI, or a list")
    validation: Optional[Union[str, list[str]]] = None
    test: Optional[Union[str, list[str]]] = None
    format: Literal[DATA_FORMATS] = "auto"  # type: ignore[valid-type]
    text_column: str = "text"
    text_pair_column: Optional[str] = None
    label_column: str = "label"
    max_seq_length: int = Field(128, ge=8, le=131072, description="tokens; longer records are truncated")
    packing: bool = Field(False, description="causal_lm: pack several examples into each max_seq_length sequence")
    train_on_prompt: bool = Field(False, description="causal_lm: also compute the loss on prompt/user tokens")
    validation_split: float = Field(
        0.1, ge=0.0, lt=1.0, description="fraction of train held out when data.validation is not set"
    )
    shuffle_seed: int = 42
    # token_classification (CoNLL files always give the columns tokens and tags)
    tokens_column: str = Field("tokens", description="token_classification: the list of words of a sentence")
    tags_column: str = Field("tags", description="token_classification: one BIO tag per word")
    tag_scheme: Literal["iob2", "iob1"] = Field(
        "iob2", description="token_classification: iob2 reports an I- tag that does not follow B-/I- of its "
        "type; iob1 accepts it as the start of an entity (converted to IOB2)")
    label_all_subtokens: bool = Field(
        False, description="token_classification: every sub-token of a word carries its label in the loss; "
        "False = only the first (the rest are ignored)")
    # question_answering (nested SQuAD JSON files always give question, context and answers)
    question_column: str = Field("question", description="question_answering: the question")
    context_column: str = Field("context", description="question_answering: the passage holding the answer")
    answers_column: str = Field(
        "answers", description="question_answering: {text: [...], answer_start: [...]} (character offsets); "
        "empty lists = unanswerable")
    doc_stride: int = Field(
        32, ge=0, description="question_answering: tokens shared by consecutive windows of a long context")
    max_answer_length: int = Field(30, ge=1, description="question_answering: longest predicted answer, tokens")
    n_best: int = Field(20, ge=1, description="question_answering: start/end candidates per window when decoding")


class TrainingConfig(_Section):
    method: Literal["sft", "dpo"] = Field(
        "sft", description="causal_lm: sft = supervised (chat, prompt/completion, text); dpo = preference tuning "
        "on OpenAI's preference records (input, preferred_output, non_preferred_output)")
    beta: float = Field(0.1, gt=0.0, le=100.0, description="dpo: how far the policy may move from the reference "
                        "model (higher = closer); the sigmoid loss is -log sigmoid(beta * margin)")
    epochs: int = Field(3, ge=1)
    learning_rate: float = Field(5e-5, gt=0.0)
    batch_size: int = Field(16, ge=1, description="examples per worker per micro-step")
    gradient_accumulation_steps: int = Field(1, ge=1)
    weight_decay: float = Field(0.01, ge=0.0)
    warmup_ratio: float = Field(0.1, ge=0.0, le=1.0, description="fraction of optimizer steps")
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: float = Field(1.0, ge=0.0, description="0 disables clipping")
    seed: int = 42
    eval_every_steps: int = Field(0, ge=0, description="optimizer steps; 0 = at each epoch end only")
    checkpoint_every_steps: int = Field(0, ge=0, description="optimizer steps; 0 = at each epoch end only")
    max_steps: Optional[int] = Field(None, ge=1, description="stop after this many optimizer steps")
    log_every_steps: int = Field(10, ge=1)
    inject_failure_at_step: Optional[int] = Field(
        None, ge=1, description="fault injection: rank 0 raises once at this step (tests resume)"
    )


class DeepSpeedConfig(_Section):
    stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    offload_optimizer: bool = False
    offload_params: bool = False
    config: dict[str, Any] = Field(default_factory=dict, description="native DeepSpeed keys, merged last")

    def rules(self) -> list[str]:
        problems = []
        if self.offload_params and self.stage != 3:
            problems.append("deepspeed.offload_params: needs deepspeed.stage: 3 (ZeRO-3 partitions parameters)")
        if self.offload_optimizer and self.stage == 0:
            problems.append("deepspeed.offload_optimizer: needs deepspeed.stage 1, 2 or 3")
        return problems


class ScalingConfig(_Section):
    num_workers: Union[Literal["auto"], int] = Field(
        "auto", description="train workers; auto: one per GPU when the run uses GPUs, else one per node using "
        "every core of it (on a CPU, threads in one process train faster than processes exchanging gradients)")
    use_gpu: Union[Literal["auto"], bool] = "auto"
    resources_per_worker: Optional[dict[str, float]] = None
    max_failures: int = Field(0, ge=-1, description="worker-group restarts from the last checkpoint; -1 = forever")
    threads_per_worker: Optional[int] = Field(None, ge=1, description="torch threads; None = cores / workers")

    @field_validator("num_workers", mode="before")
    @classmethod
    def _auto_or_count(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError("give auto or a whole number of workers, 1 or more")

    def workers(self, auto: int = 1) -> int:
        """The worker count, ``auto`` standing for num_workers: auto (sizing a local instance before Ray starts,
        where ``training.scaling.resolve_workers`` gives the real count once Ray runs)."""
        return auto if self.num_workers == "auto" else self.num_workers


class TuneConfig(_Section):
    enabled: bool = Field(False, description="`rayfine run` searches (tune) instead of one train run")
    num_samples: int = Field(4, ge=1, description="trials drawn; with grid keys, trials per grid point")
    max_concurrent_trials: int = Field(
        1, ge=1, description="trials at once; each takes scaling.num_workers workers (lowered on a local "
        "instance too small for it)")
    metric: str = Field("eval_loss", description="a metric reported at each evaluation: eval_loss, eval_accuracy, "
                        "eval_f1, ...")
    mode: Literal["min", "max"] = "min"
    scheduler: Literal["asha", "fifo"] = Field("asha", description="asha stops weak trials early; fifo runs all")
    search_alg: Literal["random", "optuna"] = "random"
    grace_period: int = Field(1, ge=1, description="evaluations before ASHA may stop a trial")
    reduction_factor: int = Field(2, ge=2, description="ASHA keeps the best 1/reduction_factor at each rung")
    search_space: dict[str, Any] = Field(
        default_factory=dict, description="config path -> one distribution, e.g. training.learning_rate: "
        "{loguniform: [1.0e-5, 1.0e-3]}; see SEARCH_DISTRIBUTIONS")

    def rules(self) -> list[str]:
        return tune_problems(self)


# Distributions of tune.search_space and the arguments each takes (sampled with Ray Tune's functions of the
# same name; grid is tune.grid_search, randint's upper bound is exclusive).
SEARCH_DISTRIBUTIONS = {
    "loguniform": "[low, high] with 0 < low < high",
    "uniform": "[low, high] with low < high",
    "randint": "[low, high] integers, high exclusive",
    "choice": "[value, ...]",
    "grid": "[value, ...] (every value is tried)",
}
SEARCHABLE_SECTIONS = ("model", "data", "training", "deepspeed")


def search_field(path: str) -> Any:
    """The pydantic field at a dotted config path of a searchable section; raises ValueError if none."""
    parts = path.split(".")
    if parts[0] not in SEARCHABLE_SECTIONS or len(parts) < 2:
        raise ValueError(f"not a searchable config path; keys go under {', '.join(SEARCHABLE_SECTIONS)}, "
                         "e.g. training.learning_rate")
    section = _section_for(tuple(parts[:-1]))
    field = section.model_fields.get(parts[-1]) if section else None
    if field is None or _section_for(tuple(parts)) is not None:
        valid = ", ".join(section.model_fields) if section else ""
        where = f"; valid keys under {'.'.join(parts[:-1])} are {valid}" if valid else ""
        raise ValueError(f"not a config path{where}")
    return field


def _number(value: Any) -> float | None:
    """A YAML number; also "1e-5", which YAML 1.1 reads as a string (it wants 1.0e-5)."""
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def parse_search_space(space: dict[str, Any]) -> tuple[dict[str, tuple[str, list]], list[str]]:
    """Check tune.search_space against the schema; returns ({path: (distribution, args)}, problems).

    Args come back converted: real bounds as floats, choice/grid values as the field's own type, so a
    sampled value always fits the field (training.batch_size only ever gets ints).
    """
    from pydantic import TypeAdapter

    parsed, problems = {}, []
    for path, spec in space.items():
        where = f"tune.search_space.{path}"
        try:
            field = search_field(path)
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
            continue
        if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in SEARCH_DISTRIBUTIONS):
            problems.append(f"{where}: expected one distribution of {', '.join(SEARCH_DISTRIBUTIONS)}, e.g. "
                            f"{{loguniform: [1.0e-5, 1.0e-3]}} (got {spec!r})")
            continue
        kind, args = next(iter(spec.items()))
        adapter = TypeAdapter(field.annotation if not field.metadata else
                              Annotated[(field.annotation, *field.metadata)])
        try:
            parsed[path] = (kind, _search_args(kind, args, adapter, _takes_reals(field.annotation)))
        except ValueError as exc:
            problems.append(f"{where}: {kind}: {exc}")
    return parsed, problems


def _takes_reals(annotation: Any) -> bool:
    return annotation is float or float in getattr(annotation, "__args__", ())


def _search_args(kind: str, args: Any, adapter: Any, takes_reals: bool) -> list:
    """Validated arguments of one distribution (ValueError names what is wrong)."""
    from pydantic import ValidationError

    def fits(value):
        try:
            return adapter.validate_python(value)
        except ValidationError as exc:
            raise ValueError(f"{value!r} does not fit this key: {exc.errors()[0]['msg']}") from None

    if not isinstance(args, list) or not args:
        raise ValueError(f"expected a list: {SEARCH_DISTRIBUTIONS[kind]} (got {args!r})")
    if kind in ("choice", "grid"):
        return [fits(v) for v in args]
    if len(args) != 2:
        raise ValueError(f"expected {SEARCH_DISTRIBUTIONS[kind]} (got {args!r})")
    if kind == "randint":
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in args) or args[0] >= args[1]:
            raise ValueError(f"expected {SEARCH_DISTRIBUTIONS[kind]} (got {args!r})")
        return [fits(args[0]), fits(args[1] - 1) + 1]
    low, high = (_number(v) for v in args)
    if low is None or high is None or not low < high or (kind == "loguniform" and low <= 0):
        raise ValueError(f"expected {SEARCH_DISTRIBUTIONS[kind]} (got {args!r})")
    if not takes_reals:
        raise ValueError("samples real numbers but this key takes integers or fixed values; use randint or choice")
    fits(low), fits(high)
    return [low, high]


def tune_problems(tune: TuneConfig) -> list[str]:
    """The search space against the schema, and the distributions the search algorithm can sample."""
    parsed, problems = parse_search_space(tune.search_space)
    for path, (kind, args) in parsed.items():
        if tune.search_alg == "optuna" and kind == "grid":
            problems.append(f"tune.search_space.{path}: optuna does not take grid; use choice, or search_alg: random")
        if tune.search_alg == "optuna" and kind == "choice" and any(isinstance(v, (list, dict)) for v in args):
            problems.append(f"tune.search_space.{path}: optuna chooses among plain values only (numbers, "
                            "strings, booleans); use search_alg: random")
    return problems


class AutoscalingConfig(_Section):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(8, gt=0)


class ServeConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    proxy: Literal["haproxy", "python"] = Field(
        "haproxy", description="HTTP ingress of a Ray instance rayfine starts: haproxy (Serve's HAProxy in front "
        "of replicas that answer HTTP themselves) or python (Serve's Python HTTP proxy); a running cluster "
        "keeps the one it was started with (RAY_SERVE_ENABLE_HA_PROXY in its env)")
    route_prefix: str = "/"
    num_replicas: Optional[int] = Field(None, ge=1, description="fixed replicas; None = 1 unless autoscaling")
    autoscaling: Optional[AutoscalingConfig] = None
    max_ongoing_requests: int = Field(32, ge=1, description="per replica")
    max_queued_requests: int = Field(64, ge=-1, description="per replica with HAProxy, per proxy with the "
                                     "Python proxy; excess gets 503; -1 = unbounded")
    max_batch_size: int = Field(16, ge=1)
    batch_wait_timeout_s: float = Field(0.005, ge=0.0)
    request_timeout_s: float = Field(30.0, gt=0.0)
    api_keys_env: str = Field("RAYFINE_API_KEYS", description="env var holding comma-separated API keys")
    max_input_tokens: int = Field(512, ge=1)
    max_new_tokens: int = Field(256, ge=1)
    max_request_bytes: int = Field(1_048_576, ge=1024, description="a larger request body gets 413 (never held in "
                                   "memory)")
    max_inputs_per_request: int = Field(256, ge=1, description="texts, questions or prompts in one request; "
                                        "more get 400")
    trust_remote_code: bool = Field(
        False, description="run the model folder's own Python code; `rayfine serve CONFIG` also honours "
        "model.trust_remote_code")
    cpus_per_replica: float = Field(1.0, ge=0.0, description="Ray CPUs reserved per model replica")
    gpus_per_replica: float = Field(0.0, ge=0.0, description="Ray GPUs per replica; > 0 runs the model on CUDA")
    threads_per_replica: Optional[int] = Field(
        None, ge=1, description="torch threads per replica; None = the node's cores / replicas")
    max_models_per_replica: int = Field(
        8, ge=1, description="models one replica of a multi-model app holds at once (`rayfine serve A B ...`, "
        "`rayfine api`); the least recently used is unloaded past it")
    engine: Literal["auto", "transformers", "sequential"] = Field(
        "auto", description="causal LM generation: transformers (continuous batching: requests join and leave the "
        "running batch at every step, paged KV cache), sequential (one sequence at a time), auto (transformers "
        "where the model's attention supports a paged cache, else sequential)")
    max_running_sequences: Optional[int] = Field(
        None, ge=1, description="sequences one causal LM decodes together per step (n > 1 counts n); the rest "
                                "wait; None = max_ongoing_requests")
    kv_cache_tokens: Optional[int] = Field(
        None, ge=1, description="tokens the paged KV cache of one causal LM holds (all sequences together); None = "
        "room for max_running_sequences sequences of max_input_tokens + max_new_tokens, within 20% of the free "
        "memory on CPU and 50% of the free GPU memory")

    def rules(self) -> list[str]:
        return serve_problems(self)


def serve_problems(serve: ServeConfig) -> list[str]:
    """Serve keys that are valid alone but not together (checked for a run config and ``rayfine serve
    MODEL_DIR --set ...`` alike)."""
    problems = []
    if serve.num_replicas is not None and serve.autoscaling is not None:
        problems.append("serve.num_replicas: set either num_replicas or autoscaling, not both")
    if serve.max_queued_requests == 0:
        problems.append("serve.max_queued_requests: 0 would refuse every request; use a positive limit, or -1 "
                        "for no limit")
    auto = serve.autoscaling
    if auto is not None and auto.min_replicas > auto.max_replicas:
        problems.append("serve.autoscaling.min_replicas: must not exceed max_replicas")
    return problems


class OutputConfig(_Section):
    dir: str = Field("runs", description="parent folder of run folders (relative to the current directory; "
                     "~ expands)")
    name: Optional[str] = Field(None, description="run folder name; None = the config file's stem")
    model_id: Optional[str] = Field(None, description="the exported model's served id (rayfine.json); "
                                    "None = the run folder's name")


class MlflowConfig(_Section):
    tracking_uri: Optional[str] = Field(
        None, description="an MLflow tracking server (http://...) or store; None = sqlite:///OUTPUT_DIR/mlflow.db, "
        "which `mlflow ui --backend-store-uri sqlite:///OUTPUT_DIR/mlflow.db` shows with no server")
    experiment: str = Field("rayfine", min_length=1, description="the MLflow experiment (created if missing)")
    run_name: Optional[str] = Field(None, description="None = the run folder's name")
    register_model: Union[bool, str] = Field(
        False, description="register the exported model in MLflow's model registry (transformers flavour): true "
        "names it after the run folder, a string names it")


class WandbConfig(_Section):
    project: str = Field(..., min_length=1, description="the W&B project")
    entity: Optional[str] = Field(None, description="the W&B team or user; None = the API key's default")
    name: Optional[str] = Field(None, description="the run's name; None = the run folder's name")
    tags: list[str] = Field(default_factory=list)
    mode: Literal["online", "offline", "disabled"] = Field(
        "online", description="offline writes RUN/wandb only (`wandb sync` uploads it later); online needs "
        "WANDB_API_KEY where the run's driver runs")


class TrackingConfig(_Section):
    mlflow: Optional[MlflowConfig] = Field(None, description="log to MLflow (off unless set, e.g. mlflow: {})")
    wandb: Optional[WandbConfig] = Field(None, description="log to Weights & Biases (off unless set)")
    tensorboard: bool = Field(False, description="write TensorBoard event files to RUN/tensorboard")


class RunConfig(_Section):
    task: Literal[TASKS] = "sequence_classification"  # type: ignore[valid-type]
    model: ModelConfig
    data: DataConfig
    training: TrainingConfig = TrainingConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    scaling: ScalingConfig = ScalingConfig()
    tune: TuneConfig = TuneConfig()
    serve: ServeConfig = ServeConfig()
    output: OutputConfig = OutputConfig()
    tracking: TrackingConfig = TrackingConfig()

    def rules(self) -> list[str]:
        return contradictions(self)

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir).expanduser() / (self.output.name or "run")


def contradictions(cfg: RunConfig) -> list[str]:
    """Combinations across sections that cannot work together (each section checks its own keys)."""
    problems = []
    ds = cfg.deepspeed
    if ds.precision in ("bf16", "fp16") and cfg.scaling.use_gpu is False:
        problems.append(f"deepspeed.precision: {ds.precision} needs a GPU; use fp32 or auto with scaling.use_gpu: false")
    if cfg.training.method == "dpo" and cfg.task != "causal_lm":
        problems.append(f"training.method: dpo tunes a causal LM on preference pairs; set task: causal_lm "
                        f"(task is {cfg.task})")
    if cfg.training.method == "dpo" and cfg.data.packing:
        problems.append("data.packing: not used with training.method dpo (each pair's two outputs run as whole "
                        "sequences); set data.packing: false")
    if cfg.task == "question_answering" and 2 * cfg.data.doc_stride >= cfg.data.max_seq_length:
        problems.append(f"data.doc_stride: {cfg.data.doc_stride} must be less than half data.max_seq_length "
                        f"({cfg.data.max_seq_length}), or windows would barely advance")
    return problems


def _format_error(err: dict[str, Any], raw: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        section = _section_for(err["loc"][:-1])
        valid = ", ".join(section.model_fields) if section else ""
        return f"{loc}: unknown key; valid keys here are {valid}"
    if kind == "missing":
        return f"{loc}: required; add it to the config"
    message = err["msg"]
    if kind == "value_error":  # ours: a rule across keys names them; a field's check says what to give
        message = message.removeprefix("Value error, ")
        if not loc or message.startswith(f"{loc}."):
            return message
    got = _lookup(raw, err["loc"])
    got_text = f" (got {got!r})" if got is not _MISSING else ""
    return f"{loc}: {message}{got_text}"


_MISSING = object()


def _lookup(raw: Any, loc: tuple) -> Any:
    for part in loc:
        if isinstance(raw, dict) and part in raw:
            raw = raw[part]
        elif isinstance(raw, list) and isinstance(part, int) and part < len(raw):
            raw = raw[part]
        else:
            return _MISSING
    return raw


def _section_for(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = RunConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        nxt = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nxt is None:
            return None
        model = nxt
    return model


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn ``["training.epochs=3", ...]`` into a nested dict; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    problems = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            problems.append(f"--set {pair!r}: expected KEY=VALUE, e.g. --set training.epochs=3")
            continue
        try:
            parsed = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            parsed = value
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(f"--set {pair!r}: {part} is not a section")
                break
        else:
            node[parts[-1]] = parsed
    if problems:
        raise ConfigError(problems, header="Bad --set override:")
    return out


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def resolve_model_path(name_or_path: str, base: Path) -> str:
    """Resolve ``package:MODULE/SUBDIR`` and relative folders; hub ids pass through unchanged."""
    if name_or_path.startswith("package:"):
        module, _, sub = name_or_path[len("package:"):].partition("/")
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(
                f"model.name_or_path: Python package {module!r} is not installed; pip install "
                f"{module.replace('_', '-')} or point name_or_path at a local model folder"
            )
        return str(Path(list(spec.submodule_search_locations)[0]) / sub)
    candidate = Path(name_or_path).expanduser()
    if not candidate.is_absolute() and (base / candidate).exists():
        return str((base / candidate).resolve())
    return str(candidate.resolve()) if candidate.exists() else name_or_path


def _resolve_data_path(path: str, base: Path) -> str:
    if "://" in path or os.path.isabs(path):
        return path
    return str((base / path).resolve())


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    data = raw.get("data")
    if isinstance(data, dict):
        for split in ("train", "validation", "test"):
            value = data.get(split)
            if isinstance(value, str):
                data[split] = _resolve_data_path(value, base)
            elif isinstance(value, list):
                data[split] = [_resolve_data_path(v, base) if isinstance(v, str) else v for v in value]
    model = raw.get("model")
    if isinstance(model, dict) and isinstance(model.get("name_or_path"), str):
        model["name_or_path"] = resolve_model_path(model["name_or_path"], base)


# ``data.train`` of a base-model config of ``rayfine api``: each fine-tuning job brings its own training file.
JOB_SUPPLIED_DATA = "<each fine-tuning job's training_file>"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                raw: dict[str, Any] | None = None, *, data_optional: bool = False) -> RunConfig:
    """Load and validate a run config; raise ConfigError listing every problem.

    ``data_optional``: a config without ``data.train`` is valid (``rayfine api``'s base models, whose jobs supply
    their files); its ``data.train`` reads JOB_SUPPLIED_DATA.
    """
    if raw is None:
        if str(path).startswith("package:"):  # a config shipped inside a Python package (rayfine submit)
            path = resolve_model_path(str(path), Path.cwd())
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the config must be a mapping of sections (task, model, data, ...)")
    raw = dict(raw)
    output = raw.get("output") or {}
    if isinstance(output, dict) and not output.get("name"):  # the run folder is named after the config file
        raw["output"] = {**output, "name": Path(path).stem if path else "run"}
    base = Path(path).resolve().parent if path else Path.cwd()
    _resolve_paths(raw, base)
    if data_optional and isinstance(raw.get("data", {}), dict) and not (raw.get("data") or {}).get("train"):
        raw["data"] = {**(raw.get("data") or {}), "train": JOB_SUPPLIED_DATA}
    if overrides:
        extra = parse_overrides(overrides)
        _resolve_paths(extra, Path.cwd())
        raw = deep_merge(raw, extra)
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as exc:
        problems = [line for e in exc.errors() for line in _format_error(e, raw).split("\n")]
        where = f"{path}" if path else "config"
        raise ConfigError(problems, header=f"{where}: {len(problems)} problem(s) in the config:") from None
    return cfg


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
