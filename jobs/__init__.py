"""What a job is and what runs on the GPU: the job spec, estimates and the training payload.

Knows nothing about providers or the orchestrator; the payload imports only ``jobs`` and ``infra``.
"""
