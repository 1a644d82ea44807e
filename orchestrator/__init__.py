"""The brain: scheduler, durable state store, daemon, budgets and the CLI.

Arrows point one way: orchestrator -> providers -> jobs/infra.
"""
