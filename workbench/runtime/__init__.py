"""The part of workbench that runs inside vLLM's worker processes.

vLLM loads it through the engine arguments the client sets
(``workbench.wire``): ``worker`` registers the ``workbench`` load format,
which wraps every decoder layer (``layer``) with its steering tables
(``steering_tables``) and operator (``layer_op``, ``triton_steer``), and
serves the client's RPCs; ``capture_store`` and ``capture_space`` keep the
captured rows, ``nonfinite`` which steered requests broke, and
``_vllm_internals`` is the one module that touches vLLM's internals.
Nothing here imports the client; what crosses is defined in ``workbench.wire``.
"""
