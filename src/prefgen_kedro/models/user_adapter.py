"""PrefGen step 4: the user branch, a parallel decoupled cross-attention (IP-Adapter style).

``e_u = [ê_sem; e_core; e_img]`` (or any subset of named parts: the ablations and the
comparison conditioners use other parts) becomes a few tokens per part of the UNet's
cross-attention width; each cross-attention (``attn2``) of the chosen UNet blocks (all of them
unless ``blocks`` names some: the decoder's carry the taste, and branches there keep the
prompt's subject, docs/design.md) gets a parallel attention over each part's tokens whose
key/value projections are copies of the text ones, and its output is
``text attention + scale × Σ_part user attention`` (decoupled as in Ye et al., 2023, and per
part, so a part the UNet reads like words is not diluted by the others). The UNet, text and
image encoders stay frozen; the projections learn, and the user key/values only where
``diffusion.train_key_values`` says so (kept frozen: trained, they unlearned the words).

The tokens reach the processors through ``cross_attention_kwargs={"user_tokens": ...}``,
so ``models.diffusion.sample`` drives a branched UNet with its ``extra_condition``. The
"no user" condition is the tokens of all-zero parts (what user-condition dropout trains).

Public API: ``USER_BRANCH_RECIPE``, ``UserAdapter``, ``UserBranches`` (several adapters saved
together), ``UserAttnProcessor``, ``install_user_adapter``, ``UserConditionedUnet``, ``null_parts``,
``branch_layers``, ``choose_image_embedding``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

_DOT = "__"  # ModuleDict keys cannot hold dots; processor names do
# What the branch's code does beyond its parameters, in training run keys: a change here
# retrains the branches.
USER_BRANCH_RECIPE = "one attention per part; projected parts start as zero tokens"


class UserAdapter(nn.Module, PyTorchModelHubMixin):
    """The trainable part: a projection per ``e_u`` part and a key/value pair per ``attn2``.

    ``part_dims`` names the parts of ``e_u`` and their widths, in the order their tokens
    are laid out; ``attention_dims`` maps each ``attn2`` processor name of the UNet to its
    inner width (what its ``to_k`` outputs).
    """

    def __init__(
        self,
        part_dims: dict[str, int],
        tokens_per_part: int,
        cross_attention_dim: int,
        attention_dims: dict[str, int],
        text_space_parts: list[str] | None = None,
    ) -> None:
        super().__init__()
        if not part_dims:
            raise ValueError("a user adapter needs at least one part of e_u")
        self.part_names = list(part_dims)
        self.part_dims = dict(part_dims)
        self.tokens_per_part = tokens_per_part
        self.cross_attention_dim = cross_attention_dim
        # Parts already in the text encoder's token space (PrefGen's aligned ê_sem) are fed
        # as tokens unchanged, so the user key/values, copies of the text ones, read them
        # like words from the first step; the others get a learned projection.
        self.text_space_parts = list(text_space_parts or [])
        for name in self.text_space_parts:
            if name not in part_dims or part_dims[name] % cross_attention_dim:
                raise ValueError(
                    f"text-space part {name!r} must be one of the parts with a width that is a "
                    f"multiple of the cross-attention width {cross_attention_dim}"
                )
        self.projections = nn.ModuleDict(
            {
                name: nn.Linear(dim, tokens_per_part * cross_attention_dim)
                for name, dim in part_dims.items()
                if name not in self.text_space_parts
            }
        )
        self.norm = nn.LayerNorm(cross_attention_dim)
        # Projected parts start as zero tokens, which add nothing to their own attention:
        # the branch begins as what the text-space parts alone give, and learns the rest.
        nn.init.zeros_(self.norm.weight)
        self.to_k = nn.ModuleDict(
            {
                name.replace(".", _DOT): nn.Linear(cross_attention_dim, dim, bias=False)
                for name, dim in attention_dims.items()
            }
        )
        self.to_v = nn.ModuleDict(
            {
                name.replace(".", _DOT): nn.Linear(cross_attention_dim, dim, bias=False)
                for name, dim in attention_dims.items()
            }
        )

    @classmethod
    def for_unet(
        cls,
        unet: UNet2DConditionModel,
        part_dims: Mapping[str, int],
        tokens_per_part: int,
        text_space_parts: list[str] | None = None,
        blocks: Sequence[str] | None = None,
    ) -> UserAdapter:
        """An adapter sized for ``unet`` whose user key/values start as copies of the text
        ones, so the branch begins by reading user tokens the way the UNet reads words. It
        writes into the cross-attentions of ``blocks`` (UNet block names such as
        ``up_blocks`` or ``up_blocks.1``; every cross-attention when None)."""
        layers = branch_layers(unet, blocks)
        adapter = cls(
            part_dims=dict(part_dims),
            tokens_per_part=tokens_per_part,
            cross_attention_dim=unet.config.cross_attention_dim,
            attention_dims={name: layer.to_k.out_features for name, layer in layers.items()},
            text_space_parts=text_space_parts,
        )
        with torch.no_grad():
            for name, layer in layers.items():
                key = name.replace(".", _DOT)
                adapter.to_k[key].weight.copy_(layer.to_k.weight)
                adapter.to_v[key].weight.copy_(layer.to_v.weight)
        return adapter

    def trainable_parameters(self, key_values: bool) -> list[nn.Parameter]:
        """What training moves: the projections (and their norm), and the user key/values
        only if ``key_values``: frozen, they stay the text ones, so the branch learns tokens
        the UNet reads like words and text-space parts keep being read as words. Empty for a
        branch of text-space parts only with frozen key/values: it has nothing to learn."""
        if not self.projections and not key_values:
            return []
        return [
            parameter
            for name, parameter in self.named_parameters()
            if key_values or not name.startswith(("to_k.", "to_v."))
        ]

    def token_groups(self) -> list[int]:
        """How many tokens each part gives, in ``part_names`` order."""
        return [
            self.part_dims[name] // self.cross_attention_dim
            if name in self.text_space_parts
            else self.tokens_per_part
            for name in self.part_names
        ]

    def tokens(self, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(B, n_parts × tokens_per_part, cross_attention_dim) from ``{part: (B, dim)}``."""
        missing = set(self.part_names) - set(parts)
        if missing:
            raise KeyError(
                f"user parts {sorted(missing)} missing; the adapter needs {self.part_names}"
            )
        dtype = self.norm.weight.dtype
        tokens = [
            parts[name]
            .to(dtype)
            .view(-1, self.part_dims[name] // self.cross_attention_dim, self.cross_attention_dim)
            if name in self.text_space_parts
            else self.norm(
                self.projections[name](parts[name].to(dtype)).view(
                    -1, self.tokens_per_part, self.cross_attention_dim
                )
            )
            for name in self.part_names
        ]
        return torch.cat(tokens, dim=1)


def null_parts(adapter: UserAdapter, parts: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The "no user" condition of the same shape: all-zero parts."""
    return {name: torch.zeros_like(parts[name]) for name in adapter.part_names}


class UserAttnProcessor:
    """SDPA attention (as diffusers' ``AttnProcessor2_0``) plus, for a cross-attention with
    user key/values, ``scale`` × the sum of one attention per part of ``user_tokens``
    (``groups``: each part's number of tokens, in order; one part when not given), so a part
    the UNet reads like words is not diluted by the others' tokens. Self-attention layers get
    one without key/values: it accepts and ignores ``user_tokens``."""

    def __init__(
        self,
        to_k: nn.Linear | None = None,
        to_v: nn.Linear | None = None,
        scale: float = 1.0,
        groups: list[int] | None = None,
    ) -> None:
        self.to_k = to_k
        self.to_v = to_v
        self.scale = scale
        self.groups = groups

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        user_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        residual = hidden_states
        batch, channels, height, width = (
            hidden_states.shape if hidden_states.ndim == 4 else (0,) * 4
        )
        if hidden_states.ndim == 4:
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = _heads(attn, attn.to_q(hidden_states))
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        out = F.scaled_dot_product_attention(
            query, _heads(attn, attn.to_k(context)), _heads(attn, attn.to_v(context))
        )
        if self.to_k is not None and user_tokens is not None and self.scale:
            tokens = user_tokens.to(query.dtype)
            keys, values = _heads(attn, self.to_k(tokens)), _heads(attn, self.to_v(tokens))
            groups = self.groups or [tokens.shape[1]]
            user = sum(
                F.scaled_dot_product_attention(query, k, v)
                for k, v in zip(keys.split(groups, dim=2), values.split(groups, dim=2), strict=True)
            )
            out = out + self.scale * user
        out = out.transpose(1, 2).flatten(2).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if batch:
            out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def install_user_adapter(
    unet: UNet2DConditionModel, adapter: UserAdapter, scale: float = 1.0
) -> None:
    """Give every attention layer of ``unet`` a ``UserAttnProcessor``: those the adapter
    has key/values for read ``adapter``, the others ignore the user tokens."""
    unknown = set(adapter.to_k) - {name.replace(".", _DOT) for name in branch_layers(unet)}
    if unknown:
        raise KeyError(
            f"the adapter has key/values for layers {sorted(unknown)[:3]} that this UNet "
            "lacks: built for another UNet?"
        )
    processors = {}
    for name in unet.attn_processors:
        key = name.replace(".", _DOT)
        if key in adapter.to_k:
            processors[name] = UserAttnProcessor(
                adapter.to_k[key], adapter.to_v[key], scale, adapter.token_groups()
            )
        else:
            processors[name] = UserAttnProcessor()
    unet.set_attn_processor(processors)


class UserConditionedUnet(nn.Module):
    """The frozen UNet with the adapter installed, as one module for the trainer: called
    like the UNet, with ``user_parts`` ({part: (B, dim)}) for the branch."""

    def __init__(self, unet: UNet2DConditionModel, adapter: UserAdapter) -> None:
        super().__init__()
        self.unet = unet.requires_grad_(False)
        self.adapter = adapter
        install_user_adapter(unet, adapter)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        user_parts: Mapping[str, torch.Tensor],
    ):
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            cross_attention_kwargs={"user_tokens": self.adapter.tokens(user_parts)},
        )


def choose_image_embedding(liked: torch.Tensor, rule: str) -> torch.Tensor:
    """``e_img`` from the (normalised) CLIP embeddings of a context's liked images: the
    first, or the medoid (the one most similar on average to the others: the most typical
    of the user's taste)."""
    if rule == "first_liked":
        return liked[0]
    if rule == "medoid_liked":
        return liked[(liked @ liked.T).sum(dim=1).argmax()]
    raise ValueError(f"unknown e_img rule {rule!r}; use first_liked or medoid_liked")


def branch_layers(
    unet: UNet2DConditionModel, blocks: Sequence[str] | None = None
) -> dict[str, Attention]:
    """The UNet's ``attn2`` layers by processor name, only those inside ``blocks`` (block
    names such as ``up_blocks`` or ``mid_block``) unless None; a block without one is an
    error."""
    layers = {
        name: unet.get_submodule(name.removesuffix(".processor"))
        for name in unet.attn_processors
        if name.endswith("attn2.processor")
    }
    if blocks is None:
        return layers
    chosen = {}
    for block in blocks:
        inside = {name: layer for name, layer in layers.items() if name.startswith(block + ".")}
        if not inside:
            raise ValueError(
                f"diffusion.branch_blocks: {block!r} holds no cross-attention of this UNet; "
                f"its cross-attentions are in {sorted({n.split('.attentions')[0] for n in layers})}"
            )
        chosen.update(inside)
    return chosen


def _heads(attn: Attention, states: torch.Tensor) -> torch.Tensor:
    batch, length, inner = states.shape
    return states.view(batch, length, attn.heads, inner // attn.heads).transpose(1, 2)


class UserBranches(nn.Module, PyTorchModelHubMixin):
    """Several named adapters of one UNet (PrefGen, its ablations, the comparison
    conditioners), stored together: ``variants`` maps a name to its ``UserAdapter`` config."""

    def __init__(self, variants: dict[str, dict]) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict(
            {name: UserAdapter(**config) for name, config in variants.items()}
        )

    @classmethod
    def of(cls, adapters: Mapping[str, UserAdapter]) -> UserBranches:
        """Bundle trained adapters (weights copied)."""
        bundle = cls(
            variants={
                name: {
                    "part_dims": adapter.part_dims,
                    "tokens_per_part": adapter.tokens_per_part,
                    "cross_attention_dim": adapter.cross_attention_dim,
                    "attention_dims": {
                        key.replace(_DOT, "."): layer.out_features
                        for key, layer in adapter.to_k.items()
                    },
                    "text_space_parts": adapter.text_space_parts,
                }
                for name, adapter in adapters.items()
            }
        )
        for name, adapter in adapters.items():
            bundle.adapters[name].load_state_dict(adapter.state_dict())
        return bundle
