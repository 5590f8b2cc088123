"""cost_fast.checkpoint: COST's state is made of its parts' states, checked whole before any of it
is applied (each part judging its own), checksummed, and written to files atomically."""

from __future__ import annotations

import copy

import pytest
import torch
from tug import Tug, build, same_state

from cost_fast import COST, TeleportSchedule, checkpoint, get_aggregator
from cost_fast.models import batch_task_losses

LATE = TeleportSchedule(max_per_epoch=1, start_step=100)  # HTR keeps g', no teleport runs


def stamped(state: dict) -> dict:
    """A state as another COST would have written it: its checksum over what it holds."""
    return {**state, "checksum": checkpoint.checksum(state)}


def test_the_state_is_the_header_and_each_parts_own() -> None:
    model, batches, cost, _ = build("moco", schedule=LATE)
    cost.step(batch_task_losses(model, batches[0]), batches[0])
    state = cost.state_dict()
    assert set(state) == checkpoint.KEYS and state["format"] == checkpoint.FORMAT
    assert state["clock"] == {"step_count": 1, "epoch": 0, "teleports_this_epoch": 0}
    assert same_state(state["teleporter"], cost.teleporter.state_dict())
    assert same_state(state["base"], cost.base.state_dict())
    assert state["htr"]["pending_sigma"] is None
    torch.testing.assert_close(state["htr"]["last_update"], cost.engine.combined, rtol=0, atol=0)
    assert (state["num_tasks"], state["num_params"]) == (4, sum(p.numel() for p in model.backbone.parameters()))


def test_a_state_that_does_not_fit_is_refused_whole() -> None:
    model, batches, cost, opt = build("moco", schedule=LATE)
    for batch in batches[:2]:
        cost.step(batch_task_losses(model, batch), batch)
    good = cost.state_dict()
    other_method = build("pcgrad")[2].state_dict()
    bigger = Tug().double()
    bigger.backbone[0] = torch.nn.Linear(6, 9).double()
    bigger.backbone[2] = torch.nn.Linear(9, 3).double()
    wider = COST(
        bigger,
        bigger.backbone,
        get_aggregator("moco"),
        torch.optim.Adam(bigger.parameters()),
        loss_fn=batch_task_losses,
        teleport_data=batches,
    )
    cases = {  # each with its checksum, as another COST would have written it
        "base method 'PCGrad'": stamped({**good, "method": "PCGrad", "base": other_method["base"]}),
        "step_count must be an int": stamped({**good, "clock": {**good["clock"], "step_count": "3"}}),
        "a clock state that is not": stamped({**good, "clock": {"step_count": 1}}),
        "3 tasks, this COST 4": stamped({**good, "num_tasks": 3}),
        "not a COST state": {k: v for k, v in good.items() if k != "teleporter"},
        "generator state": stamped({**good, "teleporter": {"generator": torch.zeros(3)}}),
        "pending HTR σ": stamped({**good, "htr": {**good["htr"], "pending_sigma": 1.5}}),
        "HTR last update": stamped({**good, "htr": {**good["htr"], "last_update": torch.zeros(3)}}),
        "refuses": stamped({**good, "base": {"tracked": None}}),
        "format 2": stamped({**good, "format": 2}),
        "damaged": {**good, "clock": {**good["clock"], "epoch": 7}},  # a changed value, checksum as it was
    }
    for expected, state in cases.items():
        target_model, target_batches, target, _ = build("moco", seed=1, schedule=LATE)
        target.step(batch_task_losses(target_model, target_batches[0]), target_batches[0])
        snapshot = copy.deepcopy(target.state_dict())
        with pytest.raises(ValueError, match=expected):
            target.load_state_dict(state)
        assert same_state(target.state_dict(), snapshot), f"{expected}: something was loaded"
    with pytest.raises(ValueError, match="shared parameters, this backbone"):
        wider.load_state_dict(good)
    with pytest.warns(UserWarning, match="HTR is off"):
        sgd = build("moco", optimizer=torch.optim.SGD, schedule=LATE)[2]
    with pytest.raises(ValueError, match="a htr state, but this COST has none"):
        sgd.load_state_dict(good)


def test_a_state_loads_into_a_fresh_cost_and_continues_alike() -> None:
    model, batches, cost, opt = build("pcgrad", schedule=LATE)
    for batch in batches[:3]:
        cost.step(batch_task_losses(model, batch), batch)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), cost.state_dict()))
    model2, _, fresh, opt2 = build("pcgrad", seed=1, schedule=LATE)
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    fresh.load_state_dict(saved[2])
    assert same_state(fresh.state_dict(), cost.state_dict())
    for batch in batches:
        cost.step(batch_task_losses(model, batch), batch)
        fresh.step(batch_task_losses(model2, batch), batch)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


