"""Typed configuration: one dataclass per section, TOML files, ``section.key=value`` overrides.

Resolution order (later wins)::

    built-in dataclass defaults
      < shipped locked defaults (lmtune/locked_defaults.toml, the phase-0 study's values)
      < the project's locked defaults (./lmtune.locked.toml, written by `python -m lmtune.export`)
      < an explicit --locked FILE
      < config files given on the command line (in order)
      < section.key=value overrides

Every field is documented by the string literal under it (read back by :func:`describe`), and every
value is validated before any work starts: a bad key, type or range raises :class:`ConfigError`,
which the command-line entry points turn into one message and exit code 2.

This module imports only the standard library.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

SHIPPED_LOCKED = Path(__file__).with_name("locked_defaults.toml")
PROJECT_LOCKED = Path("lmtune.locked.toml")
"""Where `lmtune.export` writes by default and where the trainer looks next (relative to the cwd)."""
LOCKED_ENV = "LMTUNE_LOCKED"
"""Environment variable naming a locked-defaults file (same role as --locked)."""


class ConfigError(ValueError):
    """Bad user input: reported as one line and exit code 2, never as a traceback."""


def _range(*, ge: float | None = None, gt: float | None = None, le: float | None = None) -> dict:
    return {"ge": ge, "gt": gt, "le": le}


@dataclass
class ModelConfig:
    n_layer: int = field(default=12, metadata=_range(ge=1))
    """Number of transformer blocks."""
    n_head: int = field(default=12, metadata=_range(ge=1))
    """Attention heads per block; must divide n_embd."""
    n_embd: int = field(default=768, metadata=_range(ge=1))
    """Residual stream width (d_model)."""
    block_size: int = field(default=1024, metadata=_range(ge=1))
    """Maximum context length (size of the learned position embedding)."""
    norm_placement: Literal["pre", "post"] = "pre"
    """LayerNorm before each sub-layer (pre-LN, GPT-2) or after the residual add (post-LN, Vaswani et al.)."""
    final_norm: bool = True
    """LayerNorm on the residual stream before the LM head (ln_f)."""
    attention: Literal["sdpa", "manual"] = "sdpa"
    """Causal attention kernel: torch's scaled_dot_product_attention, or an explicit masked softmax."""
    dropout: float = field(default=0.0, metadata=_range(ge=0.0, le=1.0))
    """Dropout on embeddings, attention weights and residual branches."""
    bias: bool = True
    """Bias terms in Linear and LayerNorm layers (GPT-2 has them)."""
    tie_embeddings: bool = True
    """Share the token embedding matrix with the LM head (Press & Wolf 2017)."""
    vocab_size: int = field(default=0, metadata=_range(ge=0))
    """Rows of the embedding and the LM head; 0 = the tokenizer's ids. A larger value pads them (nanoGPT pads
    GPT-2's 50257 to 50304, a multiple of 64) or gives a byte-level model the GPT-2 model's size."""


@dataclass
class DataConfig:
    dataset: str = "builtin"
    """`builtin` (real English shipped with Python), `files`, or a Hugging Face hub name
    such as `wikitext-2-raw-v1`, `wikitext-103-raw-v1`, `openwebtext`, `fineweb-edu`."""
    files: list[str] = field(default_factory=list)
    """Training text for dataset=files: paths or globs of .txt, .jsonl (a "text" field) or .parquet files."""
    val_files: list[str] = field(default_factory=list)
    """Validation text for dataset=files; when empty, the last val_fraction of the training text."""
    tokenizer: Literal["gpt2", "byte"] = "gpt2"
    """GPT-2 BPE (tiktoken, 50257 ids) or raw UTF-8 bytes (256 ids)."""
    seq_len: int = field(default=1024, metadata=_range(ge=1))
    """Tokens per training sequence; at most model.block_size."""
    fraction: float = field(default=1.0, metadata=_range(gt=0.0, le=1.0))
    """Use only the first fraction of the corpus (the phase-0 study's data_fraction)."""
    val_fraction: float = field(default=0.1, metadata=_range(gt=0.0, le=0.5))
    """Share of the text held out for validation when no validation split exists."""
    cache_dir: str = ""
    """Where tokenized arrays are cached; empty means $LMTUNE_CACHE or ~/.cache/lmtune."""


