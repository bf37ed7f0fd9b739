"""Enroll, verify, identify: the recognition backend's logic, with the plug-in as its enrollment hook.

Enrollment sends the clean features z through the AdvFace Guard plug-in and stores only what
comes back (and its embedding); z is dropped when the request ends. Probes are clean z embedded
by the same R, so a score is cos(R(protected enrolled feature), R(clean probe feature)): the
setting the evaluation's "utility" rows measure.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc
import numpy as np
from advface_client import BatchError, GuardClient, Options

from reference_backend.inputs import BadInput
from reference_backend.matching import (
    DEFAULT_THRESHOLD,
    Identification,
    Verification,
    best_score,
    rank_persons,
)
from reference_backend.recognition import Recognition
from reference_backend.store import Store

log = logging.getLogger(__name__)


class PluginError(RuntimeError):
    """The plug-in did not protect an enrollment (unreachable, rejected it, or another bundle); nothing was stored."""


class UnknownPerson(LookupError):
    """Verification against a person with no enrolled face."""


@dataclass(frozen=True)
class Enrollment:
    person_id: str
    face_ids: list[int]
    plugin_model: str


class Backend:
    """A face-recognition backend that stores only plug-in-protected features."""

    def __init__(self, plugin: GuardClient, recognition: Recognition, store: Store,
                 threshold: float = DEFAULT_THRESHOLD, options: Options | None = None) -> None:
        self.plugin, self.recognition, self.store = plugin, recognition, store
        self.threshold, self.options = threshold, options or Options()

    def refresh_embeddings(self) -> int:
        """Re-embeds, from the stored features, every row another R embedded; returns how many."""
        count = 0
        for face_id, feature in self.store.stale(self.recognition.version):
            self.store.set_embedding(face_id, self.recognition.embed(feature[None])[0], self.recognition.version)
            count += 1
        if count:
            log.info("re-embedded %d stored faces with recogniser %s", count, self.recognition.version)
        return count

    def enroll(self, person_id: str, z: np.ndarray) -> Enrollment:
        """Protects ``z`` (N, C, H, W) through the plug-in and stores the result; raises PluginError, storing nothing, if it cannot."""
        protected, plugin_model = self._protect(z)
        embeddings = self.recognition.embed(protected)
        face_ids = self.store.add(person_id, protected, plugin_model, embeddings, self.recognition.version)
        log.info("enrolled %d faces for one person (plug-in bundle %s)", len(face_ids), plugin_model)
        return Enrollment(person_id, face_ids, plugin_model)

    def verify(self, person_id: str, z: np.ndarray) -> Verification:
        gallery = self.store.gallery(person_id)
        if not gallery.face_ids:
            raise UnknownPerson(f"no face is enrolled for person {person_id!r}")
        return Verification(person_id, best_score(gallery, self._probe(z)), self.threshold)

    def identify(self, z: np.ndarray, top_k: int = 5) -> Identification:
        return Identification(rank_persons(self.store.gallery(), self._probe(z), top_k), self.threshold)

    def _probe(self, z: np.ndarray) -> np.ndarray:
        """R(z) of exactly one clean probe face: a unit vector, so dot products are cosines."""
        if len(z) != 1:
            raise BadInput(f"a probe is one face; got {len(z)}")
        return self.recognition.embed(z)[0]

    def _protect(self, z: np.ndarray) -> tuple[np.ndarray, str]:
        target = self.plugin.target
        try:
            result = self.plugin.protect(z, options=self.options)
        except BatchError as e:
            raise PluginError(f"the AdvFace Guard plug-in at {target} rejected the faces "
                              f"({e.code.name}: {e.detail}); nothing was stored") from e
        except grpc.RpcError as e:
            raise PluginError(f"the AdvFace Guard plug-in at {target} did not answer "
                              f"({e.code().name}: {e.details()}); nothing was stored") from e
        if result.model_version != self.recognition.bundle_version:
            raise PluginError(f"the plug-in at {target} serves bundle {result.model_version} but this backend's E and R "
                              f"come from bundle {self.recognition.bundle_version}; start both with the same bundle; "
                              "nothing was stored")
        assert result.features is not None  # protect() raises when the batch failed
        if result.features.shape != z.shape:
            raise PluginError(f"the plug-in answered shape {list(result.features.shape)} for {list(z.shape)}; "
                              "nothing was stored")
        return result.features, result.model_version
