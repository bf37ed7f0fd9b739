"""The adaptive attacker: one that knows the defence and trains against it.

Beyond the paper's setting (attackers trained on clean features), this attacker knows that the
server stores AdvFace features and how AdvFace works, but not the defender's shadow weights or
data. So it trains ITS OWN shadow model (the bundle's architecture and size, its own seed) on its
own half of the attack data, protects its own faces with AdvFace(E, own shadow) under the same
PGD settings, and trains a reconstruction network on the resulting (image, protected feature)
pairs. It is then evaluated on the defender's protected features like every other attacker.

The protected training features are computed once (PGD is the expensive part) and held as
float16; the network therefore trains without the flip augmentation the other attackers use.
"""

from __future__ import annotations

import torch
from torch import nn

from plugin_service.bundle import Bundle
from plugin_service.evaluation.attackers import (
    Recipe,
    TrainedNet,
    attacker_recipe,
    obtain,
    recipe_key,
    shadow_recipe,
    train_on_features,
)
from plugin_service.evaluation.cache import ModelCache
from plugin_service.evaluation.config import EvaluationConfig
from plugin_service.evaluation.data import AttackData, batch_order, fingerprint, holdout
from plugin_service.evaluation.protection import make_protector, protect_dataset
from plugin_service.protect.registry import ProtectorParams
from plugin_service.reconstruction import (
    ValidationScores,
    fit_reconstructor,
    validate_pairs,
)


def train_on_pairs(recipe: Recipe, images: torch.Tensor, features: torch.Tensor, val_images: torch.Tensor,
                   val_features: torch.Tensor, device: torch.device,
                   desc: str = "adaptive") -> tuple[nn.Module, ValidationScores]:
    """L1 training of ``recipe.spec`` on fixed (uint8 image, feature) pairs, Adam as in the paper."""
    def pairs_of(imgs: torch.Tensor, feats: torch.Tensor):  # noqa: ANN202
        def pairs(idx: torch.Tensor, *_: object) -> tuple[torch.Tensor, torch.Tensor]:
            return imgs[idx].float().div(255).to(device), feats[idx].float().to(device)
        return pairs

    val = pairs_of(val_images, val_features)
    return fit_reconstructor(recipe.training(), len(images), pairs_of(images, features),
                             lambda m: validate_pairs(m, len(val_images), val), device, desc)


def train_adaptive_attacker(cfg: EvaluationConfig, bundle: Bundle, attack: AttackData, params: ProtectorParams,
                            cache: ModelCache, device: torch.device) -> tuple[TrainedNet, TrainedNet]:
    """(the attacker's own shadow, the adaptive attacker), both trained on the attacker half only."""
    assert cfg.adaptive_attacker is not None
    faces = attack.attacker
    fp = fingerprint(faces)
    arch = bundle.manifest.shadow.arch
    own_shadow = train_on_features(arch, "adaptive-shadow", shadow_recipe(cfg, bundle, arch, "adaptive-shadow"),
                                   faces, fp, bundle, cache, device)
    recipe = attacker_recipe(cfg, bundle, cfg.adaptive_attacker, "adaptive-attacker")
    resolved = params.resolved(bundle)
    protection = {"name": "advface", "steps": resolved.steps, "alpha": resolved.alpha, "eps": resolved.eps,
                  "norm": resolved.norm, "batch_size": cfg.batch_size, "shadow": own_shadow.cache_key}
    key = recipe_key("adaptive-attacker", recipe, bundle, faces, fp, adaptive=True, protector=protection)

    train, val = holdout(faces)

    def run() -> tuple[nn.Module, ValidationScores]:
        shadow = own_shadow.model.to(device)
        protector = make_protector("advface", bundle, params, shadow=shadow)
        order = batch_order(len(train), recipe.seed)
        train_features = protect_dataset(train.images, bundle.extractor, protector, order, cfg.batch_size, device,
                                         desc="attacker protects its faces")
        val_features = protect_dataset(val, bundle.extractor, protector, batch_order(len(val), recipe.seed),
                                       cfg.batch_size, device, desc="attacker protects its val faces")
        return train_on_pairs(recipe, train.images, train_features, val, val_features, device,
                              desc=f"adaptive {recipe.spec.arch}")

    label = f"{cfg.adaptive_attacker}+adaptive"
    return own_shadow, obtain(label, "adaptive-attacker", recipe, faces, key, cache, run, len(train))
