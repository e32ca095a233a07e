"""torch.distributed.checkpoint with FSDP2 and adamkit, every state format (gloo, CPU).

A 2-rank run saves with ``get_state_dict`` + ``dcp.save`` after 3 steps. The checkpoint
resumes bitwise on 2 ranks, loads on 4 ranks (resharding) and in one process without a
process group (``dcp_to_torch_save``, the gathered checkpoint), where
``adamkit.export_state_dict`` turns it into a ``torch.optim.AdamW`` checkpoint.

Block-wise moments are checkpointed in one of two forms (adamkit.distributed). The MLP of
``distributed_worker`` has rows that split quantisation blocks: decoded, as fp32 DTensors; on
the same layout they re-encode to the very same codes, on another they are quantised again,
within the format's tolerance (the lean-state work's: bf16 1e-2, int8 5e-2, int4 0.3
relative). The "wide" model's first weight (64 x 256) has rows of whole blocks: compact, as
row-sharded codes and scales, taken back unchanged on any number of ranks.
"""

from __future__ import annotations

import math

import distributed_worker as W
import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.state_dict import set_state_dict

import adamkit

AFTER = 3  # steps trained after the checkpoint
TOLERANCE = {None: 1e-6, "float32": 1e-6, "bfloat16": 1e-2, "int8": 0.05, "int4": 0.3}
QUANTISED = ("int8", "int4")
CODES = {"int8": "codes", "int4": "int4_codes"}  # the codes' key: {moment}_{CODES[format]}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("dcp")
    return root, W.launch(2, "dcp-save", root, str(AFTER), timeout=120)


@pytest.fixture(scope="module")
def four_ranks(saved, tmp_path_factory) -> list[dict]:
    root, _ = saved
    out = tmp_path_factory.mktemp("dcp4")
    return W.launch(4, "dcp-load", out, str(root), str(AFTER), timeout=150)


rel = W.rel  # relative difference in the 2-norm


def max_error(got: dict, want: dict, key: str) -> float:
    assert set(got[key]) == set(want[key]) and want[key]
    return max(rel(got[key][n], want[key][n]) for n in want[key])


def assert_equal(got: dict, want: dict) -> None:
    for key in want:
        for name in want[key]:
            assert torch.equal(got[key][name], want[key][name]), (key, name)


def assert_bitwise_resume(ranks: list[dict], state_dtype) -> None:
    for r in ranks:
        assert r["same-local-state", state_dtype]  # codes, scales, moments, steps
        assert_equal(r["resumed", state_dtype], r["uninterrupted", state_dtype])


@pytest.mark.parametrize("state_dtype", W.STATE_DTYPES)
def test_same_world_size_resume_is_bitwise(saved, state_dtype) -> None:
    _, ranks = saved
    assert_bitwise_resume(ranks, state_dtype)
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


@pytest.mark.parametrize("state_dtype", QUANTISED)
def test_unsharded_codes_load_into_shards_that_cut_blocks(four_ranks, state_dtype) -> None:
    """A one-process optimizer's own state_dict (codes of the whole tensors) into 4 ranks whose
    shards start inside blocks (30 rows of 40): each rank decodes the blocks that cover its
    rows and quantises its rows again, in its own blocks."""
    result = four_ranks[0]["full-codes-load", state_dtype]
    assert f"exp_avg_{CODES[state_dtype]}" in result["keys"]
    for key in ("exp_avg", "exp_avg_sq"):
        for name in ("0.weight", "2.weight"):
            err = rel(result["got"][key][name], result["want"][key][name])
            assert 0 < err <= TOLERANCE[state_dtype], (key, name, err)


@pytest.mark.parametrize("state_dtype", [None, "int8"])
def test_checkpoint_loads_into_fsdp2_torch_adamw(saved, four_ranks, state_dtype) -> None:
    """The checkpoint is torch's layout: torch.optim.AdamW under FSDP2 (4 ranks) loads the
    moments adamkit saved (int8: decoded) exactly."""
    _, ranks = saved
    want, got = ranks[0]["saved", state_dtype], four_ranks[0]["torch-adamw", state_dtype]
    assert_equal(got, want)


# ---------------------------------------------------------------------------------------------
# the compact form


@pytest.fixture(scope="module")
def compact_saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("dcp-compact")
    return root, W.launch(2, "dcp-compact-save", root, str(AFTER), timeout=120)


@pytest.fixture(scope="module", params=[1, 4], ids=lambda w: f"{w}ranks")
def compact_loaded(compact_saved, request, tmp_path_factory) -> list[dict]:
    root, _ = compact_saved
    out = tmp_path_factory.mktemp(f"dcp-compact-{request.param}")
    return W.launch(request.param, "dcp-compact-load", out, str(root), str(AFTER), timeout=150)


