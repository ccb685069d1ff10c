"""LoRA adapters (peft) on a timm classifier: which layers, injected how, trained which way.

    from medfm.finetune.lora import apply_lora
    model = apply_lora(model, recipe, seed=0)   # adapters in place; model(x) and its head as before

Method. Each adapted layer W (a Linear, or a Conv2d with one group) becomes W x + (alpha / r) B A x,
with A (r x in, Kaiming-uniform under the run's seed) and B (out x r, zeros), so training starts
from the pretrained network's function exactly (Hu et al. 2021). Only A, B and the new head train;
every pretrained weight is frozen, and so are the BatchNorm running statistics (the norm layers
stay in eval mode while training: they normalize with the pretrained statistics, which the
adapters' updates are small against). `lora_dropout` drops the adapters' input while training.

Which layers (`lora_targets`). `auto`, per family: a transformer (any Linear inside a module
named `attn`/`attention`: timm ViT/DeiT/Swin/EVA `attn.qkv` and `attn.proj`, Transformers'
`query`/`key`/`value`/`output.dense`, a torch MultiheadAttention as in OpenCLIP's towers: its
in- and out-projections) gets its attention projections, as in the LoRA paper; a
network without attention (ResNet, EfficientNet, ConvNeXt, ...) gets every dense Conv2d and
Linear outside its head (pointwise and full convs, ConvNeXt's MLP), since its depthwise convs
hold few weights and peft adapts a grouped conv only when the rank divides its groups.
Otherwise, comma-separated module names, each matching a module of that name or whose dotted
path ends with it (`qkv,proj`, `conv_pw`), as peft matches them. A layer is adaptable when peft
mirrors it exactly: a Linear, a Conv2d with one group, zero padding mode and Conv2d's own
forward (timm's dynamic-padding `Conv2dSame` pads inside its forward, which an adapter would not),
or a MultiheadAttention (not the Linear inside it, whose forward it never calls).
"""

from __future__ import annotations

import torch

from medfm.errors import InvalidArgumentError
from medfm.resolve.recipes import LORA_AUTO, Recipe

ATTENTION_WORDS = ("attn", "attention")  # a Linear under a module so named is a projection
ADAPTER_PREFIX = "lora_"  # peft names every adapter tensor lora_A.<adapter>, lora_B.<adapter>
SHOWN_NAMES = 4  # an error lists this many module names


def _adaptable(module: torch.nn.Module) -> bool:
    """Whether peft's LoRA layer computes exactly what `module` does, plus the update."""
    if isinstance(module, torch.nn.MultiheadAttention):  # OpenCLIP towers: peft adapts its
        return True  # fused in-projection and its out-projection
    if isinstance(module, torch.nn.Linear):
        return type(module).forward is torch.nn.Linear.forward
    if isinstance(module, torch.nn.Conv2d):
        return (type(module).forward is torch.nn.Conv2d.forward and module.groups == 1
                and module.padding_mode == "zeros")
    return False


def _head_names(model: torch.nn.Module) -> set[str]:
    """Full names of the classifier's modules (it trains in full, never adapted)."""
    head = {id(m) for m in model.get_classifier().modules()}
    return {name for name, m in model.named_modules() if id(m) in head}


def _inside_fused_attention(model: torch.nn.Module) -> set[str]:
    """Names of the Linear layers inside a MultiheadAttention, whose weights it uses without
    calling them: an adapter there would never run (the attention module is the target)."""
    fused = [name for name, m in model.named_modules()
             if isinstance(m, torch.nn.MultiheadAttention)]
    return {name for name, _ in model.named_modules()
            if any(name.startswith(f + ".") for f in fused)}


