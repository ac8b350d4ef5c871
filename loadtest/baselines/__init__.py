"""Baseline reward servers the serving benchmark compares the product against.

- ``naive_server``: FastAPI + eager ``transformers`` CLIP, one request at a time, raw cosine —
  the pattern of most hand-written reward servers;
- ``litserve_server``: the same model behind LitServe's dynamic batching (max batch 32, 10 ms).

Both load the checkpoint with ``export.clip_model.load_clip`` and answer ``POST /v1/score`` with
the gateway's request and response shape (``results[i].raw``), so one load generator drives every
system. Neither computes TextNorm: that is what such wrappers return. Each is a process of its
own: ``python -m loadtest.baselines.naive_server --model DIR --port P``.
"""

NAIVE_MODULE = "loadtest.baselines.naive_server"
LITSERVE_MODULE = "loadtest.baselines.litserve_server"
