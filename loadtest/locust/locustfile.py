"""Locust entry file: the reward service's users, closed loop, no shape.

    locust -f loadtest/locust/locustfile.py --headless --host http://127.0.0.1:8000 \
        RestScoreUser -u 8 -r 8 -t 30s --images-per-request 8
    locust -f loadtest/locust/locustfile.py --headless TritonGrpcUser \
        --triton-grpc 127.0.0.1:8001 --tokenizer REPO/tokenizer.json -u 8 -r 8 -t 30s

Add ``,loadtest/locust/shapes.py`` to ``-f`` for the trainer-shaped run (see ``shapes``).
Run from the repository root (or with the project installed): imports are by package path.
"""

from loadtest.locust.users import RestScoreUser, TritonGrpcUser

__all__ = ["RestScoreUser", "TritonGrpcUser"]
