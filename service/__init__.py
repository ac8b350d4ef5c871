"""Runtime side of the reward service (never imports torch).

Holds the typed settings, the runtime reward logic (contrastive prompts, TextNorm in numpy),
the CLI entry point ``reward-service`` and — in later issues — the FastAPI gateway that talks to
Triton over gRPC.
"""
