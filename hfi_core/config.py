"""The run configuration: one YAML file describes one concept-removal run.

Every section is a pydantic model whose fields carry a one-line docstring: the configuration is
the documentation (the docstrings become the JSON schema's descriptions, which the Airflow
Params and ``--help`` show). ``load_config(path)`` validates the whole file on load, ranges
included, and an error names the file and the dotted key (``generation.steps: expected int, got
'ten'``), so a typo never surfaces an hour into a run.

Defaults that follow from other fields (the token's starting word, the negative prompt, SLD's
concept, the evaluation CLIP, the registered model's name) are resolved here, once, at load.

Model paths may be a diffusers/transformers folder, a hub id, ``toyworld:sd`` /
``toyworld:clip`` / ``toyworld:oracle`` for the committed toy world, or ``sd14:sd`` /
``sd14:clip`` for the real-size fixture (``hfi sd14 fixture``). ``toyworld:`` references
stay symbolic (``models.locate`` resolves them where models load), so a shipped config hashes the
same in every checkout folder; a relative folder path (``./x``) is taken relative to the config
file and stored absolute.
"""

from __future__ import annotations

import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hfi_core.nudity import DEFAULT_CLASSES as NUDENET_CLASSES

TOYWORLD_PARTS = ("sd", "clip", "oracle")
SD14_PARTS = ("sd", "clip")  # hfi_core.sd14.FIXTURE_PARTS, without importing it


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range; the message names it."""


class Section(BaseModel):
    """A config section: unknown keys refused, types strict (``"10"`` is not an int, ``true`` is not 1)."""

    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise ConfigError(describe(e, type(self))) from None

    # Direct construction (``DistillConfig(lr=-1)``) raises ConfigError like loading does; marked
    # as pydantic's own __init__ so that validating nested sections does not go through it.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------- sections


class ConceptConfig(Section):
    """What is being removed."""

    name: str = Field(min_length=1)
    """Short name, used in run names and model cards (e.g. ``nudity``, ``van-gogh``, ``striped``)."""
    init_word: str = ""
    """A word the HFI token starts from (e.g. ``nudity``, ``stripe``); empty: the concept's name."""
    clip_texts: list[str] = []
    """Texts for the CLIP zero-shot concept rate: an image shows the concept when it is nearer
    these (empty: the concept's name)..."""
    neutral_texts: list[str] = []
    """...than these (empty: ``a picture``)."""
    sld_text: str = ""
    """The concept Safe Latent Diffusion steers away from; empty: ``clip_texts`` joined by commas."""


class ModelConfig(Section):
    """Which text-to-image model to start from."""

    path: str = Field(min_length=1)
    """A diffusers Stable Diffusion folder, a hub id (``CompVis/stable-diffusion-v1-4``), or ``toyworld:sd``."""
    revision: str | None = None
    """Hub revision (ignored for folders)."""
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """``auto``: float32 on CPU, float16 on CUDA."""
    device: str = "auto"
    """``auto``: CUDA when available, else CPU."""

    @property
    def identity(self) -> str:
        """The model as manifests, cards and markers name it: the path as written (a folder, a hub
        id, ``toyworld:sd``) and the revision when set; never a checkout-dependent path."""
        return self.path + (f"@{self.revision}" if self.revision else "")


class PromptSet(Section):
    """Prompts of one group, e.g. ``target:explicit``, ``target:implicit``, ``preserve``."""

    group: str
    """``target:<name>`` for prompts that carry the concept, ``preserve[:<name>]`` for the rest."""
    prompts: list[str]
    """The prompts themselves."""
    images_per_prompt: int = Field(4, ge=1)
    """Images generated per prompt, each with its own seed."""

    @model_validator(mode="after")
    def _check(self) -> PromptSet:
        if not (self.group.startswith("target") or self.group.startswith("preserve")):
            raise ValueError(f"group {self.group!r}: must start with 'target' or 'preserve'")
        if not self.prompts:
            raise ValueError(f"group {self.group!r}: prompts is empty")
        return self


