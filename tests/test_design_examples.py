"""The examples of the design README (../shared/seed/chatspace-README.md):
Quick Start, Steering Methods and Activation Capture, run as written apart
from the import path, the model name and the CPU device.

Each test is one example block; ``model`` is the shared engine where the
example assumes one already exists.
"""

from __future__ import annotations

import asyncio

import matplotlib
import torch
import torch.nn.functional as F
from vllm import SamplingParams

from workbench import (
    AddSpec,
    LayerSteeringSpec,
    ProjectionCapSpec,
    SteeringSpec,
    VLLMSteeringConfig,
    VLLMSteerModel,
)

matplotlib.use("Agg")

# The examples use an ambient `sampling`; fixed-length output keeps their tensor shapes comparable.
sampling = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
prompt = "Question: What is the capital of France? Answer:"


async def test_quick_start():
    async def main():
        # Initialize model
        cfg = VLLMSteeringConfig(
            model_name="smollm2-135m-instruct",
            tensor_parallel_size=1,
            gpu_memory_utilization=0.9,
            max_model_len=2048,
        )
        model = VLLMSteerModel(cfg, bootstrap_layers=(2, 4, 6))

        # Generate baseline
        sampling = SamplingParams(temperature=0.0, max_tokens=64)
        baseline = await model.generate(
            "Question: What is the capital of France? Answer:",
            sampling
        )
        print("Baseline:", baseline[0])

        # Apply steering vector to layer 4
        steering_vector = torch.randn(model.hidden_size) * 100.0
        await model.set_layer_vector(4, steering_vector)

        # Generate with steering
        steered = await model.generate(
            "Question: What is the capital of France? Answer:",
            sampling
        )
        print("Steered:", steered[0])

        # Clear steering
        await model.clear_all_vectors()
        model.close()
        return baseline, steered

    baseline, steered = await main()
    assert baseline != steered


async def test_core_concepts_steering_specifications(model):
    unit_vec = F.normalize(torch.randn(model.hidden_size), dim=0)
    direction_vec = torch.randn(model.hidden_size)
    spec = SteeringSpec(layers={
        2: LayerSteeringSpec(
            add=AddSpec(vector=unit_vec, scale=50.0),
        ),
        4: LayerSteeringSpec(
            add=AddSpec(vector=unit_vec, scale=100.0),
            projection_cap=ProjectionCapSpec(
                vector=direction_vec,
                min=-10.0,
                max=10.0,
            ),
        ),
    })

    # Apply spec (all steering updates happen atomically)
    await model.apply_steering_spec(spec)

    # Export current steering state
    current_spec = model.export_steering_spec()
    assert current_spec == spec
    await model.clear_all_vectors()


async def test_additive_steering(model):
    # Apply to specific layer
    steering_vec = torch.randn(model.hidden_size) * 50.0
    await model.set_layer_vector(layer_idx=4, vector=steering_vec)

    # Or use the active layer (set via set_target_layer)
    model.set_target_layer(4)
    await model.set_vector(steering_vec)
    assert torch.equal(model.export_steering_spec().layers[4].add.effect, steering_vec)

    # Clear steering for a layer
    await model.clear_layer_vector(4)
    assert model.export_steering_spec().is_empty()


async def test_projection_capping(model):
    # Define direction (will be normalized automatically)
    direction = torch.randn(model.hidden_size)

    # Cap projection to [-10, 10] range
    await model.set_layer_projection_cap(
        layer_idx=6,
        vector=direction,
        min=-10.0,
        max=10.0,
    )
    cap = model.export_steering_spec().layers[6].projection_cap
    assert torch.allclose(cap.vector, direction / direction.norm())

    # Remove cap
    await model.clear_layer_projection_cap(6)
    assert model.export_steering_spec().is_empty()


async def test_component_ablation(model):
    direction = torch.randn(model.hidden_size)
    # Suppress component (scale < 1.0)
    await model.set_layer_ablation(
        layer_idx=8,
        vector=direction,
        scale=0.1,  # Reduce to 10%
    )

    # Amplify component (scale > 1.0)
    await model.set_layer_ablation(
        layer_idx=8,
        vector=direction,
        scale=2.0,  # Double the component
    )
    assert model.export_steering_spec().layers[8].ablation.scale == 2.0

    # Clear ablation
    await model.clear_layer_ablation(8)
    assert model.export_steering_spec().is_empty()


