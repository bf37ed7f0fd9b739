"""Privacy and utility evaluation: attackers, metrics, verification accuracy, reports.

Module map (one job each; :mod:`.runner` ties them together for `advface evaluate`):

* :mod:`.config`        EvaluationConfig: every knob, full and ``--quick`` defaults
* :mod:`.data`          verification faces + pair indices, attack data split into halves
* :mod:`.disjointness`  refuses attackers that share identities with the bundle's shadow
* :mod:`.consistency`   refuses a recogniser whose E is not the bundle's
* :mod:`.cache`         content-hashed safetensors cache of trained networks
* :mod:`.attackers`     paper-setting attackers (attacker half), transfer shadows (defender half)
* :mod:`.adaptive`      the attacker that knows the defence and trains on protected features
* :mod:`.protection`    protectors with an eps knob or another shadow; whole datasets protected
* :mod:`.pipeline`      one streamed pass: E -> protector -> attackers and heads, per-face numbers
* :mod:`.metrics`, :mod:`.verification`, :mod:`.privacy`, :mod:`.replay`, :mod:`.utility`  the numbers
* :mod:`.figures`, :mod:`.report`  PNGs, report.md, results.json
* :mod:`.finetune`      `advface finetune-head`, the offline mode
* :mod:`.cli_args`      the two subcommands, for plugin_service/cli.py
"""