@dataclass
class TrainConfig:
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    """AdamW (decoupled weight decay, Loshchilov & Hutter 2019), Adam (L2 penalty), or SGD with momentum."""
    lr: float = field(default=6e-4, metadata=_range(gt=0.0))
    """Peak learning rate at base_batch_tokens (scaled by lr_scaling to the effective batch)."""
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    """Scale lr with effective batch / base_batch_tokens: linear (Goyal et al. 2017) or sqrt (McCandlish et al. 2018)."""
    base_batch_tokens: int = field(default=0, metadata=_range(ge=0))
    """Effective batch (tokens) at which lr was tuned; 0 means the first configured effective batch."""
    warmup_steps: int = field(default=0, metadata=_range(ge=0))
    """Linear warmup from 0 to the peak lr over this many optimizer steps."""
    schedule: Literal["constant", "cosine"] = "constant"
    """After warmup: hold the peak lr, or cosine-decay it to min_lr_ratio·lr at the last step."""
    min_lr_ratio: float = field(default=0.1, metadata=_range(ge=0.0, le=1.0))
    """Floor of the cosine schedule as a fraction of the peak lr."""
    weight_decay: float = field(default=0.0, metadata=_range(ge=0.0))
    """Weight decay on matrices (embeddings and Linear weights); biases and norms are never decayed."""
    momentum: float = field(default=0.9, metadata=_range(ge=0.0, le=1.0))
    """SGD momentum."""
    beta1: float = field(default=0.9, metadata=_range(ge=0.0, le=1.0))
    """Adam β1."""
    beta2: float = field(default=0.95, metadata=_range(ge=0.0, le=1.0))
    """Adam β2."""
    micro_batch_size: int = field(default=32, metadata=_range(ge=1))
    """Sequences per forward/backward pass (per worker)."""
    accumulation_steps: int = field(default=1, metadata=_range(ge=1))
    """Micro-batches accumulated per optimizer step; effective batch = micro_batch_size·accumulation_steps·workers."""
    steps: int = field(default=1000, metadata=_range(ge=1))
    """Optimizer steps to run (ignored when epochs is set)."""
    epochs: float = field(default=0.0, metadata=_range(ge=0.0))
    """When > 0, train for this many passes over the training tokens instead of `steps`."""
    eval_interval: int = field(default=100, metadata=_range(ge=1))
    """Optimizer steps between validation passes (and checkpoints); the last step is always evaluated."""
    eval_batches: int = field(default=20, metadata=_range(ge=1))
    """Micro-batches per validation pass (when eval_sequences is 0)."""
    eval_sequences: int = field(default=0, metadata=_range(ge=0))
    """Validation sequences per pass: the first ones of the validation split, the same text for every
    micro-batch size and worker count (run in micro-batches, the last one padded with ignored targets).
    0 = eval_batches·micro_batch_size·workers, which changes with the micro-batch; a sweep over the
    micro-batch sets it, so that all its trials are scored on the same text."""
    log_interval: int = field(default=10, metadata=_range(ge=1))
    """Optimizer steps between training metric reports (loss, lr, tokens_per_s, grad norms)."""
    measure_interval: int = field(default=50, metadata=_range(ge=0))
    """Optimizer steps between gradient-coherence / noise-scale measurements; 0 turns them off."""
    sample_interval: int = field(default=0, metadata=_range(ge=0))
    """Optimizer steps between generated text samples; 0 means only at the end."""
    grad_clip: float = field(default=1.0, metadata=_range(ge=0.0))
    """Clip the global gradient norm to this value; 0 turns clipping off."""
    seed: int = 1337
    """Seed for parameters, data order and dropout."""
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """Autocast dtype for forward/backward (parameters and optimizer state stay float32)."""
    compile: bool = True
    """Wrap the model in torch.compile."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    """torch.compile mode."""
    ac_budget: float = field(default=1.0, metadata=_range(ge=0.0, le=1.0))
    """Activation-memory budget (1 = keep every activation, no recomputation), applied in ac_mode: with
    compile ("budget") it is the partitioner's torch._functorch.config.activation_memory_budget for each
    compiled block; without ("blocks") round((1-ac_budget)·n_layer) blocks are checkpointed. A locked value
    measured in one mode is not applied in the other (the run keeps 1.0 and --describe says why)."""
    compile_warmup_steps: int = field(default=3, metadata=_range(ge=0))
    """Leading steps excluded from avg_step_time_ms; peak memory is reset after them."""
    divergence_factor: float = field(default=3.0, metadata=_range(gt=1.0))
    """End the run as diverged when the loss is non-finite or exceeds this multiple of its first value."""
    checkpoint: bool = True
    """Save a checkpoint at every eval (needs an output directory)."""

    @property
    def ac_mode(self) -> Literal["budget", "blocks"]:
        """How ac_budget is applied (lmtune.training.parallelize): the compile partitioner's memory ``budget``, or
        eager checkpointed ``blocks``. Derived from compile; reported with every budget."""
        return "budget" if self.compile else "blocks"


@dataclass
class SystemConfig:
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train: auto picks CUDA when available."""
    memory_limit_gib: float = field(default=0.0, metadata=_range(ge=0.0))
    """Emulate a smaller device (0 = off): CUDA via per-process memory fraction, CPU by ending the probed step whose
    peak of live tensor bytes crosses it as an OOM."""
    threads: int = field(default=0, metadata=_range(ge=0))
    """torch intra-op threads on CPU; 0 leaves torch's default."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    system: SystemConfig = field(default_factory=SystemConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``{"section.key": value}`` for every key."""
        return {f"{s}.{k}": v for s, sec in self.to_dict().items() for k, v in sec.items()}

    def get(self, key: str) -> Any:
        section, name = _split_key(key)
        return getattr(getattr(self, section), name)


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "system": SystemConfig}


