"""The extraction folder format without an engine: shards written by the extractor's writer, read back lazily."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from workbench import ActivationReader, CaptureIndexError, ExtractError
from workbench.extract import _Block, _resume, _ShardWriter, select_rows, write_index

SETTINGS = {"model": "m", "hidden_size": 4, "dtype": "float32", "layers": [1, 3], "positions": "all", "sampling": "s"}


def block(prompt_id: int, rows: int) -> _Block:
    values = {layer: torch.full((rows, 4), float(100 * prompt_id + layer)) for layer in (1, 3)}
    return _Block(prompt_id, 0, [7] * rows, [8, 9], [], None, values)


async def test_blocks_written_in_any_order_read_back_by_prompt_and_layer(tmp_path):
    keys = ["k0", "k1", "k2", "k3"]
    writer = _ShardWriter(tmp_path, SETTINGS, keys, [], shard_bytes=100)
    write_index(tmp_path, SETTINGS, keys, [])
    for prompt_id, rows in ((2, 3), (0, 5), (3, 1)):  # finished out of order; prompt 1 never ran
        writer.add(block(prompt_id, rows))
        await writer.flush()
    await writer.flush(force=True)
    reader = ActivationReader(tmp_path)
    assert reader.prompt_ids == [0, 2, 3] and len(reader) == 3 and not reader.is_complete and 1 not in reader
    assert torch.equal(reader.rows(2, 3), torch.full((3, 4), 203.0))
    assert torch.equal(reader.layer(1)[:, 0], torch.tensor([1.0] * 5 + [201.0] * 3 + [301.0]))
    assert list(reader.index["rows"]) == [5, 3, 1] and reader.index.loc[0, "generated_tokens"] == 2
    assert reader.prompt(0).positions == range(0, 5)
    with pytest.raises(CaptureIndexError, match="prompt 1 is not in this extraction"):
        reader.rows(1, 1)
    # What a resumed run keeps: every shard the index names.
    shards = _resume(tmp_path, SETTINGS, keys, overwrite=False)
    assert sorted(i for shard in shards for i in shard["prompt_ids"]) == [0, 2, 3]


def test_row_selection_per_positions():
    assert select_rows("all", 4, 7) == (0, 7)
    assert select_rows("prompt", 4, 7) == (0, 4)
    assert select_rows("generated", 4, 7) == (4, 7)
    assert select_rows("generated", 4, 4) == (4, 4)  # one generated token: no generated row
    assert select_rows("last", 4, 7) == (6, 7)
    with pytest.raises(ExtractError, match="positions must be one of"):
        select_rows("middle", 4, 7)


def test_damaged_folders_raise_extract_errors(tmp_path):
    with pytest.raises(ExtractError, match="not a readable extraction"):
        ActivationReader(tmp_path)
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(ExtractError, match="pass overwrite=True"):
        _resume(tmp_path, SETTINGS, ["k"], overwrite=False)
    write_index(tmp_path, SETTINGS, ["k"], [{"name": "shard-00000", "rows": 1, "prompt_ids": [0]}])
    with pytest.raises(ExtractError, match="shard-00000.safetensors is named in the index but missing"):
        _resume(tmp_path, SETTINGS, ["k"], overwrite=False)
    assert _resume(tmp_path, SETTINGS, ["k"], overwrite=True) == [] and not (tmp_path / "index.json").exists()
    assert json.dumps(SETTINGS)  # settings stay JSON


def test_writer_waits_for_a_shard_being_written(tmp_path):
    async def run() -> None:
        writer = _ShardWriter(tmp_path, SETTINGS, ["k0", "k1"], [], shard_bytes=1)
        writer.add(block(0, 2))
        writer.add(block(1, 2))
        await asyncio.gather(writer.flush(), writer.flush())
        await writer.wait()
        assert [shard["prompt_ids"] for shard in writer.shards] == [[0, 1]]

    asyncio.run(run())


def test_shards_written_at_once_join_the_index_in_order(tmp_path):
    """Shards are written on several threads; a small one finishing before a
    large one started earlier still joins the index after it."""

    async def run() -> None:
        keys = [f"k{i}" for i in range(6)]
        writer = _ShardWriter(tmp_path, SETTINGS, keys, [], shard_bytes=1)
        for prompt_id, rows in enumerate((20_000, 5_000, 10, 20_000, 3, 1)):
            writer.add(block(prompt_id, rows))
            await writer.flush()
        await writer.wait()
        assert [shard["name"] for shard in writer.shards] == [f"shard-{i:05d}" for i in range(6)]
        assert [shard["prompt_ids"] for shard in writer.shards] == [[i] for i in range(6)]
        reader = ActivationReader(tmp_path)
        assert reader.is_complete and torch.equal(reader.rows(3, 3)[:2], torch.full((2, 4), 303.0))

    asyncio.run(run())
