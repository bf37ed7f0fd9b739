"""The networks an attacker (or the defender's transfer study) trains: paper-setting decoders, the adaptive attacker, the decoder from e.

Reconstruction networks the evaluation trains: the attackers and the defender's extra shadows.

* Attackers (the paper's setting): one fresh network per architecture, trained to invert clean
  features E(x) on the ATTACKER half of ``--attack-data`` with its own seed and width, so it
  shares neither data nor initialisation nor size with the bundle's shadow.
* Transfer shadows: the defender's shadow models of every architecture, trained on the DEFENDER
  half, to build AdvFace protectors for the shadow x attacker matrix (paper Table 4).

Every network goes through :func:`obtain`, which looks it up in the cache first.

The adaptive attacker: one that knows the defence and trains against it.

Beyond the paper's setting (attackers trained on clean features), this attacker knows that the
server stores AdvFace features and how AdvFace works, but not the defender's shadow weights or
data. So it trains ITS OWN shadow model (the bundle's architecture and size, its own seed) on its
own half of the attack data, protects its own faces with AdvFace(E, own shadow) under the same
PGD settings, and trains a reconstruction network on the resulting (image, protected feature)
pairs. It is then evaluated on the defender's protected features like every other attacker.

The protected training features are computed once (PGD is the expensive part) and held as
float16; the network therefore trains without the flip augmentation the other attackers use.

The embedding-only control's decoder: identity embedding e (D,) -> face (3, 160, 160).

It is what the floor's attacker trains: the same L1 objective and data as the feature decoders,
from the only thing any recognisable storage must keep.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from plugin_service.bundle import Bundle
from plugin_service.evaluation.caches import ModelCache, cache_key
from plugin_service.evaluation.config import EvaluationConfig, EvaluationError
from plugin_service.evaluation.data import AttackData, batch_order, fingerprint, holdout
from plugin_service.evaluation.passes import make_protector, protect_dataset
from plugin_service.faces import FaceSet
from plugin_service.models.extractor import FACE_SIZE, freeze
from plugin_service.models.shadow import SHADOW_ARCHITECTURES, ShadowSpec
from plugin_service.protect.registry import ProtectorParams
from plugin_service.reconstruction import (
    ReconstructionTraining,
    ValidationScores,
    fit_reconstructor,
    train_reconstructor,
    validate_pairs,
)

log = logging.getLogger(__name__)

# Seed offsets per role keep every network's initialisation and batch order distinct from the
# others and from the bundle's shadow (trained with seed 0 by default).
SEED_OFFSETS = {"attacker": 101, "shadow": 201, "adaptive-shadow": 301, "adaptive-attacker": 401}


@dataclass(frozen=True)
class Recipe:
    """How one reconstruction network is trained."""

    spec: ShadowSpec
    epochs: int
    seed: int
    lr: float
    batch_size: int

    def training(self) -> ReconstructionTraining:
        return ReconstructionTraining(self.spec, self.epochs, self.batch_size, self.lr, self.seed)


@dataclass
class TrainedNet:
    """A trained (or cached) network with what the report says about it."""

    label: str
    role: str
    model: nn.Module
    recipe: Recipe
    val: ValidationScores
    train_faces: int
    train_identities: int
    cache_key: str
    from_cache: bool

    def summary(self) -> dict[str, Any]:
        return {
            "label": self.label, "role": self.role, "arch": self.recipe.spec.arch, "width": self.recipe.spec.width,
            "depth": self.recipe.spec.depth, "epochs": self.recipe.epochs, "seed": self.recipe.seed,
            "lr": self.recipe.lr, "batch_size": self.recipe.batch_size, "train_faces": self.train_faces,
            "train_identities": self.train_identities, "val_l1": self.val.l1, "val_psnr": self.val.psnr,
            "val_ssim": self.val.ssim, "cache_key": self.cache_key[:16], "from_cache": self.from_cache,
        }


def role_seed(cfg: EvaluationConfig, role: str, arch: str) -> int:
    return cfg.seed * 1000 + SEED_OFFSETS[role] + SHADOW_ARCHITECTURES.index(arch)


def attacker_width(cfg: EvaluationConfig, bundle: Bundle) -> int:
    """The attackers' width: ``--attacker-width``, else twice the bundle shadow's; never the shadow's own."""
    shadow_width = bundle.manifest.shadow.width
    width = cfg.attacker_width if cfg.attacker_width is not None else 2 * shadow_width
    if width == shadow_width:
        raise EvaluationError(f"--attacker-width {width} equals the bundle shadow's width; the attackers must "
                              "differ from the defender's shadow in size, pick another width")
    return width


def attacker_recipe(cfg: EvaluationConfig, bundle: Bundle, arch: str, role: str = "attacker") -> Recipe:
    s = bundle.manifest.shadow
    spec = ShadowSpec(arch, attacker_width(cfg, bundle), cfg.attacker_depth, s.in_channels, s.in_size)
    return Recipe(spec, cfg.attacker_epochs, role_seed(cfg, role, arch), cfg.lr, cfg.train_batch_size)


