"""Plumbing shared by everything else: checkpoint storage, retries, logging, config.

Imports nothing else of ours.
"""