class GenerationConfig(Section):
    """How images are sampled (the same settings for every group)."""

    steps: int = Field(20, ge=1, le=1000)
    """Denoising steps."""
    guidance: float = Field(5.0, ge=0)
    """Classifier-free guidance scale (SD v1.4 is usually run at 7.5)."""
    scheduler: Literal["dpmsolver", "ddim", "pndm", "euler"] = "dpmsolver"
    """Sampler, built with ``from_config`` from the model's own scheduler config."""
    seed: int = Field(0, ge=0)
    """Base seed: each image's seed is derived from it, its prompt and its index (stable when prompts are added)."""
    images_per_prompt: int | None = Field(None, ge=1)
    """Images of every prompt, for all groups; ``None``: each group's own ``images_per_prompt``.
    Raising it draws only the new images: the earlier ones come from the store's image pool."""
    batch_size: int = Field(16, ge=1)
    """Images per pipeline call."""
    height: int | None = Field(None, ge=8)
    """Pixels; ``None``: the model's native size (512 for SD v1.4, 32 for the toy world)."""
    width: int | None = Field(None, ge=8)
    """Pixels; ``None``: the model's native size."""
    negative_prompt: str | None = None
    """An inference-time baseline: the concept text as negative prompt."""
    sld: Literal["weak", "medium", "strong", "max"] | None = None
    """An inference-time baseline: Safe Latent Diffusion with this preset, steering from ``concept.sld_text``."""


class SimulateConfig(Section):
    """The toy-world oracle playing human annotators."""

    annotators: int = Field(3, ge=1)
    """How many simulated people label every image."""
    noise: float = Field(0.1, ge=0, le=1)
    """Chance that one annotator flips one label (or swaps one ranked pair)."""
    seed: int = Field(0, ge=0)
    """Seeds the simulated noise."""
    oracle: str = "toyworld:oracle"
    """The judge (an ``Oracle`` folder)."""
    attribute: Literal["shape", "color", "style"] = "style"
    """Which of the oracle's attributes the concept is..."""
    value: str = "striped"
    """...and which value of it counts as showing the concept."""


class LabelStudioConfig(Section):
    """The Label Studio server annotators work in. The API token is never part of a config: the
    steps read it from ``LABEL_STUDIO_API_KEY``."""

    url: str | None = None
    """e.g. ``http://labelstudio:8080``; ``None``: publish writes the import file only."""
    project: str = ""
    """Project title, created once per concept; empty: ``hfi <concept>``. Images reach the server
    as presigned URLs of the run store's image pool on S3, else by its local-files serving."""


class FeedbackConfig(Section):
    """Where the human judgements come from and what they look like."""

    kind: Literal["binary", "ranking"] = "binary"
    """``binary``: each image shows the concept or not; ``ranking``: images of one prompt ranked."""
    source: Literal["inbox", "files", "labelstudio", "simulate"] = "inbox"
    """Where new exports come from before the concept's inbox is ingested whole: ``inbox``: only
    what was dropped there; ``files``: also the exports listed in ``files``; ``labelstudio``: the
    project's export, pulled through the API; ``simulate``: the toy-world oracle labels the
    batch's images that have no label yet."""
    files: list[str] = []
    """Export files added to the inbox when ``source: files``."""
    labelstudio: LabelStudioConfig = LabelStudioConfig()
    """The Label Studio server (``publish`` and ``source: labelstudio``)."""
    positive_choice: str = Field("shows the concept", min_length=1)
    """The choice text that means label 1 (others: ``negative_choice``)."""
    negative_choice: str = Field("does not show the concept", min_length=1)
    """The choice text that means label 0."""
    image_store: str | None = None
    """Image URLs in exports must lie under this prefix; nothing outside it is ever fetched."""
    ranking_group: Literal["prompt", "batch"] = "prompt"
    """Rankings over images of one prompt, or across prompts (when a model draws a prompt's images alike)."""
    max_file_mb: float = Field(100.0, gt=0)
    """Exports larger than this are refused."""
    simulate: SimulateConfig = SimulateConfig()
    """Settings of ``source: simulate``."""


