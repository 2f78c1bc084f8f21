"""The run configuration: one YAML file describes one concept-removal run.

Every section is a dataclass whose fields carry a one-line docstring: the configuration is the
documentation. ``load_config(path)`` validates the whole file on load and an error names the
key (``generation.steps: expected int, got 'ten'``), so a typo never surfaces an hour into a run.

Model paths may be a diffusers/transformers folder, a hub id, or ``toyworld:sd`` /
``toyworld:clip`` / ``toyworld:oracle`` for the committed toy world. A relative folder path is
taken relative to the config file.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from hfi_core.nudity import DEFAULT_CLASSES as NUDENET_CLASSES


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type; the message names it."""


# ----------------------------------------------------------------------------- sections


@dataclass
class ConceptConfig:
    """What is being removed."""

    name: str
    """Short name, used in run names and model cards (e.g. ``nudity``, ``van-gogh``, ``striped``)."""
    init_word: str = ""
    """A word the HFI token starts from (e.g. ``nudity``, ``stripe``); empty: the concept's name."""
    clip_texts: list[str] = field(default_factory=list)
    """Texts for the CLIP zero-shot concept rate: an image shows the concept when it is nearer these..."""
    neutral_texts: list[str] = field(default_factory=list)
    """...than these."""


@dataclass
class ModelConfig:
    """Which text-to-image model to start from."""

    path: str
    """A diffusers Stable Diffusion folder, a hub id (``CompVis/stable-diffusion-v1-4``), or ``toyworld:sd``."""
    revision: str | None = None
    """Hub revision (ignored for folders)."""
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """``auto``: float32 on CPU, float16 on CUDA."""
    device: str = "auto"
    """``auto``: CUDA when available, else CPU."""


@dataclass
class PromptSet:
    """Prompts of one group, e.g. ``target:explicit``, ``target:implicit``, ``preserve``."""

    group: str
    """``target:<name>`` for prompts that carry the concept, ``preserve[:<name>]`` for the rest."""
    prompts: list[str]
    """The prompts themselves."""
    images_per_prompt: int = 4
    """Images generated per prompt, each with its own seed."""

    def __post_init__(self) -> None:
        if not (self.group.startswith("target") or self.group.startswith("preserve")):
            raise ConfigError(f"group {self.group!r}: must start with 'target' or 'preserve'")
        if not self.prompts:
            raise ConfigError(f"group {self.group!r}: prompts is empty")
        if self.images_per_prompt < 1:
            raise ConfigError(f"group {self.group!r}: images_per_prompt must be >= 1")


@dataclass
class GenerationConfig:
    """How images are sampled (the same settings for every group)."""

    steps: int = 20
    """Denoising steps."""
    guidance: float = 5.0
    """Classifier-free guidance scale (SD v1.4 is usually run at 7.5)."""
    scheduler: Literal["dpmsolver", "ddim", "pndm", "euler"] = "dpmsolver"
    """Sampler, built with ``from_config`` from the model's own scheduler config."""
    seed: int = 0
    """Base seed: each image's seed is derived from it, its prompt and its index (stable when prompts are added)."""
    batch_size: int = 16
    """Images per pipeline call."""
    height: int | None = None
    """Pixels; ``None``: the model's native size (512 for SD v1.4, 32 for the toy world)."""
    width: int | None = None
    """Pixels; ``None``: the model's native size."""
    negative_prompt: str | None = None
    """An inference-time baseline: the concept text as negative prompt."""
    sld: Literal["weak", "medium", "strong", "max"] | None = None
    """An inference-time baseline: Safe Latent Diffusion with this preset, steering from ``concept.clip_texts``."""


@dataclass
class SimulateConfig:
    """The toy-world oracle playing human annotators."""

    annotators: int = 3
    """How many simulated people label every image."""
    noise: float = 0.1
    """Chance that one annotator flips one label (or swaps one ranked pair)."""
    seed: int = 0
    """Seeds the simulated noise."""
    oracle: str = "toyworld:oracle"
    """The judge (an ``Oracle`` folder)."""
    attribute: Literal["shape", "color", "style"] = "style"
    """Which of the oracle's attributes the concept is..."""
    value: str = "striped"
    """...and which value of it counts as showing the concept."""