async def test_capture_basic_usage_generate(model):
    # Capture activations from layers 2, 4, 6
    results, handles = await model.generate(
        ["What is 2+2?", "What is the capital of France?"],
        sampling,
        capture_layers=[2, 4, 6],
    )

    # Fetch captures (batched fetch is more efficient)
    await model.fetch_captures_batch(handles)

    # Access captures for each request
    for i, handle in enumerate(handles):
        print(f"\nPrompt {i}: {results[i]}")

        for layer_idx in handle.layer_indices:
            # Each layer has a list (one per TP worker)
            captures = handle.captures[layer_idx]
            hidden = captures[0]["hidden"]  # [seq_len, hidden_size]
            print(f"  Layer {layer_idx}: {hidden.shape}")
            assert hidden.shape[1] == model.hidden_size


async def test_capture_length_and_slicing(model):
    # Generate with capture
    results, handles = await model.generate(
        prompt,
        sampling_params=SamplingParams(max_tokens=50),
        capture_layers=[4],
    )
    await model.fetch_captures_batch(handles)

    # Extract the full concatenated tensor
    full_hidden = handles[0].captures[4][0]["hidden"]  # [seq_len, hidden_size]

    # Tokenize to get prompt length
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model.model_name)
    prompt_tokens = tokenizer(prompt, return_tensors="pt")
    prompt_len = prompt_tokens.input_ids.shape[1]

    # Slice into prefill and decode phases
    prefill_acts = full_hidden[:prompt_len]  # Prompt processing
    decode_acts = full_hidden[prompt_len:]   # Generated tokens (excluding final)

    print(f"Prefill shape: {prefill_acts.shape}")  # [prompt_len, hidden_size]
    print(f"Decode shape: {decode_acts.shape}")    # [generated_tokens - 1, hidden_size]

    # Analyze specific tokens
    first_generated = decode_acts[0]  # First generated token's activations
    last_captured = decode_acts[-1]   # Last captured token (second-to-last generated)
    assert prefill_acts.shape[0] == prompt_len
    assert decode_acts.shape[0] == len(handles[0].generated_token_ids) - 1
    assert first_generated.shape == last_captured.shape == (model.hidden_size,)


async def test_analyzing_steering_effects_generate(model):
    # Capture baseline (no steering)
    baseline_results, baseline_handles = await model.generate(
        prompt,
        sampling,
        capture_layers=[4],
    )
    await model.fetch_captures_batch(baseline_handles)
    baseline_acts = baseline_handles[0].captures[4][0]["hidden"]

    # Apply steering and capture again
    steering_vec = torch.randn(model.hidden_size) * 50.0
    await model.set_layer_vector(4, steering_vec)

    steered_results, steered_handles = await model.generate(
        prompt,
        sampling,
        capture_layers=[4],
    )
    await model.fetch_captures_batch(steered_handles)
    steered_acts = steered_handles[0].captures[4][0]["hidden"]
    await model.clear_all_vectors()

    # Compare activations
    delta = steered_acts - baseline_acts
    print(f"Mean activation change: {delta.mean().item():.4f}")
    print(f"Max activation change: {delta.abs().max().item():.4f}")

    # Compute cosine similarity for each token
    for i in range(min(5, baseline_acts.shape[0])):
        cos_sim = F.cosine_similarity(
            baseline_acts[i].unsqueeze(0),
            steered_acts[i].unsqueeze(0),
            dim=-1
        ).item()
        print(f"Token {i} cosine similarity: {cos_sim:.6f}")
    # Layer 4's output is the stream after the add: each prompt row moved by the vector.
    prompt_rows = len(baseline_handles[0].prompt_token_ids)
    assert torch.allclose(delta[:prompt_rows], steering_vec.expand(prompt_rows, -1), atol=1e-3)


async def test_concurrent_capture_isolation(model):
    async def analyze_multiple_prompts():
        """Capture activations for multiple prompts concurrently."""
        prompts = [
            "What is the capital of France?",
            "Explain quantum computing.",
            "Write a haiku about programming.",
        ]

        # Create concurrent tasks
        tasks = [
            model.generate(
                [prompt],
                sampling,
                capture_layers=[2, 4, 6],
            )
            for prompt in prompts
        ]

        # Run all captures concurrently
        results = await asyncio.gather(*tasks)

        # Unpack results (each is a (texts, handles) tuple)
        all_handles = [handles[0] for texts, handles in results]

        # Fetch all captures in one batch RPC
        await model.fetch_captures_batch(all_handles)

        # Analyze each prompt's captures
        for i, handle in enumerate(all_handles):
            print(f"\nPrompt {i}: {prompts[i][:50]}...")
            for layer in [2, 4, 6]:
                hidden = handle.captures[layer][0]["hidden"]
                norm = torch.norm(hidden, dim=-1).mean().item()
                print(f"  Layer {layer}: mean norm = {norm:.4f}")
        return all_handles

    # Run concurrent analysis
    handles = await analyze_multiple_prompts()
    assert len({handle.capture_id for handle in handles}) == 3
    assert handles[0].hidden(2).shape[0] != handles[1].hidden(2).shape[0] or not torch.equal(
        handles[0].hidden(2), handles[1].hidden(2)
    )


