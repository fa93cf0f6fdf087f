"""Attacks: each module registers one with `@attack("name")` (harness.contracts.attack)."""
