"""Privacy and utility evaluation: attackers, metrics, verification accuracy, reports.

Module map (one job each; :mod:`.runner` ties them together for `advface evaluate`):

* :mod:`.config`        EvaluationConfig (every knob, full and ``--quick`` defaults), EvaluationError
* :mod:`.data`          verification faces, attack halves, and the checks that keep them fair
* :mod:`.caches`        content-hashed safetensors caches: trained networks, finished passes
* :mod:`.attackers`     decoders the attacker trains (paper, adaptive, from e); transfer shadows
* :mod:`.passes`        protectors as evaluated; one streamed pass of a protector over the faces
* :mod:`.attacks`       training-free A2 inversion and the A3 linkage student
* :mod:`.scoring`       reconstruction quality, replay, identity by the judge, per-tier summary
* :mod:`.tiers`         the attacker tiers A0-A3 and the embedding-only floor
* :mod:`.report`        results.json, report.md, the figures
* :mod:`.finetune`      `advface finetune-head`, the offline mode
* :mod:`.shadow_check`  the shadow round trip's accuracy cost, for choosing a shadow's size
* :mod:`.cli_args`      the subcommands, for plugin_service/cli.py
"""