def all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _field(key: str) -> dataclasses.Field:
    section, name = _split_key(key)
    for f in dataclasses.fields(SECTIONS[section]):
        if f.name == name:
            return f
    raise ConfigError(_unknown_key_message(key))


def _split_key(key: str) -> tuple[str, str]:
    section, dot, name = key.partition(".")
    if not dot or section not in SECTIONS or "." in name:
        raise ConfigError(_unknown_key_message(key))
    return section, name


def _unknown_key_message(key: str) -> str:
    import difflib

    close = difflib.get_close_matches(key, all_keys(), n=3, cutoff=0.6)
    section = key.partition(".")[0]
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    if section in SECTIONS:
        keys = ", ".join(f.name for f in dataclasses.fields(SECTIONS[section]))
        return f"unknown config key '{key}'.{hint} Keys of [{section}]: {keys}."
    return f"unknown config key '{key}'.{hint} Keys are section.key with sections {', '.join(SECTIONS)}."


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def accepted(key: str) -> str:
    """Human description of what a key accepts."""
    f = _field(key)
    tp = _hints(SECTIONS[key.split(".")[0]])[f.name]
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    desc = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp)
    if desc is None:
        desc = "a list of strings"
    bounds = []
    m = f.metadata
    if m.get("ge") is not None:
        bounds.append(f">= {m['ge']}")
    if m.get("gt") is not None:
        bounds.append(f"> {m['gt']}")
    if m.get("le") is not None:
        bounds.append(f"<= {m['le']}")
    return desc + (f" ({', '.join(bounds)})" if bounds else "")


def coerce(key: str, value: Any) -> Any:
    """Convert ``value`` (a TOML value or a command-line string) to the key's type, or raise ConfigError."""
    f = _field(key)
    tp = _hints(SECTIONS[key.split(".")[0]])[f.name]
    shown = value if isinstance(value, str) else repr(value)
    bad = ConfigError(f"{key}={shown} is not accepted: expected {accepted(key)}.")
    from_cli = isinstance(value, str)
    if typing.get_origin(tp) is Literal:
        if value not in typing.get_args(tp):
            raise bad
        out = value
    elif tp is bool:
        if isinstance(value, bool):
            out = value
        elif from_cli and value.lower() in ("true", "1", "yes", "on"):
            out = True
        elif from_cli and value.lower() in ("false", "0", "no", "off"):
            out = False
        else:
            raise bad
    elif tp is int:
        if isinstance(value, bool):
            raise bad
        try:
            out = int(value) if from_cli else value
        except ValueError:
            raise bad from None
        if not isinstance(out, int):
            raise bad
    elif tp is float:
        if isinstance(value, bool):
            raise bad
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise bad from None
        if not math.isfinite(out):  # nan and ±inf pass every range check below
            raise ConfigError(f"{key}={shown} is not accepted: expected a finite number"
                              f"{accepted(key).removeprefix('a number')}.")
    elif tp is str:
        if not isinstance(value, str):
            raise bad
        out = value
    else:  # list[str]
        if from_cli:
            out = [v for v in value.split(",") if v]
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            out = list(value)
        else:
            raise bad
    m = f.metadata
    if isinstance(out, (int, float)) and not isinstance(out, bool):
        if (m.get("ge") is not None and out < m["ge"]) or (m.get("gt") is not None and out <= m["gt"]) or (
            m.get("le") is not None and out > m["le"]
        ):
            raise bad
    return out