def test_a_flipped_byte_in_a_saved_state_is_caught(tmp_path) -> None:
    model, batches, cost, opt = build("moco", schedule=LATE)
    cost.step(batch_task_losses(model, batches[0]), batches[0])
    path = tmp_path / "run.pt"
    checkpoint.save(path, {"cost": cost.state_dict()})
    data = bytearray(path.read_bytes())
    last = cost.state_dict()["htr"]["last_update"]
    offset = bytes(data).find(last.numpy().tobytes()[:16])  # inside the tensor's stored bytes
    assert offset > 0
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    _, _, fresh, _ = build("moco", schedule=LATE)
    with pytest.raises(ValueError, match="damaged"):
        fresh.load_state_dict(checkpoint.load(path)["cost"])
    assert fresh.step_count == 0


def test_checkpoint_files_are_written_whole_and_read_with_one_error(tmp_path) -> None:
    path = tmp_path / "run.pt"
    checkpoint.save(path, {"step": 1})
    with pytest.raises(Exception):  # noqa: B017 - whatever torch.save raises for an object it cannot write
        checkpoint.save(path, {"step": 2, "bad": lambda: None})
    assert checkpoint.load(path) == {"step": 1}  # the earlier file is whole
    assert [p.name for p in tmp_path.iterdir()] == ["run.pt"]  # no temporary file left behind
    whole = path.read_bytes()
    cases = {"truncated": whole[: len(whole) // 2], "empty": b"", "not a checkpoint": b"plain text\n"}
    for name, content in cases.items():
        path.write_bytes(content)
        with pytest.raises(ValueError, match=f"cannot load the checkpoint {path}") as refused:
            checkpoint.load(path)
        assert "\n" not in str(refused.value), name  # one line
    with pytest.raises(ValueError, match="no such file"):
        checkpoint.load(tmp_path / "missing.pt")
    torch.save([1, 2], path)
    with pytest.raises(ValueError, match="not written by cost_fast.checkpoint.save"):
        checkpoint.load(path)


def test_a_state_is_made_only_from_exactly_the_fields_of_its_format() -> None:
    model, batches, cost, _ = build("moco", schedule=LATE)
    cost.step(batch_task_losses(model, batches[0]), batches[0])
    state = cost.state_dict()
    assert state["checksum"] == checkpoint.checksum(state)
    fields = {k: v for k, v in state.items() if k not in ("format", "checksum")}
    assert checkpoint.make_state(**fields)["checksum"] == state["checksum"]
    with pytest.raises(TypeError, match="exactly the fields"):
        checkpoint.make_state(**{k: v for k, v in fields.items() if k != "clock"})
    with pytest.raises(TypeError, match="exactly the fields"):
        checkpoint.make_state(**fields, extra=1)


def test_a_flipped_bit_anywhere_in_a_checkpoint_file_is_one_error_or_nothing_changed(tmp_path) -> None:
    """Model, optimizer and COST states in one file, 400 random single-bit flips: each load
    either raises one ValueError, or gives back exactly what was saved (a flip in bytes the
    file's format does not read)."""
    model, batches, cost, opt = build("pcgrad", schedule=LATE)
    for batch in batches[:2]:
        cost.step(batch_task_losses(model, batch), batch)
    saved = {"model": model.state_dict(), "optimizer": opt.state_dict(), "cost": cost.state_dict()}
    path = tmp_path / "run.pt"
    checkpoint.save(path, saved)
    whole = path.read_bytes()
    assert same_state(checkpoint.load(path), saved)
    rng = torch.Generator().manual_seed(0)
    refused = 0
    for offset, bit in zip(
        torch.randint(0, len(whole), (400,), generator=rng).tolist(),
        torch.randint(0, 8, (400,), generator=rng).tolist(),
    ):
        damaged = bytearray(whole)
        damaged[offset] ^= 1 << bit
        path.write_bytes(bytes(damaged))
        try:
            loaded = checkpoint.load(path)
        except ValueError as err:
            assert str(err).startswith(f"cannot load the checkpoint {path}") and "\n" not in str(err)
            refused += 1
            continue
        assert same_state(loaded, saved), f"a flip at byte {offset} loaded other values silently"
    assert refused > 200  # most flips land in what the file holds (the rest in zip padding and names)


def test_saving_onto_a_symbolic_link_writes_its_target_and_keeps_the_link(tmp_path) -> None:
    real = tmp_path / "runs" / "last.pt"
    real.parent.mkdir()
    checkpoint.save(real, {"step": 1})
    link = tmp_path / "latest.pt"
    link.symlink_to(real)
    checkpoint.save(link, {"step": 2})
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert checkpoint.load(real) == {"step": 2} and checkpoint.load(link) == {"step": 2}
    assert sorted(p.name for p in real.parent.iterdir()) == ["last.pt"]  # no temporary file left
    torch.save({"step": 3}, tmp_path / "plain.pt")  # not written by save: refused, with what to do
    with pytest.raises(ValueError, match="not written by cost_fast.checkpoint.save"):
        checkpoint.load(tmp_path / "plain.pt")
