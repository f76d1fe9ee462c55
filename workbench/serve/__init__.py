"""The steering server: vLLM's OpenAI-compatible server with per-request steering and capture.

``workbench serve [MODEL] [vllm serve options]`` (or ``python -m
workbench.serve``) starts it; ``workbench.remote.RemoteSteerModel`` is its
client. Modules, each with one job:

- ``cli``: the command line (vLLM's parser plus the workbench options);
- ``server``: start-up, in the order of vLLM's ``run_server``;
- ``_vllm_server``: the one door into vLLM's server code;
- ``middleware``: request fields in, capture ids and inf/NaN flags out;
- ``request_fields``: the ``steering`` and ``capture_layers`` fields, checked;
- ``steering``: tickets, and the engine's ``generate`` for steered requests;
- ``captures``: capture ids, rows until fetched, expiry and the memory limit;
- ``spec_store``: named specs and vectors from ``--steering-dir``;
- ``routes``: the server's own HTTP routes;
- ``replies``: error replies in vLLM's shape.
"""
