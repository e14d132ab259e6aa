"""Pretraining and fine-tuning configuration: typed schemas, YAML recipes and NeMo-style dotted overrides.

A recipe is a YAML file merged over the schema below; ``key.sub=value`` overrides are merged last.
Unknown keys and values of the wrong type fail before anything runs, with the key named.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from streamssl.nn.presets import PRESETS

_PACKAGE_DIR = Path(__file__).resolve().parent


_SMALL = PRESETS["small"]  # the schema's encoder defaults are the small preset's sizes


@dataclass
class EncoderConfig:
    """Arguments of streamssl.nn.FastConformerEncoder (defaults: the small preset, nn/presets.py)."""

    feat_in: int = _SMALL["feat_in"]
    d_model: int = _SMALL["d_model"]
    n_layers: int = _SMALL["n_layers"]
    n_heads: int = _SMALL["n_heads"]
    ff_expansion: int = _SMALL["ff_expansion"]
    conv_kernel_size: int = _SMALL["conv_kernel_size"]
    subsampling_factor: int = _SMALL["subsampling_factor"]
    subsampling_channels: int = _SMALL["subsampling_channels"]
    # [left, right] in encoder frames, or a list of such pairs for multi-latency training.
    att_context_size: Any = field(default_factory=lambda: [-1, 0])
    att_context_style: str = "chunked_limited"
    dropout: float = _SMALL["dropout"]


@dataclass
class FeaturesConfig:
    sample_rate: int = 16000
    n_mels: int = 80
    win_length: int = 400
    hop_length: int = 160
    n_fft: int = 512
    preemph: float = 0.97
    dither: float = 1e-5
    # Encoder input: "none" (streaming-safe) or "global". Targets always use "per_utterance".
    normalize: str = "none"
    # normalize=global: a statistics file from `streamssl compute-stats`; null: computed from the
    # training manifest at the start of a fresh run and written to <out>/feature_stats.json.
    stats: Optional[str] = None


@dataclass
class MaskingConfig:
    mask_prob: float = 0.01
    block_size: int = 40
    min_start: int = 16
    # Window of the max_mask_ratio cap in feature frames; -1: the whole prefix. Streaming recipes
    # with a limited attention left context set it to that context in feature frames.
    left_context: int = -1
    max_mask_ratio: float = 0.8
    align: int = 1
    # An encoder frame is a prediction target when this fraction of its input frames is masked.
    target_threshold: float = 0.8
    learnable_embedding: bool = False


@dataclass
class QuantizerConfig:
    num_codes: int = 8192
    code_dim: int = 16
    num_codebooks: int = 1


@dataclass
class AugmentConfig:
    prob: float = 0.5
    noise_ratio: float = 0.5
    noise_snr: List[float] = field(default_factory=lambda: [-5.0, 20.0])
    speech_snr: List[float] = field(default_factory=lambda: [-5.0, 5.0])
    segment_ratio: float = 0.5


@dataclass
class ObjectiveConfig:
    # masked: predict the tokens of masked blocks (NEST / BEST-RQ). next_token: predict the tokens
    # `offsets` encoder frames ahead of every frame, nothing masked (NEST-RQ).
    kind: str = "masked"
    offsets: List[int] = field(default_factory=lambda: [1, 2, 3])
    # Start the head's bias at the targets' unigram distribution (counted on the training data).
    head_prior: bool = True


@dataclass
class ModelConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)


@dataclass
class AudioDataConfig:
    """What every task reads: manifests, the embedded corpus's location, batching, filters."""

    # None: the embedded demo corpus, written on first use into demo_dir.
    train_manifest: Optional[Any] = None  # a path or a list of paths
    val_manifest: Optional[str] = None
    demo_dir: Optional[str] = None  # default: <out>/demo_data
    batch_seconds: float = 60.0
    min_duration: float = 0.5
    max_duration: float = 20.0
    num_workers: int = 2
    strict: bool = False  # True: a corrupt audio file stops training


