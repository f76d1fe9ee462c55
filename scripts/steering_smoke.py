"""Quick steering check: baseline text, then text with a random vector added at one layer.

python scripts/steering_smoke.py --layer 4 --scale 60 --max-tokens 32
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time

import torch
from vllm import SamplingParams

from workbench import DEFAULT_MODEL_NAME, VLLMSteeringConfig, VLLMSteerModel


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-name", default=DEFAULT_MODEL_NAME)
    parser.add_argument("--layer", type=int, default=2)
    parser.add_argument("--scale", type=float, default=60.0, help="norm of the added vector (random direction)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompt", default="Question: What is the capital of France? Answer:")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="auto")
    return parser.parse_args()


async def main(args: argparse.Namespace) -> None:
    print(f"starting the engine ({args.model_name}) ...", flush=True)
    started = time.monotonic()
    model = VLLMSteerModel(VLLMSteeringConfig(model_name=args.model_name, dtype=args.dtype, max_model_len=1024))
    print(f"engine ready in {time.monotonic() - started:.0f} s ({model.dtype}); generating", flush=True)
    try:
        sampling = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
        baseline = await model.generate(args.prompt, sampling)
        direction = torch.randn(model.hidden_size, generator=torch.Generator().manual_seed(args.seed))
        await model.set_layer_vector(args.layer, direction / direction.norm() * args.scale)
        steered = await model.generate(args.prompt, sampling)
        await model.clear_all_vectors()
        restored = await model.generate(args.prompt, sampling)
    finally:
        model.close()
    print(f"prompt:   {args.prompt!r}")
    print(f"baseline: {baseline[0].text!r}")
    print(f"steered (layer {args.layer}, |v| = {args.scale:g}): {steered[0].text!r}")
    print(f"cleared steering restores the baseline: {restored == baseline}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main(parse_args()))
