"""Parameter models: the base of every one, and those more than one pipeline reads.

Kedro validates a ``params:`` input whose node argument is type-hinted with a pydantic
model (its ``ParameterValidator``), so a typo in a YAML key stops the run naming the key.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from prefgen_kedro.models.mllm import AnswerLoss, MllmPreferenceModel
from prefgen_kedro.models.stack import MllmWithProcessor
from prefgen_kedro.training import TrainConfig


class StrictParams(BaseModel):
    """Unknown keys are errors, not silent defaults."""

    model_config = ConfigDict(extra="forbid")


class UserSamplingParams(StrictParams):
    guidance_scale: float = Field(ge=1.0)  # on the prompt
    user_guidance_scale: float = Field(ge=0.0)  # on the user condition
    num_inference_steps: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    mixed_precision: Literal["no", "bf16"]  # bf16 autocast: 2x on this CPU, same images


class ValidationParams(StrictParams):
    users: int | None = Field(default=None, ge=1)  # the first this many (by id); null: all
    prompts_per_user: int = Field(ge=1)
    grid_users: int = Field(ge=1)
    seed: int


class ViperStyleParams(StrictParams):
    # "arithmetic": prompt + beta · (liked text − disliked text), ViPer's own; "prompt": the
    # liked words said after the prompt, the disliked ones as its negative prompt.
    delivery: Literal["arithmetic", "prompt"]
    beta: float = Field(ge=0.0)  # arithmetic only
    mllm_slot_positions: bool  # as vqa_tuning.slot_positions
    batch_size: int = Field(ge=1)

    def reader(self, mllm: MllmWithProcessor, batch_size: int | None = None) -> MllmPreferenceModel:
        """An MLLM as ``viper_style`` reads tastes with it (the foundation MLLM, which was
        taught to state one) and as the judges score with it (the tuned MLLM)."""
        return MllmPreferenceModel(
            mllm.model,
            mllm.processor,
            slot_positions=self.mllm_slot_positions,
            batch_size=batch_size or self.batch_size,
        )


class DiffusionParams(StrictParams):
    checkpoint_root: str
    # null turns a variant off: an environment cannot delete base's keys (soft merging).
    variants: dict[str, list[str] | None]
    tokens_per_part: int = Field(ge=1)
    text_space_parts: list[str]  # fed to a branch as tokens unchanged (see UserAdapter)
    # Parts said in the prompt: the attributes their phrases name join the caption the text
    # encoder reads (agent world); a variant's other parts go to its branch.
    said_parts: list[str]
    # The UNet blocks whose cross-attentions get the branch (UserAdapter.for_unet).
    branch_blocks: list[str] = Field(min_length=1)
    e_img: str
    caption_dropout: float = Field(ge=0.0, le=1.0)
    user_dropout: float = Field(ge=0.0, le=1.0)
    # Train the user key/values (copies of the text ones) too, as IP-Adapter does.
    train_key_values: bool
    snr_gamma: float | None
    # Recompute the frozen UNet's activations in the backward pass (SD 1.5 at 512 px).
    gradient_checkpointing: bool = False
    train: TrainConfig
    sampling: UserSamplingParams
    validation: ValidationParams
    viper_style: ViperStyleParams

    @property
    def active_variants(self) -> dict[str, list[str]]:
        """The variants to train: name → the parts of the condition it reads."""
        return {name: parts for name, parts in self.variants.items() if parts is not None}

    def said(self, variant: str) -> list[str]:
        """The parts of ``variant`` said in its prompt."""
        return [part for part in self.active_variants[variant] if part in self.said_parts]

    def branch_parts(self, variant: str) -> list[str]:
        """The parts of ``variant`` its user branch reads (none: it has no branch)."""
        return [part for part in self.active_variants[variant] if part not in self.said_parts]


class BootstrapParams(StrictParams):
    resamples: int = Field(ge=10)  # per-user means (cheap)
    set_resamples: int = Field(ge=10)  # FID/KID (one Fréchet distance each)
    level: float = Field(gt=0.0, lt=1.0)
    seed: int


class TargetParams(StrictParams):
    """The project's bar for the reference method, stated in the report's verdict."""

    like_rate_gain: float  # points of oracle like-rate over ``base``
    fid_ratio: float = Field(gt=0.0)  # its FID at most this × ``base``'s


class EvaluationParams(StrictParams):
    split: str
    users: int | None = Field(default=None, ge=1)  # the first this many (by id); null: all
    prompts_per_user: int = Field(ge=1)
    seed: int
    methods: list[str]
    references: list[str]  # rows shown for scale, never ranked (e.g. oracle_taste)
    reference_method: str  # the method whose per-user win-rate over the others is reported
    fid_reference_split: str
    fid_reference_size: int = Field(ge=2)  # renders drawn (with ``seed``) from that split
    fid_cache_root: str
    inception_batch_size: int = Field(ge=1)
    judge_batch_size: int = Field(ge=1)
    bootstrap: BootstrapParams
    grid_users: int = Field(ge=1)
    targets: TargetParams


class AlignmentParams(StrictParams):
    checkpoint_root: str
    hidden_dim: int = Field(ge=1)
    dropout: float = Field(ge=0.0, lt=1.0)
    tokens: int = Field(ge=2)  # phrases (text-space tokens) each context is mapped to
    bandwidth_factors: list[float] = Field(min_length=1)
    retrieval_k: int = Field(ge=1)
    train: TrainConfig


class VqaStage(StrictParams):
    k: int = Field(ge=1)
    # Questions asked in turn about one context: one chat's answers share its images' cost.
    questions_per_context: int = Field(default=1, ge=1)
    train: TrainConfig


class LoraParams(StrictParams):
    rank: int = Field(ge=1)
    alpha: float = Field(gt=0)
    target_modules: list[str] | str
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    gradient_checkpointing: bool = False


class VqaTuningParams(StrictParams):
    checkpoint_root: str
    seed: int
    with_reasons: bool
    slot_positions: bool  # as the pretrained model was trained (tiny model: true)
    lora: LoraParams | None = None  # None: tune the language model and projector fully
    stages: list[VqaStage] = Field(min_length=1)  # K ramps up; the last K is the default K
    val_samples_per_user: int = Field(ge=1)
    curve_every: int = Field(ge=1)  # steps between learning-curve points (× log_every)
    curve_questions: int = Field(ge=2)
    judge_batch_size: int = Field(ge=1)
    # "yes_no": each answer's "Yes"/"No" scored on those two logits alone (``vqa_loss``).
    answer_loss: AnswerLoss = "language_model"