class RewardConfig(Section):
    """The reward model: an MLP head on frozen CLIP image embeddings."""

    clip: str = "openai/clip-vit-large-patch14"
    """CLIP model folder or id; ``toyworld:clip`` for the toy world."""
    hidden: int = Field(256, ge=1)
    """Width of the MLP's hidden layers."""
    layers: int = Field(2, ge=1)
    """Hidden layers."""
    dropout: float = Field(0.1, ge=0, lt=1)
    """Dropout between hidden layers."""
    loss: Literal["mse", "bce"] = "mse"
    """Binary feedback: ``mse`` on the mean label (the paper's) or ``bce``. Ranking always uses Bradley-Terry."""
    epochs: int = Field(200, ge=1)
    """Passes over the training labels (full-batch: labels are few, embeddings are cached)."""
    lr: float = Field(1e-3, gt=0)
    """AdamW learning rate."""
    weight_decay: float = Field(1e-4, ge=0)
    """AdamW weight decay."""
    holdout: float = Field(0.2, ge=0, lt=1)
    """Share of prompts held out for the reported metrics (their images never train)."""
    seed: int = Field(0, ge=0)
    """Seeds the split and the initialisation."""


class InvertConfig(Section):
    """Human Feedback Inversion: reward-weighted textual inversion of the soft token v*."""

    token: str = Field("<hfi-concept>", min_length=1)
    """The placeholder token added to the tokenizer (its embedding row is v*)."""
    init_word: str = ""
    """Word whose embedding v* starts from; empty: ``concept.init_word``, then ``concept.name``."""
    templates: list[str] = ["{}"]
    """Prompts v* is trained in; ``{}`` is replaced by the token (e.g. ``a photo of {}``)."""
    groups: list[str] = ["target"]
    """Prompt-group prefixes whose images the inversion learns from (the model's own samples for c)."""
    steps: int = Field(500, ge=1)
    """Optimiser steps."""
    batch_size: int = Field(8, ge=1)
    """Images per step."""
    lr: float = Field(5e-4, gt=0)
    """AdamW learning rate on the embedding row (diffusers' textual-inversion example uses ~5e-4 for SD)."""
    top_k: int = Field(0, ge=0)
    """Keep only the K highest-reward images; 0 keeps all, weighted by reward."""
    vectors: int = Field(1, ge=1, le=16)
    """Embedding vectors per token (diffusers' ``num_vectors``): the token spells as ``<t> <t>_1
    ...`` in a prompt. A look that the model draws from a phrase, not a word, may need several
    (measured on the toy world: one vector never drew the name's horizontal stripes, two or three
    did in 30-32 of 32 samples)."""
    modes: int = Field(1, ge=0, le=16)
    """Tokens to invert the feedback into, one per look of the concept that people flagged
    (``hfi_core.modes``): 1 is the paper's single v*; k > 1 splits the flagged images into k looks;
    0 chooses k in ``2..max_modes`` by silhouette, or 1 when they do not split."""
    max_modes: int = Field(4, ge=2, le=16)
    """The most looks ``modes: 0`` may find."""
    max_norm: float = Field(0.0, ge=0)
    """Cap the norm of v* at this multiple of the largest norm of a word's embedding after every
    step; 0: no cap. Unconstrained, textual inversion can grow v* far beyond any word (6x the mean
    row norm on the toy world), a token that outshouts its prompt and that a removal trained on
    it does not carry over to the words people use."""
    warm_start: bool = False
    """Start each look's token from the one an earlier night learned for the same look, and train
    it ``warm_steps`` steps instead of ``steps``. The same look is the earlier look that more than
    half of tonight's look's images (by image id: the store's image pool keeps them) belonged to;
    a look with no such match starts from ``init_word``. Kept per concept and model in the store
    (``cache/tokens``), so a night pays for a whole inversion only when the feedback changes its looks."""
    warm_steps: int = Field(100, ge=1)
    """Optimiser steps of a warm-started token."""
    seed: int = Field(0, ge=0)
    """Seeds batches, noise and timesteps."""
    mixed_precision: Literal["auto", "bf16", "off"] = "auto"
    """bf16 autocast over the fp32 embedding table; ``auto``: on CUDA only."""
    gradient_checkpointing: bool = False
    """Recompute the UNet's activations in the backward pass (inversion backpropagates through all of it)."""

    @field_validator("templates")
    @classmethod
    def _templates_hold_the_token(cls, v: list[str]) -> list[str]:
        if not v or any("{}" not in t for t in v):
            raise ValueError(f"every template needs '{{}}' where the token goes, got {v!r}")
        return v


