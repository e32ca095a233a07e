"""The single-process pieces of adamkit's distributed support (no process group here).

- random numbers drawn by global element index (``ShardKey``): a shard draws exactly the
  numbers the whole tensor draws for its elements;
- block-wise codes come back bit for bit from their decoded values (what a same-layout
  resume from a distributed checkpoint relies on), down to subnormal scales;
- ``get_state_dict``/``set_state_dict`` (FQN-keyed state dicts) keep adamkit's compact state.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import adamkit
from adamkit.distributed import encode_nearest_
from adamkit.storage import blockwise
from adamkit.storage.quantized import BlockwiseCodec
from adamkit.storage.rounding import ShardKey, hash32, stream_cells


def test_hashes_from_a_start_index_are_a_slice_of_the_whole() -> None:
    whole = hash32(1000, 12345)
    assert torch.equal(hash32(300, 12345, start=200), whole[200:500])
    assert torch.equal(hash32(300, 12345, start=torch.tensor(200)), whole[200:500])  # 0-d
    index = torch.tensor([[5, 7], [999, 0]])
    assert torch.equal(hash32(4, 12345, start=index), whole[index.reshape(-1)])


@pytest.mark.parametrize("stream", ["exp_avg", "exp_avg_sq", "param"])
def test_shard_key_draws_the_numbers_of_the_full_tensor(stream) -> None:
    whole = stream_cells(torch.empty(64, 10), 777, stream)  # shaped like its argument
    assert whole.shape == (64, 10)
    shard = torch.empty(3, 10)  # rows 4..6 of the full tensor
    assert torch.equal(stream_cells(shard, ShardKey(777, 40), stream), whole[4:7])
    other = stream_cells(shard, 777, stream)  # a plain key draws from index 0
    assert not torch.equal(other, whole[4:7])


@pytest.mark.parametrize(("bits", "block"), [(8, 256), (4, 128)])
@pytest.mark.parametrize("key", ["exp_avg", "exp_avg_sq"])
@pytest.mark.parametrize("scale", [1e3, 1.0, 1e-12, 1e-30, 1e-36])
def test_decoded_codes_reencode_to_the_same_codes(bits, block, key, scale) -> None:
    codec = BlockwiseCodec(bits=bits, block=block)
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(5000, generator=g) * scale
    x[:block] = 0.0  # a block of zeros
    if key == "exp_avg_sq":
        x = x.abs()
    state: dict = {}
    encode_nearest_(codec, state, key, x)
    # stochastic codes, as a training step writes them
    codec.encode_(state, key, x, rng_key=99)
    codes_key, scales_key = codec.state_keys(key)
    codes, scales = state[codes_key].clone(), state[scales_key].clone()
    decoded = codec.decode(state, key, x.shape, torch.float32)
    encode_nearest_(codec, state, key, decoded)
    assert torch.equal(state[codes_key], codes)
    assert torch.equal(state[scales_key], scales)


def test_nearest_encoding_is_not_trivially_exact() -> None:
    """The round trip above is a property of decoded values, not of any input."""
    codec = BlockwiseCodec(bits=4, block=128)
    x = torch.randn(1024, generator=torch.Generator().manual_seed(0))
    state: dict = {}
    encode_nearest_(codec, state, "exp_avg", x)
    assert not torch.equal(codec.decode(state, "exp_avg", x.shape, torch.float32), x)
    codes = blockwise.quantize(x, noise=None, **codec._kw("exp_avg"))[0]
    assert torch.equal(state[codec.state_keys("exp_avg")[0]], codes)


def _train(model: nn.Module, opt, steps: range) -> None:
    for s in steps:
        x = torch.randn(8, 64, generator=torch.Generator().manual_seed(s))
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


@pytest.mark.parametrize("state_dtype", [None, "bfloat16", "int8", "int4"])
def test_get_and_set_state_dict_keep_compact_state(state_dtype) -> None:
    """torch's state_dict helpers key the state by parameter name; adamkit's load must still
    take its codes back (torch's own loader would cast uint8 codes to the param's float)."""

    def make():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 96), nn.Tanh(), nn.Linear(96, 4))
        return model, adamkit.AdamW(model.parameters(), state_dtype=state_dtype, seed=3)

    model, opt = make()
    _train(model, opt, range(3))
    model_sd, optim_sd = copy.deepcopy(get_state_dict(model, opt))
    assert "0.weight" in optim_sd["state"]  # keyed by name, not by index
    model2, opt2 = make()
    set_state_dict(model2, opt2, model_state_dict=model_sd, optim_state_dict=optim_sd)
    for p, p2 in zip(model.parameters(), model2.parameters()):
        st, st2 = opt.state[p], opt2.state[p2]
        assert sorted(st) == sorted(st2)
        for k in st:
            assert st2[k].dtype == st[k].dtype and torch.equal(st2[k], st[k]), k
    _train(model, opt, range(3, 5))
    _train(model2, opt2, range(3, 5))
    for p, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, p2)


def test_unsharded_state_dict_keeps_codes() -> None:
    """Only DTensor params present decoded moments; a plain optimizer saves its codes."""
    model = nn.Linear(128, 64)
    opt = adamkit.AdamW(model.parameters(), state_dtype="int8")
    _train(nn.Sequential(nn.Linear(64, 128), model), opt, range(1))
    entry = opt.state_dict()["state"][0]
    assert entry["exp_avg_codes"].dtype == torch.uint8 and "exp_avg" not in entry


def test_paired_int4_checkpoint_loads_through_the_planner_bit_for_bit(tmp_path) -> None:
    """A DCP checkpoint of int4 codes in the earlier neighbour layout (``{key}_codes``) into an
    int4 optimizer, whose template asks for ``{key}_int4_codes``: adamkit's LoadPlanner fits
    the template to the checkpoint, the optimizer repacks the codes, and the run continues
    exactly as the run that kept the old layout."""
    import torch.distributed.checkpoint as dcp

    from adamkit.distributed import LoadPlanner
    from adamkit.storage import select

    def make():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 4))
        return model, adamkit.AdamW(model.parameters(), state_dtype="int4", min_quantized_size=0)

    model, opt = make()
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(select._FIXED, "int4", select.PAIRED_INT4)
        _train(model, opt, range(3))
        model_sd, optim_sd = get_state_dict(model, opt)
        assert "exp_avg_codes" in optim_sd["state"]["0.weight"]
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp_path))
        _train(model, opt, range(3, 5))
    model2, opt2 = make()
    _train(model2, opt2, range(1))  # state to load into: the template asks for int4_codes
    model_sd2, optim_sd2 = get_state_dict(model2, opt2)
    assert "exp_avg_int4_codes" in optim_sd2["state"]["0.weight"]
    state = {"model": model_sd2, "optim": optim_sd2}
    dcp.load(state, checkpoint_id=str(tmp_path), planner=LoadPlanner())
    set_state_dict(model2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    assert "exp_avg_int4_codes" in opt2.state[model2[0].weight]
    assert "exp_avg_codes" not in opt2.state[model2[0].weight]
    _train(model2, opt2, range(3, 5))
    for p, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, p2)
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.decoded_state(p)[key], opt2.decoded_state(p2)[key]), key
