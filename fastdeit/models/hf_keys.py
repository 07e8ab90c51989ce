"""Parameter names of timm's ViT / DeiT and of Hugging Face transformers' ViT / DeiT (with
teacher), both ways: `fastdeit export --format hf` writes the latter, and a transformers folder
given as weights (`--weights`, `model.init`, `--teacher-ckpt`) is read back into timm's names.
transformers 5 renamed the block parameters; both generations are known."""

from __future__ import annotations

import torch

_BLOCK_V5 = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.o_proj",
             "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2", "q": "attention.q_proj", "k": "attention.k_proj",
             "v": "attention.v_proj"}
_BLOCK_V4 = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
             "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense", "q": "attention.attention.query",
             "k": "attention.attention.key", "v": "attention.attention.value"}


def _layer(distilled: bool, v4: bool) -> tuple[str, str, dict[str, str]]:
    pre = "deit" if distilled else "vit"
    return pre, f"{pre}.encoder.layer" if v4 else f"{pre}.layers", _BLOCK_V4 if v4 else _BLOCK_V5


def key_pairs(depth: int, distilled: bool, v4: bool) -> list[tuple[str, str]]:
    """(timm key, transformers key) of every parameter but the blocks' qkv (split in three)."""
    pre, layer, names = _layer(distilled, v4)
    pairs = [("cls_token", f"{pre}.embeddings.cls_token"), ("pos_embed", f"{pre}.embeddings.position_embeddings"),
             ("norm.weight", f"{pre}.layernorm.weight"), ("norm.bias", f"{pre}.layernorm.bias")]
    for part in ("weight", "bias"):
        pairs.append((f"patch_embed.proj.{part}", f"{pre}.embeddings.patch_embeddings.projection.{part}"))
        for i in range(depth):
            pairs += [(f"blocks.{i}.{ours}.{part}", f"{layer}.{i}.{names[ours]}.{part}")
                      for ours in ("norm1", "norm2", "attn.proj", "mlp.fc1", "mlp.fc2")]
        if distilled:
            pairs += [(f"head.{part}", f"cls_classifier.{part}"),
                      (f"head_dist.{part}", f"distillation_classifier.{part}")]
        else:
            pairs.append((f"head.{part}", f"classifier.{part}"))
    if distilled:
        pairs.append(("dist_token", "deit.embeddings.distillation_token"))
    return pairs


def hf_state_dict(sd: dict[str, torch.Tensor], depth: int, distilled: bool, v4: bool) -> dict[str, torch.Tensor]:
    """timm keys -> transformers keys; each block's qkv [3 * dim, ...] split into q, k, v."""
    out = {theirs: sd[ours] for ours, theirs in key_pairs(depth, distilled, v4)}
    _, layer, names = _layer(distilled, v4)
    for i in range(depth):
        for part in ("weight", "bias"):
            for name, t in zip("qkv", sd[f"blocks.{i}.attn.qkv.{part}"].chunk(3, dim=0)):
                out[f"{layer}.{i}.{names[name]}.{part}"] = t.clone()
    return out


def timm_state_dict(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers keys (either generation) -> timm keys; q, k, v joined into qkv."""
    distilled = "deit.embeddings.distillation_token" in hf
    v4 = any(".encoder.layer." in k for k in hf)
    _, layer, names = _layer(distilled, v4)
    depth = 1 + max(int(k[len(layer) + 1:].split(".")[0]) for k in hf if k.startswith(layer + "."))
    sd = {ours: hf[theirs] for ours, theirs in key_pairs(depth, distilled, v4)}
    for i in range(depth):
        for part in ("weight", "bias"):
            sd[f"blocks.{i}.attn.qkv.{part}"] = torch.cat([hf[f"{layer}.{i}.{names[n]}.{part}"] for n in "qkv"])
    return sd