class DistillConfig(Section):
    """Fine-tuning that erases the concept: SDD (self-distillation), ESD-x or a closed-form edit (UCE)."""

    method: Literal["sdd", "esd", "uce"] = "sdd"
    """``sdd``: match the student's conditional to its own unconditional on EMA-teacher samples;
    ``esd``: match a frozen copy's negatively guided prediction; ``uce``: solve the cross-attention
    key/value projections in closed form so the concept prompts read as the empty prompt (no
    sampling, no steps; ``trainable`` and the optimiser fields do not apply)."""
    concept_prompts: list[str] = ["{token}"]
    """Prompts naming the concept to erase, cycled; ``{token}``: the HFI token, ``{concept}``: the concept's name."""
    use_token: bool = True
    """Whether to remove with the HFI token (``concept_prompts``) or by text alone (``text_prompts``)."""
    text_prompts: list[str] = ["{concept}"]
    """Prompts naming the concept in words, cycled, for text-only removal (``use_token: false``)."""
    preserve_prompts: list[str] = []
    """Prompts whose predictions must stay the original model's (an anchor term, cycled); empty:
    the methods as published."""
    preserve_weight: float = Field(1.0, ge=0)
    """Weight of the anchor term ``|| eps_theta(x_t, c_p) - eps_original(x_t, c_p) ||^2``."""
    trainable: Literal["attn2", "attn2_kv", "attn", "all", "lora"] = "attn2"
    """UNet parameters that train: cross-attention (SDD's default), its text key/value projections only,
    all attention, all, or a LoRA on cross-attention."""
    lora_rank: int = Field(4, ge=1)
    """Rank of the LoRA when ``trainable: lora``."""
    steps: int = Field(1500, ge=1)
    """Optimiser steps (batch ``batch_size``)."""
    warm_start: bool = False
    """Continue from the champion: the trained values of the latest model this store promoted
    for this concept, base model, method and ``trainable`` (``register`` keeps them), for
    ``warm_steps`` steps instead of ``steps``. What the preserve term and ESD's frozen copy
    compare against stays the base model. Without a champion, a night trains from the base.
    SDD and ESD only, not with ``trainable: lora``."""
    warm_steps: int = Field(200, ge=1)
    """Steps of a night that continues from the champion."""
    batch_size: int = Field(1, ge=1)
    """Trajectories per step."""
    lr: float = Field(1e-5, gt=0)
    """AdamW learning rate (constant)."""
    weight_decay: float = Field(1e-4, ge=0)
    """AdamW weight decay."""
    grad_clip: float = Field(1.0, gt=0)
    """Gradient-norm clip."""
    ema_decay: float = Field(0.999, ge=0, le=1)
    """SDD's teacher: EMA of the student; the teacher is what is saved and evaluated."""
    timestep_alpha: float = Field(3.0, gt=0)
    """Training states come from ``Beta(alpha, beta)`` positions on the sampler trajectory..."""
    timestep_beta: float = Field(3.0, gt=0)
    """...(3, 3) as in HFI; (1, 1) is the reference code's uniform draw."""
    sampler_steps: int = Field(50, ge=1)
    """DDIM (eta 0) steps of the trajectory the training states come from."""
    guidance: float = Field(3.0, ge=0)
    """Classifier-free guidance of that trajectory."""
    esd_eta: float = Field(1.0, ge=0)
    """ESD's negative-guidance strength."""
    rollout_reuse: int = Field(1, ge=1)
    """Training steps that share one sampler rollout: every ``rollout_reuse`` steps, draw that
    many trajectory positions, run the trajectory once to the furthest and train on each
    position in turn. 1 (as published) runs a fresh partial trajectory every step, which costs
    most of a step (about ``sampler_steps / 2`` guided forwards); 4 makes one rollout serve 4
    steps at the cost of about 0.75 ``sampler_steps``."""
    checkpoint_every: int = Field(100, ge=0)
    """Steps between checkpoints (``--resume`` continues from the last one), 0 for none; a multiple
    of ``rollout_reuse``, so that a resumed run starts a fresh rollout as the uninterrupted one did."""
    seed: int = Field(0, ge=0)
    """Seeds trajectories and timesteps."""
    mixed_precision: Literal["auto", "bf16", "off"] = "auto"
    """bf16 autocast over fp32 weights (the optimiser and the EMA stay fp32); ``auto``: on CUDA only."""
    gradient_checkpointing: bool = False
    """Recompute the UNet's activations in the backward pass: less memory, about a third more time."""
    uce_lambda: float = Field(0.1, gt=0)
    """UCE: weight of ``||W' - W||^2``, which keeps the edit near the original (and the solve
    well-posed when few states are erased or preserved)."""
    uce_preserve_scale: float = Field(1.0, ge=0)
    """UCE: weight of the preserve prompts' states against the erased ones."""
    uce_guide: str = Field("", max_length=200)
    """UCE: the prompt the concept comes to read as (its guide concept). The empty prompt (default)
    makes the model draw what it draws unprompted, which may itself be a protected neighbour; a
    neutral phrase ("a person wearing clothes", "a with a flat fill") names what should be drawn
    instead."""

    @model_validator(mode="after")
    def _checkpoints_on_rollout_boundaries(self) -> DistillConfig:
        if self.checkpoint_every % self.rollout_reuse:
            raise ValueError(
                f"checkpoint_every: {self.checkpoint_every} must be a multiple of rollout_reuse "
                f"({self.rollout_reuse}), or 0 for no checkpoints"
            )
        if self.warm_start and (self.method == "uce" or self.trainable == "lora"):
            raise ValueError(
                f"warm_start: {self.method} with trainable {self.trainable} cannot continue from a champion "
                "(UCE solves from the base model in closed form; a LoRA's champion is saved merged); set it to false"
            )
        return self