def default_targets(model: torch.nn.Module) -> list[str]:
    """The `auto` layers (module docstring): attention projections if any, else every dense
    Conv2d and Linear outside the head."""
    skipped = _head_names(model) | _inside_fused_attention(model)
    candidates = [(name, m) for name, m in model.named_modules()
                  if name not in skipped and _adaptable(m)]
    attention = [name for name, m in candidates
                 if isinstance(m, torch.nn.MultiheadAttention) or (
                     isinstance(m, torch.nn.Linear) and any(
                         w in part for part in name.split(".")[:-1] for w in ATTENTION_WORDS))]
    return attention or [name for name, _ in candidates]


def has_attention(model: torch.nn.Module) -> bool:
    """Whether `model` is of the transformer family: it has attention layers (a
    MultiheadAttention, or a Linear inside a module named attn/attention), as `auto` sees it."""
    return any(isinstance(m, torch.nn.MultiheadAttention) or (
        isinstance(m, torch.nn.Linear) and any(
            w in part for part in name.split(".")[:-1] for w in ATTENTION_WORDS))
        for name, m in model.named_modules())


def resolve_targets(model: torch.nn.Module, targets: str) -> list[str]:
    """Full module names that `targets` (LORA_AUTO or comma-separated names) selects; raises
    InvalidArgumentError when it selects nothing, or a layer peft cannot adapt exactly."""
    kind = type(model).__name__
    if targets == LORA_AUTO:
        names = default_targets(model)
        if not names:
            raise InvalidArgumentError(
                f"LoRA finds no layer to adapt in {kind}: it has no Linear and no dense Conv2d "
                "outside its head; fine-tune it in full, or probe it.")
        return names
    modules, head = dict(model.named_modules()), _head_names(model)
    names = []
    for wanted in targets.split(","):
        found = [n for n in modules if n == wanted or n.endswith("." + wanted)]
        if not found:
            raise InvalidArgumentError(
                f"LoRA target {wanted!r} names no module of {kind}; name Linear or Conv2d "
                f"layers, e.g. {', '.join(default_targets(model)[:SHOWN_NAMES]) or 'none'}.")
        for name in found:
            if name in head:
                raise InvalidArgumentError(
                    f"LoRA target {wanted!r} is the classifier head ({name}), which trains in "
                    "full; name backbone layers.")
            if not _adaptable(modules[name]) or name in _inside_fused_attention(model):
                raise InvalidArgumentError(
                    f"LoRA cannot adapt {name} of {kind} ({type(modules[name]).__name__}): "
                    "peft adapts Linear layers and Conv2d layers with one group and their own "
                    "padding; name other layers, or use lora_targets=auto.")
        names += [n for n in found if n not in names]
    return names


def apply_lora(model: torch.nn.Module, recipe: Recipe, *, seed: int) -> torch.nn.Module:
    """Inject the recipe's adapters into `model` in place (peft), their A matrices drawn under
    `seed`, and leave trainable only the adapters and the head; returns `model`."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise InvalidArgumentError(
            "LoRA needs peft, an optional dependency: pip install 'medfm[lora]'.") from None
    names = resolve_targets(model, recipe.lora_targets)
    config = LoraConfig(r=recipe.lora_rank, lora_alpha=recipe.lora_alpha,
                        lora_dropout=recipe.lora_dropout, target_modules=names, bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = inject_adapter_in_model(config, model)
    mark_trainable(model)
    return model


def is_adapter(name: str) -> bool:
    """Whether a parameter name (`...qkv.lora_A.default.weight`) is a LoRA adapter's."""
    return any(part.startswith(ADAPTER_PREFIX) for part in name.split("."))


def mark_trainable(model: torch.nn.Module) -> None:
    """requires_grad on the adapters and the head only."""
    head = {id(p) for p in model.get_classifier().parameters()}
    for name, p in model.named_parameters():
        p.requires_grad_(id(p) in head or is_adapter(name))


def adapted_modules(model: torch.nn.Module) -> int:
    """How many layers carry an adapter."""
    return sum(1 for name, _ in model.named_modules() if name.endswith(".lora_A"))
