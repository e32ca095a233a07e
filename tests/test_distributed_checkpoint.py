"""torch.distributed.checkpoint with FSDP2 and adamkit, every state format (gloo, CPU).

A 2-rank run saves with ``get_state_dict`` + ``dcp.save`` after 3 steps. The checkpoint
resumes bitwise on 2 ranks, loads on 4 ranks (resharding) and in one process without a
process group (``dcp_to_torch_save``, the gathered checkpoint), where
``adamkit.export_state_dict`` turns it into a ``torch.optim.AdamW`` checkpoint.

Block-wise moments are checkpointed decoded, as fp32 DTensors (adamkit.distributed): on the
same layout they re-encode to the very same codes; on another layout they are quantised again,
within the format's tolerance (the lean-state work's: bf16 1e-2, int8 5e-2, int4 0.3 relative).
"""

from __future__ import annotations

import distributed_worker as W
import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.state_dict import set_state_dict

import adamkit

AFTER = 3  # steps trained after the checkpoint
TOLERANCE = {None: 1e-6, "float32": 1e-6, "bfloat16": 1e-2, "int8": 0.05, "int4": 0.3}
QUANTISED = ("int8", "int4")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("dcp")
    return root, W.launch(2, "dcp-save", root, str(AFTER), timeout=120)


@pytest.fixture(scope="module")
def four_ranks(saved, tmp_path_factory) -> list[dict]:
    root, _ = saved
    out = tmp_path_factory.mktemp("dcp4")
    return W.launch(4, "dcp-load", out, str(root), str(AFTER), timeout=150)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def max_error(got: dict, want: dict, key: str) -> float:
    assert set(got[key]) == set(want[key]) and want[key]
    return max(rel(got[key][n], want[key][n]) for n in want[key])


def assert_equal(got: dict, want: dict) -> None:
    for key in want:
        for name in want[key]:
            assert torch.equal(got[key][name], want[key][name]), (key, name)


@pytest.mark.parametrize("state_dtype", W.STATE_DTYPES)
def test_same_world_size_resume_is_bitwise(saved, state_dtype) -> None:
    _, ranks = saved
    for r in ranks:
        assert r["same-local-state", state_dtype]  # codes, scales, moments, steps
        assert_equal(r["resumed", state_dtype], r["uninterrupted", state_dtype])
    codes = any(k.endswith("_codes") for k in ranks[0]["local-keys", state_dtype])
    assert codes == (state_dtype in QUANTISED)


@pytest.mark.parametrize("state_dtype", W.STATE_DTYPES)
def test_two_rank_checkpoint_loads_on_four_ranks(saved, four_ranks, state_dtype) -> None:
    _, ranks = saved
    want, got = ranks[0]["saved", state_dtype], four_ranks[0]["loaded", state_dtype]
    assert_equal({"param": got["param"]}, {"param": want["param"]})
    for key in ("exp_avg", "exp_avg_sq"):
        err = max_error(got, want, key)
        if state_dtype in QUANTISED:  # quantised again, in blocks of the new shards
            assert 0 < err <= TOLERANCE[state_dtype], (key, err)
        else:
            assert err == 0, (key, err)
    codes = any(k.endswith("_codes") for k in four_ranks[0]["local-keys", state_dtype])
    assert codes == (state_dtype in QUANTISED)
    # and training goes on as on 2 ranks
    trained, uninterrupted = (
        four_ranks[0]["trained", state_dtype],
        ranks[0]["uninterrupted", state_dtype],
    )
    for key in ("param", "exp_avg", "exp_avg_sq"):
        assert max_error(trained, uninterrupted, key) <= TOLERANCE[state_dtype], key


def load_in_one_process(root, state_dtype, tmp_path):
    """The 2-rank checkpoint gathered into one file and loaded by a plain (unsharded) model
    and adamkit optimizer, without a process group."""
    path = tmp_path / f"full-{state_dtype}.pt"
    dcp_to_torch_save(root / f"ckpt-{state_dtype}", path)
    full = torch.load(path)
    model = W.make_model()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    opt = W.make_adamkit(model.parameters(), state_dtype)
    set_state_dict(model, opt, model_state_dict=full["model"], optim_state_dict=full["optim"])
    return model, opt


@pytest.mark.parametrize("state_dtype", W.STATE_DTYPES)
def test_two_rank_checkpoint_loads_in_one_process_and_exports(saved, state_dtype, tmp_path):
    root, ranks = saved
    want = ranks[0]["saved", state_dtype]
    model, opt = load_in_one_process(root, state_dtype, tmp_path)
    got = W.snapshot(model, opt)
    assert_equal({"param": got["param"]}, {"param": want["param"]})
    exported = adamkit.export_state_dict(opt)
    names = [n for n, _ in model.named_parameters()]
    for key in ("exp_avg", "exp_avg_sq"):
        moments = {key: {n: exported["state"][i][key] for i, n in enumerate(names)}}
        assert all(v.dtype == torch.float32 for v in moments[key].values())
        err = max_error(moments, want, key)
        assert err <= (TOLERANCE[state_dtype] if state_dtype in QUANTISED else 0), (key, err)
    # the export is a torch.optim.AdamW checkpoint
    torch_opt = torch.optim.AdamW(model.parameters(), **W.HPARAMS)
    torch_opt.load_state_dict(exported)
    assert torch.equal(torch_opt.state[model[0].weight]["exp_avg"], exported["state"][0]["exp_avg"])
    # and the one-process adamkit run continues the 2-rank run
    for s in range(W.RESUME_STEP, W.RESUME_STEP + AFTER):
        W.train_step(model, opt, s)
    uninterrupted = ranks[0]["uninterrupted", state_dtype]
    for key in ("param", "exp_avg", "exp_avg_sq"):
        assert max_error(W.snapshot(model, opt), uninterrupted, key) <= TOLERANCE[state_dtype]


@pytest.mark.parametrize("state_dtype", W.STATE_DTYPES)
def test_unsharded_state_dict_loads_into_sharded_optimizer(four_ranks, state_dtype) -> None:
    """``load_state_dict`` with full tensors (a one-process export): each rank takes its rows."""
    result = four_ranks[0]["full-load", state_dtype]
    for key in ("exp_avg", "exp_avg_sq"):
        err = max_error(result["got"], result["want"], key)
        assert err <= (TOLERANCE[state_dtype] if state_dtype in QUANTISED else 0), (key, err)


@pytest.mark.parametrize("state_dtype", [None, "int8"])
def test_checkpoint_loads_into_fsdp2_torch_adamw(saved, four_ranks, state_dtype) -> None:
    """The checkpoint is torch's layout: torch.optim.AdamW under FSDP2 (4 ranks) loads the
    moments adamkit saved (int8: decoded) exactly."""
    _, ranks = saved
    want, got = ranks[0]["saved", state_dtype], four_ranks[0]["torch-adamw", state_dtype]
    assert_equal(got, want)