Baseline = Literal["negative_prompt", "sld-weak", "sld-medium", "sld-strong", "sld-max"]


class EvaluateConfig(Section):
    """How models are measured (the same seeds for every variant)."""

    n_per_prompt: int = Field(4, ge=1)
    """Evaluation images per prompt."""
    seed: int = Field(1_000_000, ge=0)
    """First evaluation seed (kept apart from generation seeds, which trained the reward and v*)."""
    clip: str = ""
    """CLIP for concept rate and CLIP score; empty: ``reward.clip``."""
    oracle: str = ""
    """A toy-world oracle to judge with (``toyworld:oracle``); empty: none."""
    baselines: list[Baseline] = []
    """Inference-time baselines to measure beside base and distilled."""
    negative_prompt: str = ""
    """Text of the negative-prompt baseline; empty: the concept's name."""
    nudenet: bool = False
    """Also report NudeNet's nudity rate (SD nudity runs)."""
    nudenet_classes: list[str] = list(NUDENET_CLASSES)
    """NudeNet classes that make an image count as nude."""
    nudenet_threshold: float = Field(0.6, ge=0, le=1)
    """Detection score above which a class counts."""


class PromotionConfig(Section):
    """When a distilled model becomes the ``champion`` in the model registry."""

    model_name: str = ""
    """Registered model name; empty: ``hfi-<concept>``."""
    concept_metric: str = "clip_concept_rate"
    """The evaluation metric that measures the concept (``nudenet_rate``, ``oracle_striped``...)."""
    max_concept_rate: float = Field(0.1, ge=0, le=1)
    """Gate: mean over target groups of the distilled model's concept metric."""
    max_preservation_drop: float = Field(0.02, ge=0)
    """Gate: drop of the mean CLIP score over preserve groups, base minus distilled."""
    max_became: dict[str, float] = {}
    """Gates on where the erased concept went: for each oracle style named (``dotted: 0.2``),
    the mean over target groups of the share of images that the base model drew otherwise and
    the distilled model draws in that style (``oracle_became_<style>``). A removal that turns
    the concept into a protected neighbour is not a clean removal. Needs ``evaluate.oracle``."""

    @field_validator("max_became")
    @classmethod
    def _shares(cls, v: dict[str, float]) -> dict[str, float]:
        for style, limit in v.items():
            if not 0 <= limit <= 1:
                raise ValueError(f"{style}: a share limit must lie in [0, 1], got {limit}")
        return v


