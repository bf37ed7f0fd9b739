"""Every name a user can type that selects code, in one place: protectors, architectures, teachers, halves.

Each list used to be repeated in the module that implements it, the CLI that offers it and the
config that validates it, and the copies drifted. They live here, importing nothing, so the
torch-free server policy and every ``--help`` can use them without loading PyTorch, and adding a
protector or an architecture is one edit here plus its implementation.
"""

from __future__ import annotations

PROTECTORS = ("advface", "resynth", "random", "dp", "none")  # what a client may ask the service for
SHADOW_ARCHITECTURES = ("urec", "resrec", "transrec")  # reconstruction networks: shadows and attackers
RECOGNIZER_ARCHITECTURES = ("light", "facenet")  # R after the split: the light head, or InceptionResnetV1's rest
TEACHERS = ("dlib",)  # pretrained recognisers a student can be distilled from
IDENTITY_HALVES = ("all", "defender", "attacker")  # the identity-disjoint halves of a public face folder
DEFAULT_SPLIT = "conv2d_2b"  # the last layer of E: the paper's split (--split)

