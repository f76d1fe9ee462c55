"""Scale sweeps: one prompt or conversation, one direction, many scales, run
as one batch of per-request specs (concurrent requests share vLLM's batches).

Returns a DataFrame with a row per scale: ``scale``, ``text``,
``generated_tokens``, ``nonfinite_layer`` (where steering broke the
residual stream, or ``None``), and statistics of the projection on the unit direction
at ``measure_layer`` (default: the steered layer, after the op):
``proj_prompt_mean``, ``proj_generated_mean``, ``proj_generated_std``, and
``norm_generated_mean``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from workbench.errors import SpecError
from workbench.specs import AblationSpec, AddSpec, SteeringSpec

if TYPE_CHECKING:
    from workbench.steer_model import SteerModel

SWEEP_OPS = ("add", "ablation")


def sweep_specs(
    base: SteeringSpec, layer: int, vector: Any, scales: Sequence[float], op: str, positions: str
) -> list[SteeringSpec]:
    """``base`` with ``layer``'s ``op`` set to ``vector`` at each scale."""
    if op not in SWEEP_OPS:
        raise SpecError(f"op must be one of {SWEEP_OPS}, got {op!r}")
    make = AddSpec if op == "add" else AblationSpec
    field = "add" if op == "add" else "ablation"
    return [base.with_layer(layer, **{field: make(vector, scale=scale, positions=positions)}) for scale in scales]


async def run_sweep(
    model: SteerModel,
    prompt: str | Sequence[Mapping[str, Any]],
    layer: int,
    vector: Any,
    scales: Sequence[float],
    sampling_params: Any = None,
    *,
    op: str = "add",
    positions: str = "all",
    measure_layer: int | None = None,
    chat_options: Mapping[str, Any] | None = None,
    base_spec: SteeringSpec | None = None,
    progress: bool | Callable[[int, int], None] = True,
    **sampling_kwargs: Any,
) -> pd.DataFrame:
    """The sweep (see the module docstring). Sampling comes from
    ``sampling_params`` or keyword arguments (default: greedy, 32 tokens);
    ``base_spec`` is the steering the sweep starts from (default: the
    model's current state)."""
    if not scales:
        raise SpecError("scales is empty")
    sampling_params = model._resolve_sampling(sampling_params, sampling_kwargs, temperature=0.0, max_tokens=32)
    base = model.export_steering_spec() if base_spec is None else base_spec
    specs = sweep_specs(base, layer, vector, scales, op, positions)
    measure = layer if measure_layer is None else measure_layer
    direction = specs[0].layers[layer].add.vector if op == "add" else specs[0].layers[layer].ablation.vector
    direction = direction / direction.norm()

    async def one(spec: SteeringSpec) -> tuple[Any, Any]:
        if isinstance(prompt, str):
            texts, handles = await model.generate(prompt, sampling_params, capture_layers=[measure], steering_spec=spec)
        else:
            texts, handles = await model.chat(
                prompt,
                sampling_params=sampling_params,
                capture_layers=[measure],
                chat_options=chat_options,
                steering_spec=spec,
            )
        await model.fetch_captures_batch(handles)
        return texts[0], handles[0]

    tasks = [asyncio.ensure_future(one(spec)) for spec in specs]
    report = progress if callable(progress) else None
    with tqdm(total=len(tasks), desc=f"sweep layer {layer}", disable=not progress or report is not None) as bar:
        done = 0

        def finished(_: Any) -> None:
            nonlocal done
            done += 1
            bar.update()
            if report is not None:
                report(done, len(tasks))

        for task in tasks:
            task.add_done_callback(finished)
        results = await asyncio.gather(*tasks)
    rows = []
    for scale, (completion, handle) in zip(scales, results):
        hidden = handle.hidden(measure).float()
        prompt_rows = len(handle.prompt_token_ids)
        proj = hidden @ direction
        generated = hidden[prompt_rows:]
        rows.append(
            {
                "scale": float(scale),
                "text": str(completion),
                "generated_tokens": len(handle.generated_token_ids),
                "nonfinite_layer": completion.nonfinite_layer,
                "proj_prompt_mean": proj[:prompt_rows].mean().item(),
                "proj_generated_mean": proj[prompt_rows:].mean().item() if len(generated) else float("nan"),
                "proj_generated_std": proj[prompt_rows:].std().item() if len(generated) > 1 else float("nan"),
                "norm_generated_mean": torch.linalg.vector_norm(generated, dim=-1).mean().item()
                if len(generated)
                else float("nan"),
            }
        )
        handle.close()
    return pd.DataFrame(rows)
