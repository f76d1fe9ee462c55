"""Figure builders: tidy tables in, plotly figures out (no widgets, no browser)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from vllm import SamplingParams

from workbench.notebook import figures
from workbench.tables import captures_frame


def synthetic_frame() -> pd.DataFrame:
    rows = []
    for request, offset in (("baseline", 0.0), ("steered", 1.0)):
        for layer in (0, 1, 2):
            for position in range(4):
                rows.append(
                    {
                        "request": request,
                        "layer": layer,
                        "position": position,
                        "token_id": 10 + position,
                        "token": f"t{position}",
                        "phase": "prompt" if position < 3 else "generated",
                        "message": 0 if position < 2 else 1,
                        "role": "system" if position < 2 else "user",
                        "norm": layer + position + offset,
                    }
                )
    return pd.DataFrame(rows)


def test_layer_norm_figure_has_a_line_per_request():
    figure = figures.build_layer_norm_figure(synthetic_frame())
    assert [trace.name for trace in figure.data] == ["baseline", "steered"]
    assert list(figure.data[0].x) == [0, 1, 2]
    assert np.allclose(figure.data[0].y, [1.5, 2.5, 3.5])  # mean over 4 positions
    assert np.allclose(figure.data[1].y, [2.5, 3.5, 4.5])


def test_message_norm_figure_uses_prompt_rows_of_one_layer():
    figure = figures.build_message_norm_figure(synthetic_frame(), layer=1)
    assert list(figure.data[0].x) == ["0: system", "1: user"]
    assert np.allclose(figure.data[0].y, [1.5, 3.0])  # positions 0,1 and 2 (3 is generated)


def test_token_heatmap_has_layers_by_positions_and_token_hover():
    figure = figures.build_token_heatmap_figure(synthetic_frame(), request="steered")
    heatmap = figure.data[0]
    assert np.asarray(heatmap.z).shape == (3, 4)
    assert heatmap.z[2][3] == 2 + 3 + 1.0
    assert list(heatmap.customdata[0]) == ["t0", "t1", "t2", "t3"]


def test_sweep_figure():
    sweep = pd.DataFrame({"scale": [-1.0, 0.0, 1.0], "text": ["a", "b", "c"], "proj_generated_mean": [-3.0, 0.0, 3.0]})
    figure = figures.build_sweep_figure(sweep)
    assert list(figure.data[0].x) == [-1.0, 0.0, 1.0] and list(figure.data[0].y) == [-3.0, 0.0, 3.0]


async def test_cosine_figures_from_real_captures(model):
    greedy = SamplingParams(temperature=0.0, max_tokens=6)
    conversation = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello!"}]
    vector = torch.randn(model.hidden_size, generator=torch.Generator().manual_seed(4)) * 20
    from workbench import AddSpec, LayerSteeringSpec, SteeringSpec

    spec = SteeringSpec({2: LayerSteeringSpec(add=AddSpec(vector))})
    _, handles = await model.chat(
        [conversation, conversation],
        sampling_params=greedy,
        capture_layers=[1, 2, 8],
        steering_spec=[SteeringSpec(), spec],
    )
    await model.fetch_captures_batch(handles)
    cosines = figures.message_cosines(handles[0], 8)
    assert len(cosines) == 4
    assert cosines.loc[cosines.message_a == cosines.message_b, "cosine"].to_numpy() == pytest.approx(1.0, abs=1e-5)
    heatmap = figures.build_cosine_heatmap_figure(cosines)
    assert np.asarray(heatmap.data[0].z).shape == (2, 2)
    per_layer = figures.layer_cosines(handles[0], handles[1], prompt_only=True)
    assert per_layer.loc[per_layer.layer == 1, "cosine"].item() == pytest.approx(
        1.0, abs=1e-6
    )  # before the steered layer
    assert per_layer.loc[per_layer.layer == 2, "cosine"].item() < 0.999
    assert len(figures.build_layer_cosine_figure(per_layer).data[0].x) == 3
    frame = captures_frame(handles, model.tokenizer, labels=["baseline", "steered"])
    assert len(figures.build_layer_norm_figure(frame).data) == 2
    assert len(figures.build_message_norm_figure(frame, 8).data[0].x) == 2
