"""Locust suite for the reward service (DESIGN.md section 7; `make loadtest`).

Modules (import them by package path; Locust loads the two entry files by file path):
- ``locustfile`` — entry file: the REST user and the Triton gRPC user, no shape (``-u/-r/-t``);
- ``shapes`` — entry file: :class:`TrainerStepShape`, N trainer ranks bursting every step; pass
  it next to the locustfile, ``-f loadtest/locust/locustfile.py,loadtest/locust/shapes.py``;
- ``users`` — the user classes; ``payloads`` — images pre-rendered once per process;
  ``steps`` — the step schedule shared by the shape and the users (and sent to workers);
  ``options`` — the suite's command-line arguments (each also an env var, ``LOCUST_*``);
  ``requestlog`` — every request's start time, rank and step, as CSV; ``finalcsv`` — Locust's
  CSV totals rewritten at exit (Locust drops the last second); ``plot`` — the PNG (no Locust).

``python -m loadtest.run_locust`` runs the suite headless (against a URL or a stack it starts)
and writes Locust's CSV and HTML, the request log and the plot per scenario.
"""