@dataclass
class DataConfig(AudioDataConfig):
    train_weights: Optional[List[float]] = None
    noise_manifest: Optional[str] = None
    # The embedded corpus used when train_manifest is null: "speech" (spoken commands in many
    # eSpeak NG voices, with transcripts) or "phones" (the tiny synthetic phone corpus).
    demo_corpus: str = "speech"
    # Tar shards in NeMo's tarred layout: a pattern such as /data/audio__OP_0..511_CL_.tar (or
    # {0..511}, or a list of patterns); train_manifest is then their tarred manifest (members'
    # names, durations, shard_id), as `streamssl shard` writes. Read shard by shard, streaming.
    train_tarred_audio_filepaths: Optional[Any] = None
    shuffle_buffer: int = 1000  # tar shards: utterances shuffled together (bounds reader memory)
    # Instead of train_manifest: a Lhotse cut set (cuts.jsonl.gz; needs the optional lhotse
    # package), or a Lhotse Shar directory (read as tar shards, like train_tarred_audio_filepaths).
    train_cuts: Optional[str] = None


@dataclass
class OptimConfig:
    lr: float = 2e-3  # peak learning rate, reached at the end of warm-up
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    weight_decay: float = 1e-3
    warmup_steps: int = 1000
    min_lr: float = 1e-6


@dataclass
class TrainerConfig:
    max_steps: int = 100000
    log_every: int = 50
    ckpt_every: int = 1000
    val_every: int = 1000
    max_val_batches: int = 50
    seed: int = 1234
    grad_clip: float = 1.0
    accumulate_grad_batches: int = 1
    keep_last: int = 3
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 (also on CPU: AMX) | fp32
    progress: bool = True  # tqdm bar on rank 0
    # Steps whose gradient is NaN/inf are skipped; this many in a row stop the run.
    max_nonfinite_steps: int = 10
    # CPU runs keep freed host memory in the process (glibc's mmap/trim thresholds raised), so
    # each step reuses its large activation buffers instead of page-faulting them again.
    keep_host_memory: bool = True


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


@dataclass
class TokenizerConfig:
    vocab_size: int = 128  # sentencepiece pieces (the CTC blank comes on top)
    type: str = "bpe"  # bpe | unigram


@dataclass
class SpecAugmentConfig:
    freq_masks: int = 2
    freq_width: int = 15
    time_masks: int = 2
    time_width: float = 0.05  # < 1: a fraction of the utterance; >= 1: frames


@dataclass
class FinetuneModelConfig:
    # Without --init: the architecture (encoder and features) of this pretraining recipe, so a
    # scratch baseline is the same network as the pretrained one. With --init: the init's.
    pretrain_recipe: Optional[str] = None
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    specaugment: SpecAugmentConfig = field(default_factory=SpecAugmentConfig)


@dataclass
class FinetuneDataConfig(AudioDataConfig):
    """Manifests with `text`; train_manifest None: the transcribed part of the embedded speech corpus."""


@dataclass
class FinetuneOptimConfig(OptimConfig):
    # The encoder's learning rate is held at 0 for these first steps (the head learns alone).
    freeze_encoder_steps: int = 0


@dataclass
class FinetuneConfig:
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


class ConfigError(ValueError):
    """A recipe or an override is invalid; the message names the key."""


