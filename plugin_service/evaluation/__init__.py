"""Privacy and utility evaluation: attackers, metrics, verification accuracy, reports."""