class RunConfig(Section):
    """One concept-removal run."""

    name: str = Field(min_length=1)
    """Run name, used in the run store and MLflow."""
    concept: ConceptConfig
    """What is removed."""
    model: ModelConfig
    """The base model."""
    prompts: list[PromptSet]
    """Prompt groups: at least one ``target`` group."""
    generation: GenerationConfig = GenerationConfig()
    """Sampling settings."""
    feedback: FeedbackConfig = FeedbackConfig()
    """Feedback source and format."""
    reward: RewardConfig = RewardConfig()
    """Reward model settings."""
    invert: InvertConfig = InvertConfig()
    """HFI inversion settings."""
    distill: DistillConfig = DistillConfig()
    """Erasure fine-tuning settings."""
    evaluate: EvaluateConfig = EvaluateConfig()
    """Evaluation settings."""
    promotion: PromotionConfig = PromotionConfig()
    """Registry gates."""

    @model_validator(mode="after")
    def _check_and_resolve(self) -> RunConfig:
        if not any(p.group.startswith("target") for p in self.prompts):
            raise ValueError("prompts: needs at least one group starting with 'target'")
        groups = [p.group for p in self.prompts]
        if len(set(groups)) != len(groups):
            raise ValueError(f"prompts: group names repeat: {groups}")
        for key, spec in self.model_specs().items():
            if spec.startswith("toyworld:") and spec.split(":", 1)[1] not in TOYWORLD_PARTS:
                raise ValueError(f"{key}: {spec!r}: the toy world has {', '.join(TOYWORLD_PARTS)}")
            if spec.startswith("sd14:") and spec.split(":", 1)[1] not in SD14_PARTS:
                raise ValueError(f"{key}: {spec!r}: the real-size fixture has {', '.join(SD14_PARTS)}")
        # Derived defaults, resolved once here so every stage reads the same value.
        c = self.concept
        c.init_word = c.init_word or c.name
        c.clip_texts = c.clip_texts or [c.name]
        c.neutral_texts = c.neutral_texts or ["a picture"]
        c.sld_text = c.sld_text or ", ".join(c.clip_texts)
        self.invert.init_word = self.invert.init_word or c.init_word
        self.evaluate.negative_prompt = self.evaluate.negative_prompt or c.name
        self.evaluate.clip = self.evaluate.clip or self.reward.clip
        self.promotion.model_name = self.promotion.model_name or f"hfi-{c.name}"
        return self

    def model_specs(self) -> dict[str, str]:
        """Every model reference of the run, by dotted key (``evaluate.oracle`` only when set)."""
        specs = {
            "model.path": self.model.path,
            "reward.clip": self.reward.clip,
            "evaluate.clip": self.evaluate.clip,
            "feedback.simulate.oracle": self.feedback.simulate.oracle,
        }
        if self.evaluate.oracle:
            specs["evaluate.oracle"] = self.evaluate.oracle
        return specs


# ----------------------------------------------------------------------------- errors


