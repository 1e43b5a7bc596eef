"""Benchmarks that ship with the `server` package (`conveyor bench ...`).

`serve`: a load generator for any OpenAI-compatible server. Its modules never import torch:
the client shares the machine's cores with the server it measures.
"""