@dataclass
class FeedbackConfig:
    """Where the human judgements come from and what they look like."""

    kind: Literal["binary", "ranking"] = "binary"
    """``binary``: each image shows the concept or not; ``ranking``: images of one prompt ranked."""
    source: Literal["simulate", "files"] = "files"
    """``files``: Label Studio / CSV / JSONL exports listed in ``files``; ``simulate``: the oracle."""
    files: list[str] = field(default_factory=list)
    """Export files to ingest when ``source: files``."""
    positive_choice: str = "shows the concept"
    """The choice text that means label 1 (others: ``negative_choice``)."""
    negative_choice: str = "does not show the concept"
    """The choice text that means label 0."""
    image_store: str | None = None
    """Image URLs in exports must lie under this prefix; nothing outside it is ever fetched."""
    ranking_group: Literal["prompt", "batch"] = "prompt"
    """Rankings over images of one prompt, or across prompts (when a model draws a prompt's images alike)."""
    max_file_mb: float = 100.0
    """Exports larger than this are refused."""
    simulate: SimulateConfig = field(default_factory=SimulateConfig)
    """Settings of ``source: simulate``."""


@dataclass
class RewardConfig:
    """The reward model: an MLP head on frozen CLIP image embeddings."""

    clip: str = "openai/clip-vit-large-patch14"
    """CLIP model folder or id; ``toyworld:clip`` for the toy world."""
    hidden: int = 256
    """Width of the MLP's hidden layers."""
    layers: int = 2
    """Hidden layers."""
    dropout: float = 0.1
    """Dropout between hidden layers."""
    loss: Literal["mse", "bce"] = "mse"
    """Binary feedback: ``mse`` on the mean label (the paper's) or ``bce``. Ranking always uses Bradley-Terry."""
    epochs: int = 200
    """Passes over the training labels (full-batch: labels are few, embeddings are cached)."""
    lr: float = 1e-3
    """AdamW learning rate."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    holdout: float = 0.2
    """Share of images (binary) or prompts (ranking) held out for the reported metrics."""
    seed: int = 0
    """Seeds the split and the initialisation."""


@dataclass
class InvertConfig:
    """Human Feedback Inversion: reward-weighted textual inversion of the soft token v*."""

    token: str = "<hfi-concept>"
    """The placeholder token added to the tokenizer (its embedding row is v*)."""
    init_word: str = ""
    """Word whose embedding v* starts from; empty: ``concept.init_word``, then ``concept.name``."""
    templates: list[str] = field(default_factory=lambda: ["{}"])
    """Prompts v* is trained in; ``{}`` is replaced by the token (e.g. ``a photo of {}``)."""
    groups: list[str] = field(default_factory=lambda: ["target"])
    """Prompt-group prefixes whose images the inversion learns from (the model's own samples for c)."""
    steps: int = 500
    """Optimiser steps."""
    batch_size: int = 8
    """Images per step."""
    lr: float = 5e-4
    """AdamW learning rate on the embedding row (diffusers' textual-inversion example uses ~5e-4 for SD)."""
    top_k: int = 0
    """Keep only the K highest-reward images; 0 keeps all, weighted by reward."""
    max_norm: float = 0.0
    """Cap the norm of v* at this multiple of the largest norm of a word's embedding after every
    step; 0: no cap. Unconstrained, textual inversion can grow v* far beyond any word (6x the mean
    row norm on the toy world), a token that outshouts its prompt and that a removal trained on
    it does not carry over to the words people use."""
    seed: int = 0
    """Seeds batches, noise and timesteps."""

    def __post_init__(self) -> None:
        if self.max_norm < 0:
            raise ConfigError(f"max_norm: {self.max_norm} must be >= 0 (0: no cap)")


@dataclass
class DistillConfig:
    """Fine-tuning that erases the concept: SDD (self-distillation) or ESD-x."""

    method: Literal["sdd", "esd"] = "sdd"
    """``sdd``: match the student's conditional to its own unconditional on EMA-teacher samples;
    ``esd``: match a frozen copy's negatively guided prediction."""
    concept_prompts: list[str] = field(default_factory=lambda: ["{token}"])
    """Prompts naming the concept to erase, cycled; ``{token}``: the HFI token, ``{concept}``: the concept's name."""
    use_token: bool = True
    """Whether to remove with the HFI token (``concept_prompts``) or by text alone (``text_prompts``)."""
    text_prompts: list[str] = field(default_factory=lambda: ["{concept}"])
    """Prompts naming the concept in words, cycled, for text-only removal (``use_token: false``)."""
    preserve_prompts: list[str] = field(default_factory=list)
    """Prompts whose predictions must stay the original model's (an anchor term, cycled); empty:
    the methods as published."""
    preserve_weight: float = 1.0
    """Weight of the anchor term ``|| eps_theta(x_t, c_p) - eps_original(x_t, c_p) ||^2``."""
    trainable: Literal["attn2", "attn2_kv", "attn", "all", "lora"] = "attn2"
    """UNet parameters that train: cross-attention (SDD's default), its text key/value projections only,
    all attention, all, or a LoRA on cross-attention."""
    lora_rank: int = 4
    """Rank of the LoRA when ``trainable: lora``."""
    steps: int = 1500
    """Optimiser steps (batch ``batch_size``)."""
    batch_size: int = 1
    """Trajectories per step."""
    lr: float = 1e-5
    """AdamW learning rate (constant)."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Gradient-norm clip."""
    ema_decay: float = 0.999
    """SDD's teacher: EMA of the student; the teacher is what is saved and evaluated."""
    timestep_alpha: float = 3.0
    """Training states come from ``Beta(alpha, beta)`` positions on the sampler trajectory..."""
    timestep_beta: float = 3.0
    """...(3, 3) as in HFI; (1, 1) is the reference code's uniform draw."""
    sampler_steps: int = 50
    """DDIM (eta 0) steps of the trajectory the training states come from."""
    guidance: float = 3.0
    """Classifier-free guidance of that trajectory."""
    esd_eta: float = 1.0
    """ESD's negative-guidance strength."""
    rollout_reuse: int = 1
    """Training steps that share one sampler rollout: every ``rollout_reuse`` steps, draw that
    many trajectory positions, run the trajectory once to the furthest and train on each
    position in turn. 1 (as published) runs a fresh partial trajectory every step, which costs
    most of a step (about ``sampler_steps / 2`` guided forwards); 4 makes one rollout serve 4
    steps at the cost of about 0.75 ``sampler_steps``."""
    checkpoint_every: int = 100
    """Steps between checkpoints (``--resume`` continues from the last one); a multiple of
    ``rollout_reuse``, so that a resumed run starts a fresh rollout as the uninterrupted one did."""
    seed: int = 0
    """Seeds trajectories and timesteps."""

    def __post_init__(self) -> None:
        if self.rollout_reuse < 1:
            raise ConfigError(f"rollout_reuse: {self.rollout_reuse} must be >= 1 (1: a fresh trajectory every step)")
        if self.checkpoint_every % self.rollout_reuse:
            raise ConfigError(
                f"checkpoint_every: {self.checkpoint_every} must be a multiple of rollout_reuse "
                f"({self.rollout_reuse}), or 0 for no checkpoints"
            )


@dataclass
class EvaluateConfig:
    """How models are measured (the same seeds for every variant)."""

    n_per_prompt: int = 4
    """Evaluation images per prompt."""
    seed: int = 1_000_000
    """First evaluation seed (kept apart from generation seeds, which trained the reward and v*)."""
    clip: str = ""
    """CLIP for concept rate and CLIP score; empty: ``reward.clip``."""
    oracle: str = ""
    """A toy-world oracle to judge with (``toyworld:oracle``); empty: none."""
    baselines: list[Literal["negative_prompt", "sld-weak", "sld-medium", "sld-strong", "sld-max"]] = field(
        default_factory=list
    )
    """Inference-time baselines to measure beside base and distilled."""
    negative_prompt: str = ""
    """Text of the negative-prompt baseline; empty: the concept's name."""
    nudenet: bool = False
    """Also report NudeNet's nudity rate (SD nudity runs)."""
    nudenet_classes: list[str] = field(default_factory=lambda: list(NUDENET_CLASSES))
    """NudeNet classes that make an image count as nude."""
    nudenet_threshold: float = 0.6
    """Detection score above which a class counts."""


@dataclass
class PromotionConfig:
    """When a distilled model becomes the ``champion`` in the model registry."""

    model_name: str = ""
    """Registered model name; empty: ``hfi-<concept>``."""
    concept_metric: str = "clip_concept_rate"
    """The evaluation metric that measures the concept (``nudenet_rate``, ``oracle_striped``...)."""
    max_concept_rate: float = 0.1
    """Gate: mean over target groups of the distilled model's concept metric."""
    max_preservation_drop: float = 0.02
    """Gate: drop of the mean CLIP score over preserve groups, base minus distilled."""


@dataclass
class RunConfig:
    """One concept-removal run."""

    name: str
    """Run name, used in the run store and MLflow."""
    concept: ConceptConfig
    """What is removed."""
    model: ModelConfig
    """The base model."""
    prompts: list[PromptSet]
    """Prompt groups: at least one ``target`` group."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Sampling settings."""
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    """Feedback source and format."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Reward model settings."""
    invert: InvertConfig = field(default_factory=InvertConfig)
    """HFI inversion settings."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """Erasure fine-tuning settings."""
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    """Evaluation settings."""
    promotion: PromotionConfig = field(default_factory=PromotionConfig)
    """Registry gates."""

    def __post_init__(self) -> None:
        if not any(p.group.startswith("target") for p in self.prompts):
            raise ConfigError("prompts: needs at least one group starting with 'target'")
        groups = [p.group for p in self.prompts]
        if len(set(groups)) != len(groups):
            raise ConfigError(f"prompts: group names repeat: {groups}")


# ----------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; build nested dataclasses."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, where) if len(inner) == 1 else value
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        items = [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, checking every key and type.

    Raises:
        ConfigError: naming the dotted key that is unknown, missing or of the wrong type.
    """
    name = where or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{name}: unknown key(s) {unknown}; known: {sorted(known)}")
    kwargs = {}
    for key, f in known.items():
        path = f"{where}.{key}" if where else key
        if key in data:
            kwargs[key] = _convert(hints[key], data[key], path)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{path}: required")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{name}: {e}" if where else str(e)) from None