def apply(cfg: Config, updates: dict[str, Any], source: str = "") -> Config:
    """Return a copy of ``cfg`` with flat ``{"section.key": value}`` updates applied and type-checked."""
    out = dataclasses.replace(cfg, **{s: dataclasses.replace(getattr(cfg, s)) for s in SECTIONS})
    for key, value in updates.items():
        try:
            v = coerce(key, value)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}" if source else str(e)) from None
        section, name = _split_key(key)
        setattr(getattr(out, section), name, v)
    return out


def parse_overrides(args: list[str]) -> dict[str, str]:
    """``["train.lr=1e-3", ...]`` → ``{"train.lr": "1e-3"}``; keys are checked, values stay strings."""
    out: dict[str, str] = {}
    for arg in args:
        key, eq, value = arg.partition("=")
        if not eq:
            raise ConfigError(f"cannot read '{arg}': overrides are section.key=value, e.g. train.lr=3e-4.")
        _field(key.strip())
        out[key.strip()] = value.strip()
    return out


def flatten_toml(doc: dict[str, Any], source: str) -> dict[str, Any]:
    """TOML ``[section] key = value`` → flat keys. A ``[provenance]`` table is metadata and skipped."""
    flat: dict[str, Any] = {}
    for section, table in doc.items():
        if section in ("provenance", "meta"):
            continue
        if section not in SECTIONS or not isinstance(table, dict):
            raise ConfigError(f"{source}: unknown section [{section}]; sections are {', '.join(SECTIONS)}.")
        for k, v in table.items():
            flat[f"{section}.{k}"] = v
    for key in flat:
        try:
            _field(key)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
    return flat


def read_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        if p.suffix != ".toml":
            raise ConfigError(f"'{p}' is neither a config file (FILE.toml) nor an override (section.key=value).")
        raise ConfigError(f"config file not found: {p}")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML ({e}).") from None


def locked_files(explicit: str | Path | None = None) -> list[Path]:
    """The locked-defaults files in force, lowest priority first."""
    files = [SHIPPED_LOCKED]
    if PROJECT_LOCKED.is_file():
        files.append(PROJECT_LOCKED.resolve())
    named = explicit or os.environ.get(LOCKED_ENV)
    if named:
        p = Path(named)
        if not p.is_file():
            raise ConfigError(f"locked-defaults file not found: {p}")
        files.append(p.resolve())
    return files


@dataclass
class Layer:
    """One source of config values, lowest priority first in :func:`layers`."""

    name: str
    """Where the values come from, as --describe shows it: ``locked lmtune/locked_defaults.toml``, ``file x.toml``,
    ``command line``."""
    values: dict[str, Any]
    provenance: dict[str, dict[str, Any]] = field(default_factory=dict)
    error_prefix: str = ""


def layers(files: list[str | Path] = (), overrides: dict[str, Any] | list[str] | None = None, *,
           locked: str | Path | None | Literal[False] = None) -> list[Layer]:
    """The locked-defaults files in force, the config files, then the overrides (later wins)."""
    out = []
    for path in [] if locked is False else locked_files(locked):
        doc = read_toml(path)
        out.append(Layer(f"locked {_shown(path)}", flatten_toml(doc, str(path)), doc.get("provenance") or {}, str(path)))
    for path in map(Path, files):
        out.append(Layer(f"file {path}", flatten_toml(read_toml(path), str(path)), error_prefix=str(path)))
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    if overrides:
        out.append(Layer("command line", dict(overrides)))
    return out


def _shown(path: Path) -> str:
    """A path relative to the working directory or to lmtune's package when under either."""
    path = Path(path).resolve()
    for root, prefix in ((Path.cwd(), ""), (SHIPPED_LOCKED.parent.parent, "")):
        try:
            return prefix + str(path.relative_to(root))
        except ValueError:
            continue
    return str(path)