def moment_entries(path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """(size, dtype) of every optimizer moment entry in a DCP checkpoint's metadata."""
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {
        name.removeprefix("optim.state."): (tuple(md.size), md.properties.dtype)
        for name, md in meta.items()
        if name.startswith("optim.state.") and not name.endswith(".step")
    }


def entry_bytes(entries: dict, param: str) -> int:
    return sum(
        math.prod(size) * dtype.itemsize
        for name, (size, dtype) in entries.items()
        if name.startswith(f"{param}.")
    )


def disk_bytes(path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


BITS = {"int8": (8, 256), "int4": (4, 256)}  # bits, block


@pytest.mark.parametrize("state_dtype", W.COMPACT_DTYPES)
def test_checkpoint_holds_codes_where_rows_are_whole_blocks(compact_saved, state_dtype) -> None:
    root, _ = compact_saved
    bits, block = BITS[state_dtype]
    entries = moment_entries(root / f"wide-{state_dtype}")
    rows, row = W.WIDE_HIDDEN, W.WIDE_IN
    for key in ("exp_avg", "exp_avg_sq"):
        codes = f"0.weight.{key}_{CODES[state_dtype]}"
        assert entries[codes] == ((rows, row * bits // 8), torch.uint8)
        assert entries[f"0.weight.{key}_absmax"] == ((rows, row // block), torch.float32)
        assert f"0.weight.{key}" not in entries
        # rows of 64 elements split blocks: decoded, torch's layout
        assert entries[f"2.weight.{key}"] == ((W.WIDE_OUT, W.WIDE_HIDDEN), torch.float32)
        assert f"2.weight.{key}_{CODES[state_dtype]}" not in entries
        assert f"2.weight.{key}_absmax" not in entries
    compact = entry_bytes(entries, "0.weight")
    decoded = entry_bytes(moment_entries(root / "wide-int8-decoded"), "0.weight")
    assert decoded == 2 * rows * row * 4
    assert compact == 2 * rows * row * (bits / 8 + 4 / block)  # int8 0.254x, int4 0.133x
    # and on disk the files shrink by about that (each of the 4 more entries per rank costs
    # about 800 bytes of headers): 322849 -> 232407 bytes (int8), 216523 (int4)
    saved = disk_bytes(root / "wide-int8-decoded") - disk_bytes(root / f"wide-{state_dtype}")
    assert saved >= 0.9 * (decoded - compact), (saved, decoded - compact)


@pytest.mark.parametrize("state_dtype", W.COMPACT_DTYPES)
def test_compact_resume_is_bitwise(compact_saved, state_dtype) -> None:
    _, ranks = compact_saved
    assert_bitwise_resume(ranks, state_dtype)


@pytest.mark.parametrize("state_dtype", W.COMPACT_DTYPES)
def test_compact_checkpoint_reshards(compact_saved, compact_loaded, state_dtype) -> None:
    """2 ranks -> 1 and 4: the compact weight's moments come back unchanged; the decoded
    weight's are quantised again in the new shards' blocks; training goes on."""
    _, ranks = compact_saved
    want, got = ranks[0]["saved", state_dtype], compact_loaded[0]["loaded", state_dtype]
    assert_equal({"param": got["param"]}, {"param": want["param"]})
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(got[key]["0.weight"], want[key]["0.weight"]), key
        err = rel(got[key]["2.weight"], want[key]["2.weight"])
        assert 0 < err <= TOLERANCE[state_dtype], (key, err)
    assert f"exp_avg_{CODES[state_dtype]}" in compact_loaded[0]["local-keys", state_dtype]
    trained, uninterrupted = (
        compact_loaded[0]["trained", state_dtype],
        ranks[0]["uninterrupted", state_dtype],
    )
    for key in ("param", "exp_avg", "exp_avg_sq"):
        assert max_error(trained, uninterrupted, key) <= TOLERANCE[state_dtype], key


@pytest.mark.parametrize("state_dtype", W.COMPACT_DTYPES)
def test_gathered_compact_checkpoint_loads_in_one_process_and_exports(
    compact_saved, state_dtype, tmp_path
) -> None:
    root, ranks = compact_saved
    path = tmp_path / "full.pt"
    dcp_to_torch_save(root / f"wide-{state_dtype}", path)
    full = torch.load(path)
    model = W.make_wide_model()
    opt = W.make_adamkit(model.parameters(), state_dtype)
    set_state_dict(model, opt, model_state_dict=full["model"], optim_state_dict=full["optim"])
    exported = adamkit.export_state_dict(opt)
    want = ranks[0]["saved", state_dtype]
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(exported["state"][0][key], want[key]["0.weight"]), key
        err = rel(exported["state"][2][key], want[key]["2.weight"])
        assert err <= TOLERANCE[state_dtype], (key, err)
    for s in range(W.RESUME_STEP, W.RESUME_STEP + AFTER):
        W.wide_step(model, opt, s)
    uninterrupted = ranks[0]["uninterrupted", state_dtype]
    for key in ("param", "exp_avg", "exp_avg_sq"):
        assert max_error(W.snapshot(model, opt), uninterrupted, key) <= TOLERANCE[state_dtype]


def test_decoded_checkpoints_load_into_compact_templates(compact_saved, compact_loaded) -> None:
    """Checkpoints without codes (of torch.optim.AdamW; of an adamkit that saved everything
    decoded) into an int8 optimizer, whose template asks for codes: DCP's default planner
    refuses (strict) or silently keeps the fresh moments (partial); adamkit's LoadPlanner
    loads the floats and the optimizer encodes them."""
    _, ranks = compact_saved
    result = compact_loaded[0]
    refused = result["default-planner", "int8-decoded"]
    assert "Missing key in checkpoint state_dict: optim.state.0.weight.exp_avg_codes" in refused
    kept = result["default-planner", "torch"]
    want = ranks[0]["saved", "torch"]
    assert rel(kept["exp_avg"]["0.weight"], want["exp_avg"]["0.weight"]) > 0.5
    for name in ("int8-decoded", "torch"):
        got, want = result["planner", name], ranks[0]["saved", name]
        assert "exp_avg_codes" in result["planner-keys", name]
        assert_equal({"param": got["param"]}, {"param": want["param"]})
        for key in ("exp_avg", "exp_avg_sq"):
            err = rel(got[key]["0.weight"], want[key]["0.weight"])
            if name == "int8-decoded":  # decoded from codes of these very blocks: exact
                assert err == 0, (name, key, err)
            else:
                assert 0 < err <= TOLERANCE["int8"], (name, key, err)