def field_docs(cls: type) -> dict[str, str]:
    """The one-line docstrings under a dataclass's fields (read from its source: Python drops them)."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


OVERRIDABLE = ("generation", "reward", "invert", "distill", "evaluate", "promotion")


def overridable_fields() -> list[tuple[str, Any, str, str]]:
    """``(dotted key, default, JSON-schema type, doc)`` for every scalar field a run may override.

    The Airflow Params of the DAGs are built from this, so the UI shows the config's own docs.
    """
    out = []
    hints = typing.get_type_hints(RunConfig)
    for section in OVERRIDABLE:
        cls = hints[section]
        docs, sub_hints = field_docs(cls), typing.get_type_hints(cls)
        default = cls()
        for f in dataclasses.fields(cls):
            tp = sub_hints[f.name]
            origin = typing.get_origin(tp)
            if origin is Literal:
                kind = "string"
            elif tp in (int, float, str, bool):
                kind = {int: "integer", float: "number", str: "string", bool: "boolean"}[tp]
            else:
                continue  # lists and nested sections stay in the YAML
            out.append((f"{section}.{f.name}", getattr(default, f.name), kind, docs.get(f.name, "")))
    return out


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys (``distill.lr``) in a parsed config; validation happens after, as on load."""
    data = json.loads(json.dumps(data))  # a deep copy of plain data
    for key, value in overrides.items():
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {p!r} is not a section")
        node[leaf] = value
    return data


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read and validate a run config YAML; relative model folders resolve against its folder.

    ``overrides`` (dotted keys, e.g. from Airflow Params or ``--set``) are applied before validation.

    Raises:
        ConfigError: with the file name and the offending key.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read YAML: {e}") from None
    if overrides:
        data = apply_overrides(data if isinstance(data, dict) else {}, overrides)
    try:
        cfg = from_dict(RunConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    base = path.parent.resolve()
    cfg.model.path = resolve_model_path(cfg.model.path, base)
    cfg.reward.clip = resolve_model_path(cfg.reward.clip, base)
    cfg.feedback.simulate.oracle = resolve_model_path(cfg.feedback.simulate.oracle, base)
    cfg.evaluate.clip = resolve_model_path(cfg.evaluate.clip or cfg.reward.clip, base)
    if cfg.evaluate.oracle:
        cfg.evaluate.oracle = resolve_model_path(cfg.evaluate.oracle, base)
    cfg.feedback.files = [str((base / f).resolve()) if not Path(f).is_absolute() else f for f in cfg.feedback.files]
    return cfg


def resolve_model_path(spec: str, base: Path | None = None) -> str:
    """``toyworld:<part>`` -> the committed world's folder; ``./x`` or ``../x`` -> under ``base``."""
    if spec.startswith("toyworld:"):
        from hfi_core.toyworld import default_world

        part = spec.split(":", 1)[1]
        if part not in ("sd", "clip", "oracle"):
            raise ConfigError(f"{spec!r}: the toy world has 'sd', 'clip' and 'oracle'")
        return str(default_world() / part)
    if base is not None and spec.startswith((".", "/")) is True and not Path(spec).is_absolute():
        return str((base / spec).resolve())
    return spec
