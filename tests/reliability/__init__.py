"""Reliability and security suite (issue 13): supervision, bad input, the OpenAPI contract."""
