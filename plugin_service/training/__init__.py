"""Training jobs: recogniser, shadow/attacker reconstruction networks, offline head fine-tuning."""