def recipe_dir() -> Path:
    """Where the bundled recipes live: ``streamssl/_configs`` in a wheel, ``configs/`` in a checkout."""
    for candidate in (_PACKAGE_DIR / "_configs", _PACKAGE_DIR.parent / "configs"):
        if (candidate / "demo.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"streamssl's recipes were not found next to {_PACKAGE_DIR}")


def resolve_recipe(name_or_path: str | None, default: str = "demo") -> Path:
    """A recipe path from a path or a bundled recipe name ("demo", "small", ...); None is ``default``."""
    if name_or_path is None:
        return recipe_dir() / f"{default}.yaml"
    p = Path(name_or_path)
    if p.is_file():
        return p
    bundled = recipe_dir() / f"{name_or_path}.yaml"
    if bundled.is_file():
        return bundled
    names = sorted(q.stem for q in recipe_dir().glob("*.yaml"))
    raise ConfigError(f"config {name_or_path!r}: no such file, and not a bundled recipe ({', '.join(names)})")


def _recipe_chain(path: Path) -> list[Path]:
    """The recipe and its ``base:`` ancestors, oldest first (a variant states only what differs)."""
    chain: list[Path] = []
    while True:
        if path in chain:
            raise ConfigError(f"{path}: 'base' chain loops back to itself")
        chain.append(path)
        try:
            base = OmegaConf.load(path).get("base")
        except Exception as e:
            raise ConfigError(f"{path}: cannot parse: {e}") from e
        if base is None:
            return chain[::-1]
        candidate = path.parent / f"{base}" if str(base).endswith(".yaml") else path.parent / f"{base}.yaml"
        path = candidate if candidate.is_file() else resolve_recipe(str(base))


def _all_keys(node, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(node, DictConfig):
        for k in node.keys():
            full = f"{prefix}{k}"
            keys.append(full)
            keys += _all_keys(node._get_node(k), full + ".")
    return keys


def _explain(err: OmegaConfBaseException, schema: DictConfig, where: str) -> ConfigError:
    key = getattr(err, "full_key", None) or ""
    msg = getattr(err, "msg", None) or str(err).splitlines()[0]
    if "not in struct" in str(err) or "Missing key" in str(err) or "Key '" in str(err):
        close = difflib.get_close_matches(key, _all_keys(schema), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return ConfigError(f"{where}: unknown config key {key!r}{hint}")
    return ConfigError(f"{where}: bad value for {key!r}: {msg}")


def load_config(recipe: str | None = None, overrides: list[str] | None = None) -> DictConfig:
    """The resolved pretraining config.

    Args:
        recipe: a YAML path or a bundled recipe name; None means the demo recipe.
        overrides: ``["trainer.max_steps=100", "model.encoder.att_context_size=[16,0]", ...]``.
    Returns:
        a read-only DictConfig with every key of the schema.
    Raises:
        ConfigError naming the bad key (unknown key, wrong type, malformed override).
    """
    cfg = _load(PretrainConfig, resolve_recipe(recipe), overrides)
    _validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def load_finetune_config(recipe: str | None = None, overrides: list[str] | None = None) -> DictConfig:
    """The resolved fine-tuning config (default recipe: finetune_demo); arguments as ``load_config``.

    When the recipe names ``model.pretrain_recipe``, that recipe's ``model.encoder`` and
    ``model.features`` come first and the fine-tuning recipe and overrides go over them.
    """
    path = resolve_recipe(recipe, default="finetune_demo")
    base = None
    probe = _load(FinetuneConfig, path, overrides)
    if probe.model.pretrain_recipe:
        pre = load_config(probe.model.pretrain_recipe)
        base = {"model": {"encoder": OmegaConf.to_container(pre.model.encoder),
                          "features": OmegaConf.to_container(pre.model.features)}}
    cfg = _load(FinetuneConfig, path, overrides, base=base)
    _validate_finetune(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _load(schema_cls, recipe_path: Path, overrides, base: dict | None = None) -> DictConfig:
    schema = OmegaConf.structured(schema_cls)
    cfg = OmegaConf.merge(schema, base) if base else schema
    for path in _recipe_chain(recipe_path):
        try:
            layer = OmegaConf.load(path)
        except Exception as e:  # YAML syntax errors carry their line
            raise ConfigError(f"{path}: cannot parse: {e}") from e
        layer.pop("base", None)
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as e:
            raise _explain(e, schema, str(path)) from e
    for item in overrides or []:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as e:
            raise _explain(e, schema, f"override {item!r}") from e
    return cfg


def _need(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def _validate_common(cfg: DictConfig) -> None:
    """Checks shared by pretraining and fine-tuning configs: trainer, optim, data sizes, features."""
    need = _need
    t, o, d, m = cfg.trainer, cfg.optim, cfg.data, cfg.model
    need(t.max_steps >= 1, "trainer.max_steps", "must be >= 1")
    for k in ("log_every", "ckpt_every", "val_every", "accumulate_grad_batches", "keep_last", "max_nonfinite_steps"):
        need(t[k] >= 1, f"trainer.{k}", "must be >= 1")
    need(t.device in ("auto", "cpu", "cuda"), "trainer.device", "must be auto, cpu or cuda")
    need(t.precision in ("auto", "bf16", "fp32"), "trainer.precision", "must be auto, bf16 or fp32")
    need(o.lr > 0, "optim.lr", "must be > 0")
    need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", "must be two numbers in [0, 1)")
    need(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    need(d.batch_seconds > 0, "data.batch_seconds", "must be > 0")
    need(d.num_workers >= 0, "data.num_workers", "must be >= 0")
    need(m.features.normalize in ("none", "global"), "model.features.normalize",
         "must be none or global (per_utterance needs the future: it is for targets only)")
    need(not m.features.stats or m.features.normalize == "global", "model.features.stats",
         "is read only with model.features.normalize=global (set it, or drop the statistics file)")
    need(m.features.n_mels == m.encoder.feat_in, "model.encoder.feat_in",
         f"must equal model.features.n_mels ({m.features.n_mels})")
    ctx = OmegaConf.to_container(m.encoder.att_context_size)
    pairs = ctx if ctx and isinstance(ctx[0], list) else [ctx]
    need(all(isinstance(p, list) and len(p) == 2 and all(isinstance(v, int) for v in p) for p in pairs),
         "model.encoder.att_context_size", f"must be [left, right] or a list of them, got {ctx}")


def _validate_finetune(cfg: DictConfig) -> None:
    _validate_common(cfg)
    m, o = cfg.model, cfg.optim
    _need(m.tokenizer.vocab_size >= 2, "model.tokenizer.vocab_size", "must be >= 2")
    _need(m.tokenizer.type in ("bpe", "unigram"), "model.tokenizer.type", "must be bpe or unigram")
    _need(o.freeze_encoder_steps >= 0, "optim.freeze_encoder_steps", "must be >= 0")
    for k in ("freq_masks", "freq_width", "time_masks"):
        _need(m.specaugment[k] >= 0, f"model.specaugment.{k}", "must be >= 0")
    _need(m.specaugment.time_width >= 0, "model.specaugment.time_width", "must be >= 0")


def _validate(cfg: DictConfig) -> None:
    _validate_common(cfg)
    m, d = cfg.model, cfg.data
    need = _need
    need(d.demo_corpus in ("speech", "phones"), "data.demo_corpus", "must be speech or phones")
    need(d.shuffle_buffer >= 1, "data.shuffle_buffer", "must be >= 1")
    need(not d.train_tarred_audio_filepaths or (not OmegaConf.is_missing(d, "train_manifest")
                                                 and bool(as_list(d.train_manifest))),
         "data.train_tarred_audio_filepaths", "needs data.train_manifest: the shards' tarred manifest")
    need(not d.train_cuts or not d.train_tarred_audio_filepaths, "data.train_cuts",
         "give either a Lhotse cut set or tar shards (data.train_tarred_audio_filepaths), not both")
    need(not d.train_cuts or OmegaConf.is_missing(d, "train_manifest") or not as_list(d.train_manifest),
         "data.train_cuts", "give either a Lhotse cut set or data.train_manifest, not both")
    need(m.objective.kind in ("masked", "next_token"), "model.objective.kind", "must be masked or next_token")
    need(len(m.objective.offsets) > 0 and all(k >= 1 for k in m.objective.offsets), "model.objective.offsets",
         "must be a non-empty list of ints >= 1")
    need(0 < m.masking.target_threshold <= 1, "model.masking.target_threshold", "must be in (0, 1]")


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def as_list(value) -> list:
    """A config value that may be a scalar or a list, as a Python list."""
    if value is None:
        return []
    if isinstance(value, (ListConfig, list, tuple)):
        return list(value)
    return [value]