def shadow_recipe(cfg: EvaluationConfig, bundle: Bundle, arch: str, role: str = "shadow") -> Recipe:
    """A defender-style shadow of ``arch``: the bundle's width/depth/epochs unless overridden."""
    s = bundle.manifest.shadow
    epochs = cfg.shadow_epochs or int(bundle.manifest.provenance.get("shadow_epochs", "10"))
    spec = ShadowSpec(arch, cfg.shadow_width or s.width, cfg.shadow_depth or s.depth, s.in_channels, s.in_size)
    return Recipe(spec, epochs, role_seed(cfg, role, arch), cfg.lr, cfg.train_batch_size)


def recipe_key(role: str, recipe: Recipe, bundle: Bundle, faces: FaceSet, data_fingerprint: str,
               adaptive: bool = False, protector: dict[str, Any] | None = None) -> str:
    """The cache key: bundle, recipe, exact training images and identities, and any protection."""
    return cache_key({
        "role": role, "bundle": bundle.content_hash, "spec": asdict(recipe.spec), "epochs": recipe.epochs,
        "seed": recipe.seed, "lr": recipe.lr, "batch_size": recipe.batch_size, "data": data_fingerprint,
        "identities": sorted(faces.identities), "adaptive": adaptive, "protector": protector or {},
    })


def obtain(label: str, role: str, recipe: Recipe, faces: FaceSet, key: str, cache: ModelCache,
           train: Callable[[], tuple[nn.Module, ValidationScores]], train_faces: int) -> TrainedNet:
    """The cached network for ``key``, or ``train()``'s result (which is then cached).

    ``faces`` is the whole half the network may use; ``train_faces`` how many of them it trains
    on (the rest are validation).
    """
    hit = cache.load(key, recipe.spec)
    if hit is not None:
        model, meta = hit
        val = ValidationScores(float(meta.get("val_l1", "nan")), float(meta.get("val_psnr", "nan")),
                               float(meta.get("val_ssim", "nan")))
        log.info("%s %s: loaded from cache (%s)", role, label, key[:12])
        return TrainedNet(label, role, model, recipe, val, train_faces, len(faces.identities), key, True)
    log.info("%s %s: training %s width %d depth %d for %d epochs on %d faces of %d identities", role, label,
             recipe.spec.arch, recipe.spec.width, recipe.spec.depth, recipe.epochs, train_faces, len(faces.identities))
    model, val = train()
    model = freeze(model.cpu())
    cache.save(key, model, recipe.spec, {"role": role, "label": label, "val_l1": repr(val.l1),
                                         "val_psnr": repr(val.psnr), "val_ssim": repr(val.ssim)})
    return TrainedNet(label, role, model, recipe, val, train_faces, len(faces.identities), key, False)


def train_on_features(label: str, role: str, recipe: Recipe, faces: FaceSet, root_fingerprint: str, bundle: Bundle,
                      cache: ModelCache, device: torch.device) -> TrainedNet:
    """A network inverting clean features E(x), trained on ``faces`` (every 20th held out)."""
    train, val = holdout(faces)
    key = recipe_key(role, recipe, bundle, faces, root_fingerprint)
    extractor = bundle.extractor

    def run() -> tuple[nn.Module, ValidationScores]:
        return train_reconstructor(recipe.training(), train, val, extractor, device, desc=f"{role} {label}")

    return obtain(label, role, recipe, faces, key, cache, run, len(train))


def train_attackers(cfg: EvaluationConfig, bundle: Bundle, attack: AttackData, cache: ModelCache,
                    device: torch.device) -> dict[str, TrainedNet]:
    """One attacker per ``cfg.attackers`` architecture, on the attacker half (paper setting)."""
    fp = fingerprint(attack.attacker)
    return {arch: train_on_features(arch, "attacker", attacker_recipe(cfg, bundle, arch), attack.attacker, fp,
                                    bundle, cache, device)
            for arch in cfg.attackers}


def train_transfer_shadows(cfg: EvaluationConfig, bundle: Bundle, attack: AttackData, cache: ModelCache,
                           device: torch.device) -> dict[str, TrainedNet | None]:
    """The defender's shadows for the transfer matrix; None marks the bundle's own architecture.

    The bundle's shadow is the deployed defence, so its row reuses it (and the main table's
    numbers) instead of a retrained copy.
    """
    fp = fingerprint(attack.defender)
    out: dict[str, TrainedNet | None] = {}
    for arch in cfg.transfer_shadows:
        if arch == bundle.manifest.shadow.arch:
            out[arch] = None
        else:
            out[arch] = train_on_features(arch, "shadow", shadow_recipe(cfg, bundle, arch), attack.defender, fp,
                                          bundle, cache, device)
    return out


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


def _up(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class EmbeddingDecoder(nn.Module):
    """A linear map to a 5x5 grid, then five x2 upsampling conv blocks to 160x160, sigmoid output."""

    def __init__(self, embedding_dim: int, width: int = 32) -> None:
        super().__init__()
        w = width
        self.base = 8 * w
        self.fc = nn.Linear(embedding_dim, self.base * 25)
        self.up = nn.Sequential(_up(8 * w, 8 * w), _up(8 * w, 4 * w), _up(4 * w, 2 * w), _up(2 * w, w), _up(w, w))
        self.out = nn.Conv2d(w, 3, 3, padding=1)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        x = self.fc(e.float()).view(-1, self.base, 5, 5)
        x = torch.sigmoid(self.out(self.up(x)))
        assert x.shape[-1] == FACE_SIZE
        return x