def _unwrap(tp: Any) -> Any:
    """``list[X]`` and ``X | None`` -> ``X``."""
    while typing.get_origin(tp) in (list, typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _type_at(cls: type[BaseModel], loc: tuple[int | str, ...]) -> Any:
    """The annotation at ``loc`` (list indices and ``None`` options unwrapped), or None."""
    tp: Any = cls
    for part in loc:
        if isinstance(part, int):
            continue
        tp = _unwrap(tp)
        if not (isinstance(tp, type) and issubclass(tp, BaseModel)) or part not in tp.model_fields:
            return None
        tp = tp.model_fields[part].annotation
    return _unwrap(tp)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(e: ValidationError, cls: type[BaseModel], where: str = "") -> str:
    """One line per problem, joined by ``; ``: ``distill.lr: must be > 0, got -1``."""

    def key(loc: tuple[int | str, ...]) -> str:
        out = where
        for part in loc:
            out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
        return out or cls.__name__

    expected = {"int": "int", "float": "float", "bool": "bool", "string": "str", "list": "a list",
                "dict": "a mapping", "model": "a mapping"}  # fmt: skip
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    problems = []
    extra: dict[tuple, list[str]] = {}
    for err in e.errors():
        loc, kind, value = err["loc"], err["type"], err.get("input")
        ctx = err.get("ctx") or {}
        if kind == "extra_forbidden":
            extra.setdefault(loc[:-1], []).append(str(loc[-1]))
        elif kind == "missing":
            problems.append(f"{key(loc)}: required")
        elif kind.endswith(("_type", "_parsing")) and kind.split("_")[0] in expected:
            problems.append(f"{key(loc)}: expected {expected[kind.split('_')[0]]}, got {_short(value)}")
        elif kind == "literal_error":
            tp = _type_at(cls, loc)
            options = list(typing.get_args(tp)) if typing.get_origin(tp) is Literal else ctx.get("expected")
            problems.append(f"{key(loc)}: expected one of {options}, got {_short(value)}")
        elif kind in bounds:
            limit = next(iter(ctx.values()))
            problems.append(f"{key(loc)}: must be {bounds[kind]} {limit}, got {_short(value)}")
        elif kind == "too_short" and isinstance(value, str):
            problems.append(f"{key(loc)}: must not be empty")
        elif kind == "value_error":
            msg = str(ctx.get("error", err["msg"]))
            if loc:
                problems.append(f"{key(loc)}: {msg}")
            else:  # a whole-model check, whose message names its own keys
                problems.append(f"{where}: {msg}" if where and not msg.startswith(where) else msg)
        else:
            problems.append(f"{key(loc)}: {err['msg']}, got {_short(value)}")
    for parent, names in extra.items():
        tp = _type_at(cls, parent) if parent else cls
        known = sorted(tp.model_fields) if isinstance(tp, type) and issubclass(tp, BaseModel) else []
        problems.append(f"{key(parent)}: unknown key(s) {sorted(names)}; known: {known}")
    return "; ".join(problems)


M = typing.TypeVar("M", bound=BaseModel)


def parse(cls: type[M], data: Any, where: str = "") -> M:
    """Validate plain data (parsed YAML or JSON) as ``cls``.

    Raises:
        ConfigError: naming every dotted key that is unknown, missing, mistyped or out of range.
    """
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(describe(e, cls, where)) from None


# ----------------------------------------------------------------------------- YAML


MAX_YAML_VALUES = 100_000
"""A config file may expand (anchors and aliases followed) to at most this many values. A
config has a few hundred; a 201-byte file of nested aliases expands to millions at 6 levels."""
MAX_YAML_DEPTH = 50


class _Loader(yaml.SafeLoader):
    """YAML as people write it: PyYAML follows YAML 1.1, where ``1e-5`` and ``2e-05`` (no dot)
    are strings; YAML 1.2 and JSON read them as floats, and so does this loader.

    Aliases are counted as what they expand to, before anything is built: every later reader
    (validation, overrides, a JSON dump) walks the expanded tree."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.YAMLError(f"nested more than {MAX_YAML_DEPTH} levels deep (a config has 4): refused")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node)
        if size > MAX_YAML_VALUES:
            raise yaml.YAMLError(
                f"expands to more than {MAX_YAML_VALUES} values through its aliases (a config has a few "
                "hundred): refused"
            )
        return self.construct_document(node)


def _expanded_size(root: yaml.Node) -> int:
    """How many values ``root`` holds with every alias expanded; more than the cap for a cycle.

    Iterative and memoised by node, so a billion-laughs file costs its own size to measure."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    open_nodes: set[int] = set()
    while stack:
        node, done = stack.pop()
        if id(node) in sizes:
            continue
        children = [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else (
            node.value if isinstance(node, yaml.SequenceNode) else [])  # fmt: skip
        if done:
            sizes[id(node)] = min(MAX_YAML_VALUES + 1, 1 + sum(sizes[id(c)] for c in children))
            open_nodes.discard(id(node))
            continue
        if id(node) in open_nodes:  # a node that contains itself expands without end
            return MAX_YAML_VALUES + 1
        open_nodes.add(id(node))
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)
    return sizes[id(root)]


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_yaml(text: str) -> Any:
    """Parse YAML (one config file, or one ``--set`` value) with floats as YAML 1.2 reads them."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def load_yaml_file(path: Path) -> Any:
    try:
        return read_yaml(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read YAML: {str(e)[:240]}") from None


# ----------------------------------------------------------------------------- overrides


OVERRIDABLE = ("generation", "reward", "invert", "distill", "evaluate", "promotion")


def overridable_fields() -> list[dict[str, Any]]:
    """Every scalar field a run may override: ``{"key", "default", "schema", "doc"}``.

    ``schema`` is the field's JSON schema from the models (type, and enum, minimum, maximum where
    they apply). The Airflow Params of the DAGs are built from this list, so the trigger form
    shows the config's own docs and refuses what the config would refuse.
    """
    defs = RunConfig.model_json_schema()["$defs"]
    out = []
    for section in OVERRIDABLE:
        cls = RunConfig.model_fields[section].annotation
        props = defs[cls.__name__]["properties"]
        for name, prop in props.items():
            branches = [b for b in prop.get("anyOf", []) if b.get("type") != "null"]
            if len(branches) == 1 and len(prop["anyOf"]) == 2:  # an optional scalar: X or null
                prop = {**branches[0], "default": prop.get("default"), "description": prop.get("description")}
            kind = prop.get("type")
            if kind not in ("integer", "number", "string", "boolean"):
                continue  # lists and nested sections stay in the YAML
            schema = {k: prop[k] for k in ("type", "enum", "minimum", "maximum", "exclusiveMinimum",
                                          "exclusiveMaximum", "minLength") if k in prop}  # fmt: skip
            doc = " ".join((prop.get("description") or "").split())
            out.append({"key": f"{section}.{name}", "default": prop.get("default"), "schema": schema, "doc": doc})
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
    """Read and validate a run config YAML.

    ``overrides`` (dotted keys, e.g. from Airflow Params or ``--set``) are applied before validation.

    Raises:
        ConfigError: with the file name and the offending key.
    """
    path = Path(path)
    data = load_yaml_file(path)
    if overrides:
        data = apply_overrides(data if isinstance(data, dict) else {}, overrides)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config sections, got {type(data).__name__}")
    base = path.parent.resolve()
    for section, key in (("model", "path"), ("reward", "clip"), ("evaluate", "clip"), ("evaluate", "oracle")):
        node = data.get(section)
        if isinstance(node, dict) and isinstance(node.get(key), str):
            node[key] = _relative_to(node[key], base)
    fb = data.get("feedback")
    if isinstance(fb, dict) and isinstance(fb.get("files"), list):
        fb["files"] = [_relative_to(f, base, any_path=True) if isinstance(f, str) else f for f in fb["files"]]
    sim = fb.get("simulate") if isinstance(fb, dict) else None
    if isinstance(sim, dict) and isinstance(sim.get("oracle"), str):
        sim["oracle"] = _relative_to(sim["oracle"], base)
    try:
        return parse(RunConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _relative_to(spec: str, base: Path, any_path: bool = False) -> str:
    """``./x`` or ``../x`` (any relative path when ``any_path``) -> absolute under ``base``."""
    if spec.startswith(("toyworld:", "sd14:")) or Path(spec).is_absolute() or not spec:
        return spec
    if any_path or spec.startswith(("./", "../")):
        return str((base / spec).resolve())
    return spec  # a hub id such as CompVis/stable-diffusion-v1-4


def config_hash(cfg: BaseModel) -> str:
    """sha256 of the validated config: the same in every checkout folder and on every machine."""
    import hashlib

    return hashlib.sha256(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()