async def test_multi_layer_analysis(model):
    # Capture all layers for deep analysis
    all_layers = list(range(model.layer_count))
    results, handles = await model.generate(
        prompt,
        sampling,
        capture_layers=all_layers,
    )
    await model.fetch_captures_batch(handles)

    # Compute activation norms across layers
    layer_norms = {}
    for layer_idx in all_layers:
        hidden = handles[0].captures[layer_idx][0]["hidden"]
        # Average norm across all tokens and hidden dimensions
        layer_norms[layer_idx] = torch.norm(hidden, dim=-1).mean().item()

    # Plot layer-wise activation magnitudes
    import matplotlib.pyplot as plt
    plt.plot(list(layer_norms.keys()), list(layer_norms.values()))
    plt.xlabel("Layer")
    plt.ylabel("Mean Activation Norm")
    plt.title("Activation Magnitude Across Layers")
    plt.show()
    plt.close("all")
    assert len(layer_norms) == 30


async def test_validating_against_huggingface(model, hf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # This example re-tokenizes prompt + completion text, which only matches the
    # generated ids when the text has no forced special tokens: stop at EOS.
    sampling = SamplingParams(temperature=0.0, max_tokens=64)

    # Load HuggingFace model for ground truth
    hf_model = AutoModelForCausalLM.from_pretrained(
        model.model_name,
        torch_dtype=torch.float32,
        device_map="cpu",
    )
    hf_tokenizer = AutoTokenizer.from_pretrained(model.model_name)

    # Generate with vLLM and capture
    vllm_results, vllm_handles = await model.generate(
        prompt,
        sampling,
        capture_layers=[4],
    )
    await model.fetch_captures_batch(vllm_handles)
    vllm_acts = vllm_handles[0].captures[4][0]["hidden"]

    # Generate same sequence with HuggingFace and capture
    full_text = prompt + vllm_results[0]
    inputs = hf_tokenizer(full_text, return_tensors="pt").to("cpu")

    hf_captures = {}
    def capture_hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hf_captures[4] = hidden.detach().cpu()

    handle = hf_model.model.layers[4].register_forward_hook(capture_hook)
    with torch.no_grad():
        hf_model(**inputs)
    handle.remove()

    hf_acts = hf_captures[4].squeeze(0)  # [seq_len, hidden_size]
    # vLLM never runs the last sampled token, so compare the rows both have.
    hf_acts = hf_acts[: vllm_acts.shape[0]]

    # Compare (should be very similar if using same precision)
    cos_sim = F.cosine_similarity(
        vllm_acts.flatten().unsqueeze(0),
        hf_acts.flatten().unsqueeze(0),
        dim=-1
    ).item()
    mae = torch.mean(torch.abs(vllm_acts - hf_acts)).item()

    print(f"Cosine similarity: {cos_sim:.6f}")  # Should be ~1.0
    print(f"Mean absolute error: {mae:.6f}")     # Should be very small
    assert cos_sim > 0.9999


async def test_capture_basic_usage_chat(model):
    # Capture activations from chat-style generation
    messages = [
        {"role": "user", "content": "What is 2+2?"}
    ]

    responses, handles = await model.chat(
        messages,
        sampling_params=sampling,
        capture_layers=[2, 4, 6],
    )

    # Fetch captures
    await model.fetch_captures_batch(handles)

    # Access captures
    for layer_idx in handles[0].layer_indices:
        hidden = handles[0].captures[layer_idx][0]["hidden"]
        print(f"Layer {layer_idx}: {hidden.shape}")
        assert hidden.shape[1] == model.hidden_size


async def test_batch_chat_with_captures(model):
    # Multiple conversations with capture
    conversations = [
        [{"role": "user", "content": "What is 2+2?"}],
        [{"role": "user", "content": "Explain quantum computing."}],
        [{"role": "user", "content": "Write a haiku."}],
    ]

    responses, handles = await model.chat(
        conversations,
        sampling_params=sampling,
        capture_layers=[4],
    )

    await model.fetch_captures_batch(handles)

    for i, (response, handle) in enumerate(zip(responses, handles)):
        hidden = handle.captures[4][0]["hidden"]
        print(f"Conversation {i}: {hidden.shape[0]} tokens captured")
    assert len(handles) == 3


async def test_splitting_activations_by_message(model):
    # Multi-turn conversation with message-level analysis
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
        {"role": "user", "content": "What is its population?"},
    ]

    responses, handles = await model.chat(
        messages,
        sampling_params=sampling,
        capture_layers=[4],
    )

    await model.fetch_captures_batch(handles)
    handle = handles[0]

    # Access activations for each message separately
    for i, boundary in enumerate(handle.message_boundaries):
        # Get activations for this specific message
        msg_acts = handle.get_message_activations(
            message_idx=i,
            layer_idx=4,
        )
        print(f"Message {i} ({boundary.role}): {msg_acts.shape}")
        print(f"  Content: {boundary.content[:50]}...")
        print(f"  Tokens: {boundary.num_tokens}")
        print(f"  Mean activation norm: {torch.norm(msg_acts, dim=-1).mean():.4f}")

    # Get the last user message's activations including the generated response
    last_user_idx = len(handle.message_boundaries) - 1
    full_acts = handle.get_message_activations(
        message_idx=last_user_idx,
        layer_idx=4,
        include_generated=True,  # Include generated tokens
    )
    print(f"\nLast message + generated: {full_acts.shape}")
    assert full_acts.shape[0] > handle.message_boundaries[-1].num_tokens