def resolve(
    files: list[str | Path] = (),
    overrides: dict[str, Any] | list[str] | None = None,
    *,
    locked: str | Path | None | Literal[False] = None,
) -> tuple[Config, dict[str, str]]:
    """The config and, for every key, the layer its value comes from (``built-in`` for the defaults).

    A locked value whose provenance names the ``ac_mode`` it was measured in (``[provenance."train.ac_budget"]
    ac_mode = "budget"``) is applied only to runs in that mode: the compile partitioner's budget 0.75 would
    otherwise checkpoint a quarter of the blocks of every eager run. The layer below it then decides, and
    the source says so.
    """
    stack = layers(files, overrides, locked=locked)
    skipped: dict[tuple[int, str], str] = {}
    while True:
        cfg, sources = Config(), {k: "built-in" for k in all_keys()}
        for i, layer in enumerate(stack):
            updates = {k: v for k, v in layer.values.items() if (i, k) not in skipped}
            cfg = apply(cfg, updates, layer.error_prefix)
            sources.update({k: layer.name for k in updates})
        mismatched = None
        for i, layer in enumerate(stack):
            for key, record in layer.provenance.items():
                mode = record.get("ac_mode") if isinstance(record, dict) else None
                if (key in layer.values and (i, key) not in skipped and sources.get(key) == layer.name
                        and mode and mode != cfg.train.ac_mode):
                    mismatched = (i, key, mode)
        if mismatched is None:
            break
        i, key, mode = mismatched
        skipped[(i, key)] = (f"the {stack[i].name} value {stack[i].values[key]!r} was measured with ac_mode={mode}, "
                             f"not applied to this {cfg.train.ac_mode}-mode run")
    for (i, key), why in skipped.items():
        sources[key] = f"{sources[key]} ({why})"
    validate(cfg)
    return cfg, sources


def load(
    files: list[str | Path] = (),
    overrides: dict[str, Any] | list[str] | None = None,
    *,
    locked: str | Path | None | Literal[False] = None,
) -> Config:
    """Resolve a config: defaults < locked defaults < files < overrides, then validate.

    ``locked=False`` skips every locked-defaults file (the bare dataclass defaults).
    """
    return resolve(files, overrides, locked=locked)[0]


def from_flat(flat: dict[str, Any]) -> Config:
    """Rebuild a Config from :meth:`Config.flat` output (e.g. a summary.json or a Tune trial config)."""
    cfg = apply(Config(), flat)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks (single fields are checked as they are set)."""
    m, d = cfg.model, cfg.data
    if m.n_embd % m.n_head:
        raise ConfigError(f"model.n_embd={m.n_embd} must be divisible by model.n_head={m.n_head}.")
    if d.seq_len > m.block_size:
        raise ConfigError(f"data.seq_len={d.seq_len} is above model.block_size={m.block_size}; "
                          f"accepted: data.seq_len <= model.block_size.")
    if d.dataset == "files" and not d.files:
        raise ConfigError("data.dataset='files' needs data.files (paths or globs of .txt/.jsonl/.parquet files).")
    if d.dataset != "files" and (d.files or d.val_files):
        raise ConfigError(f"data.files/data.val_files are only read with data.dataset='files' (got '{d.dataset}').")


def provenance(path: str | Path) -> dict[str, dict[str, Any]]:
    """The ``[provenance."section.key"]`` records of a locked-defaults file."""
    return read_toml(path).get("provenance", {})


def describe(cfg: Config | None = None, sources: dict[str, str] | None = None) -> str:
    """Every key with its type and documentation; with ``cfg``, the value a run will use and the layer it comes
    from (built-in, a locked-defaults file, a config file, the command line), else the built-in default."""
    lines = []
    values = (cfg or Config()).flat()
    for section, cls in SECTIONS.items():
        docs = _attribute_docs(cls)
        lines.append(f"[{section}]")
        for f in dataclasses.fields(cls):
            key = f"{section}.{f.name}"
            where = f"   <- {sources.get(key, 'built-in')}" if sources is not None else ""
            lines.append(f"  {key} = {values[key]!r}   ({accepted(key)}){where}")
            if f.name in docs:
                lines.append("      " + " ".join(docs[f.name].split()))
    return "\n".join(lines)


def _attribute_docs(cls: type) -> dict[str, str]:
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for prev, node in zip(body, body[1:]):
        if (isinstance(prev, ast.AnnAssign) and isinstance(node, ast.Expr)
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
            docs[prev.target.id] = node.value.value
    return docs
