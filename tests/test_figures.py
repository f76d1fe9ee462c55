"""Figure builders and the summaries they plot: tidy tables in, plotly figures out (no widgets, no browser)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from vllm import SamplingParams

from workbench import AddSpec, LayerSteeringSpec, SteeringSpec
from workbench.notebook import figures, summaries
from workbench.tables import captures_frame

SINK = 100.0
"""The first token's norm in the synthetic table: far above the rest, as in real models."""


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
                        "token": "<|im_start|>" if position == 0 else f" t{position}",
                        "phase": "prompt" if position < 3 else "generated",
                        "message": 0 if position < 2 else 1,
                        "role": "system" if position < 2 else "user",
                        "norm": SINK if position == 0 else layer + position + offset,
                        "proj_d": position - 1.5,
                    }
                )
    return pd.DataFrame(rows)


def test_layer_figure_leaves_the_first_token_out_unless_asked():
    figure = figures.build_layer_figure(synthetic_frame())
    assert [trace.name for trace in figure.data] == ["baseline", "steered"]
    assert list(figure.data[0].x) == [0, 1, 2]
    assert np.allclose(figure.data[0].y, [2.0, 3.0, 4.0])  # mean over positions 1..3
    assert "first token left out" in figure.layout.title.subtitle.text
    with_sink = figures.build_layer_figure(synthetic_frame(), include_first_token=True)
    assert np.allclose(with_sink.data[0].y, [(SINK + 6) / 4, (SINK + 9) / 4, (SINK + 12) / 4])
    assert "left out" not in with_sink.layout.title.subtitle.text
    assert figure.layout.xaxis.title.text == "layer" and figure.layout.yaxis.title.text == "mean residual norm"


def test_message_figure_has_prompt_messages_then_the_reply():
    figure = figures.build_message_figure(synthetic_frame(), layer=1)
    assert list(figure.data[0].x) == ["0 system", "1 user", "reply"]
    assert np.allclose(figure.data[0].y, [2.0, 3.0, 4.0])  # position 1 | position 2 | position 3 (generated)
    projection = figures.build_message_figure(synthetic_frame(), 1, summaries.projection("d", "layer 4 add"))
    assert np.allclose(projection.data[1].y, [-0.5, 0.5, 1.5])
    assert projection.layout.yaxis.title.text == "mean projection on layer 4 add"


def test_token_heatmap_has_one_panel_per_request_and_token_text_on_hover():
    figure = figures.build_token_heatmap_figure(synthetic_frame(), colour="linear", include_first_token=True)
    baseline, steered = figure.data
    assert np.asarray(steered.z).shape == (3, 4)
    assert steered.z[2][3] == 2 + 3 + 1.0
    assert list(steered.text[0]) == ["'&lt;|im_start|&gt;'", "' t1'", "' t2'", "' t3'"]
    assert "token %{text}" in steered.hovertemplate and "%{customdata:.2f}" in steered.hovertemplate
    assert baseline.coloraxis == steered.coloraxis == "coloraxis"  # one colour scale for both
    # By default the sink is left out and the colours are clipped, so the other tokens are not flat.
    clipped = figures.build_token_heatmap_figure(synthetic_frame())
    assert np.asarray(clipped.data[0].z).shape == (3, 3)
    assert clipped.layout.coloraxis.cmax < SINK
    log = figures.build_token_heatmap_figure(synthetic_frame(), colour="log", include_first_token=True)
    assert log.data[0].z[0][0] == pytest.approx(2.0) and log.data[0].customdata[0][0] == SINK


def test_projection_heatmap_is_centred_on_zero():
    figure = figures.build_token_heatmap_figure(synthetic_frame(), summaries.projection("d", "the direction"))
    assert figure.layout.coloraxis.cmin == -figure.layout.coloraxis.cmax
    assert figure.layout.coloraxis.colorscale[0][1] != figure.layout.coloraxis.colorscale[-1][1]


def test_empty_tables_give_empty_figures():
    empty = synthetic_frame().iloc[0:0]
    assert len(figures.build_layer_figure(empty).data) == 0
    assert len(figures.build_token_heatmap_figure(empty).data) == 0


def test_sweep_figure_is_in_words_and_explains_empty_replies():
    sweep = pd.DataFrame(
        {
            "scale": [-1.0, 0.0, 1.0],
            "text": ["a", "", "c"],
            "proj_generated_mean": [-3.0, float("nan"), 3.0],
            "note": ["", "empty reply: the first token ended it", ""],
        }
    )
    figure = figures.build_sweep_figure(sweep, layer=12)
    assert list(figure.data[0].x) == [-1.0, 0.0, 1.0]
    assert figure.data[0].customdata[1] == "empty reply: the first token ended it"
    assert "layer 12" in figure.layout.title.text and "_" not in figure.layout.title.text
    assert figure.layout.xaxis.title.text == "scale (norm of the added vector)"


async def test_cosines_from_real_captures(model):
    greedy = SamplingParams(temperature=0.0, max_tokens=6)
    conversation = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello!"}]
    vector = torch.randn(model.hidden_size, generator=torch.Generator().manual_seed(4)) * 20
    spec = SteeringSpec({2: LayerSteeringSpec(add=AddSpec(vector))})
    _, handles = await model.chat(
        [conversation, conversation],
        sampling_params=greedy,
        capture_layers=[1, 2, 8],
        steering_spec=[SteeringSpec(), spec],
    )
    await model.fetch_captures_batch(handles)
    cosines = summaries.message_cosines(handles[0], 8)
    assert len(cosines) == 4 and list(cosines["message_a"][:1]) == ["0 system"]
    assert cosines.loc[cosines.message_a == cosines.message_b, "cosine"].to_numpy() == pytest.approx(1.0, abs=1e-5)
    with_sink = summaries.message_cosines(handles[0], 8, include_first_token=True)
    assert not np.allclose(cosines["cosine"], with_sink["cosine"])
    heatmap = figures.build_cosine_heatmap_figure(cosines)
    assert np.asarray(heatmap.data[0].z).shape == (2, 2)
    per_layer = summaries.layer_cosines(handles[0], handles[1], rows="prompt")
    assert per_layer.loc[per_layer.layer == 1, "cosine"].item() == pytest.approx(1.0, abs=1e-6)  # before the steering
    assert per_layer.loc[per_layer.layer == 2, "cosine"].item() < 0.999
    turn = summaries.layer_cosines(handles[0], handles[1])
    assert len(figures.build_layer_cosine_figure(turn).data[0].x) == 3
    frame = captures_frame(handles, model.tokenizer, labels=["baseline", "steered"], directions={"d": vector})
    assert len(figures.build_layer_figure(frame).data) == 2
    assert list(figures.build_message_figure(frame, 8).data[0].x) == ["0 system", "1 user", "reply"]
    heat = figures.build_token_heatmap_figure(frame, summaries.projection("d", "layer 2 add"))
    assert len(heat.data) == 2 and "'Hello'" in str(heat.data[0].text[0])