async def test_comparing_messages_in_a_conversation(model):
    # Capture a multi-turn conversation
    messages = [
        {"role": "system", "content": "You are a math tutor."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "2+2 equals 4."},
        {"role": "user", "content": "What is 10*10?"},
    ]

    responses, handles = await model.chat(
        messages,
        sampling_params=sampling,
        capture_layers=[4, 8, 12],
    )

    await model.fetch_captures_batch(handles)
    handle = handles[0]

    # Compare activation patterns between the two user questions
    user_msg_indices = [i for i, b in enumerate(handle.message_boundaries) if b.role == "user"]

    for layer in [4, 8, 12]:
        acts_1 = handle.get_message_activations(user_msg_indices[0], layer)
        acts_2 = handle.get_message_activations(user_msg_indices[1], layer)

        # Compute mean representations
        mean_1 = acts_1.mean(dim=0)
        mean_2 = acts_2.mean(dim=0)

        # Cosine similarity between questions
        cos_sim = F.cosine_similarity(mean_1.unsqueeze(0), mean_2.unsqueeze(0)).item()
        print(f"Layer {layer} - similarity between user questions: {cos_sim:.4f}")
        assert -1.0 <= cos_sim <= 1.0

    # Analyze how system prompt affects user message processing
    system_acts = handle.get_message_activations(0, layer_idx=4)  # System message
    first_user_acts = handle.get_message_activations(1, layer_idx=4)  # First user msg

    print(f"\nSystem message tokens: {system_acts.shape[0]}")
    print(f"First user message tokens: {first_user_acts.shape[0]}")
    print(f"System mean norm: {torch.norm(system_acts, dim=-1).mean():.4f}")
    print(f"User mean norm: {torch.norm(first_user_acts, dim=-1).mean():.4f}")


async def test_analyzing_steering_effects_chat(model):
    messages = [
        {"role": "user", "content": "Explain the concept of recursion."}
    ]

    # Capture baseline (no steering)
    baseline_resp, baseline_handles = await model.chat(
        messages,
        sampling_params=sampling,
        capture_layers=[4],
    )
    await model.fetch_captures_batch(baseline_handles)
    baseline_acts = baseline_handles[0].captures[4][0]["hidden"]

    # Apply steering
    steering_vec = torch.randn(model.hidden_size) * 50.0
    await model.set_layer_vector(4, steering_vec)

    # Capture with steering
    steered_resp, steered_handles = await model.chat(
        messages,
        sampling_params=sampling,
        capture_layers=[4],
    )
    await model.fetch_captures_batch(steered_handles)
    steered_acts = steered_handles[0].captures[4][0]["hidden"]
    await model.clear_all_vectors()

    # Compare activations
    delta = steered_acts - baseline_acts
    print(f"Baseline response: {baseline_resp[0][:100]}...")
    print(f"Steered response: {steered_resp[0][:100]}...")
    print(f"Mean activation Δ: {delta.mean().item():.4f}")
    print(f"Max activation Δ: {delta.abs().max().item():.4f}")
    assert steered_resp[0] != baseline_resp[0]
