"""Load generation and serving benchmarks (torch-free, except the naive baseline's model).

- ``serving``: `reward-service bench serving` — the gateway (REST), Triton's ``score`` model
  (gRPC), the baselines (``baselines/``: a naive FastAPI wrapper and LitServe) and the
  in-process ceiling, side by side in one run; ``report`` writes its tables and plot;
- ``locust/`` + ``run_locust``: the Locust suite for sizing a deployment (REST and gRPC users,
  a trainer-shaped load), `make loadtest`.
"""
