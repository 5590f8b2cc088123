"""Every Python block of the README and of docs/*.md runs, in order per page, as written; and the
examples do what the text says they do."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

ROOT = Path(os.environ.get("COST_FAST_CHECKOUT", Path(__file__).parents[1]))
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.S)


def run_page(page: Path, until: str | None = None) -> dict:
    """Run the page's Python blocks in order in one namespace, up to the first block holding
    ``until`` (all of them without it), from torch's seed 0."""
    torch.manual_seed(0)
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for block in python_blocks(page):
        exec(compile(block, str(page), "exec"), namespace)
        if until is not None and until in block:
            return namespace
    if until is not None:
        raise AssertionError(f"no Python block of {page.name} holds {until!r}")
    return namespace


@pytest.fixture(autouse=True)
def _scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Blocks that write files write them in a temporary folder; a method a page registers is
    unregistered afterwards."""
    import cost_fast.methods  # noqa: F401  (every built-in method registered before the snapshot)
    from cost_fast.registry import REGISTRY

    monkeypatch.chdir(tmp_path)
    names = set(REGISTRY)
    yield
    for name in set(REGISTRY) - names:
        REGISTRY.pop(name)


def test_every_page_is_linked_from_the_readme() -> None:
    text = README.read_text(encoding="utf-8")
    assert PAGES[1:] and all(f"docs/{page.name}" in text for page in PAGES[1:])


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_python_block_runs(page: Path) -> None:
    if page.name == "lightning.md" and not os.environ.get("COST_FAST_CHECKOUT"):
        pytest.importorskip("lightning")  # the README's test command installs it: never skipped there
    run_page(page)


def test_readme_quick_start_trains() -> None:
    namespace = run_page(README)
    model, x, y, cost = namespace["model"], namespace["x"], namespace["y"], namespace["cost"]
    assert cost.step_count == 3 * len(namespace["batches"]) and cost.epoch == 3
    assert model.task_losses(x, y).mean() < 0.2  # from ~0.69 (chance) at initialization


def test_guide_mtl_backward_trains() -> None:
    namespace = run_page(DOCS / "guide.md", until="mtl_backward(losses")
    final = namespace["model"].task_losses(namespace["x"], namespace["y"]).detach()
    assert torch.isfinite(final).all() and final.mean() < 0.2
    weights = namespace["result"].weights
    assert weights.shape == (4,) and (weights > 0).all()


def test_guide_plug_in_method_runs_alone_and_under_cost() -> None:
    from cost_fast import COST, mtl_backward
    from cost_fast.models import MultiTaskMLP, batch_task_losses, conflicting_binary_tasks

    namespace = run_page(DOCS / "guide.md", until="class InverseNorm(Aggregator)")
    gram = torch.tensor([[4.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(namespace["InverseNorm"]().weights(gram), torch.tensor([1 / 3, 2 / 3]))
    x, y = conflicting_binary_tasks(64, in_features=8, num_tasks=3)
    model = MultiTaskMLP(8, num_tasks=3, hidden=16)
    result = mtl_backward(model.task_losses(x, y), model.backbone, "inverse_norm")
    norms = result.stats.norms.double()
    torch.testing.assert_close(result.weights.double(), (1 / norms) / (1 / norms).sum(), rtol=1e-5, atol=0)
    batches = [(x[:32], y[:32]), (x[32:], y[32:])]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    cost = COST(model, model.backbone, "inverse_norm", optimizer, loss_fn=batch_task_losses, teleport_data=batches)
    for batch in batches * 2:
        assert cost.step(batch_task_losses(model, batch), batch).skipped is None


def test_guide_pieces_train() -> None:
    namespace = run_page(DOCS / "guide.md", until="engine.combine(w)")
    final = namespace["model"].task_losses(namespace["x"], namespace["y"]).detach()
    assert torch.isfinite(final).all() and final.mean() < 0.1  # ~0.01 measured
    w = namespace["w"]
    assert w.shape == (4,) and (w > 0).all()


def test_cost_page_examples_train_and_checkpoint() -> None:
    from cost_fast import checkpoint

    page = DOCS / "cost.md"

    def mean_loss(namespace: dict) -> torch.Tensor:
        model = namespace["model"]
        return torch.stack([model.task_losses(*b) for b in namespace["train_batches"]]).mean().detach()

    start = mean_loss(run_page(page, until="train_batches = "))
    namespace = run_page(page, until="info = cost.step(")
    batches = namespace["train_batches"]
    assert namespace["cost"].step_count == 3 * len(batches) and namespace["cost"].epoch == 3  # counted by COST
    namespace = run_page(page)  # then the own step (accumulation, scaler, autocast) and the checkpoint
    cost, optimizer, model = namespace["cost"], namespace["optimizer"], namespace["model"]
    assert cost.step_count == 3 * len(batches) and optimizer.state
    assert all(torch.isfinite(p).all() for p in model.parameters()) and mean_loss(namespace) < start
    saved = checkpoint.load("run.pt")
    assert saved["cost"]["checksum"] == cost.state_dict()["checksum"]
    assert all(torch.equal(saved["model"][k], v) for k, v in model.state_dict().items())


def test_lightning_page_trains_with_cost() -> None:
    if not os.environ.get("COST_FAST_CHECKOUT"):
        pytest.importorskip("lightning")
    namespace = run_page(DOCS / "lightning.md")
    module, trainer = namespace["module"], namespace["trainer"]
    assert module.cost.step_count == 2 * len(namespace["loader"]) == trainer.global_step
    assert module.cost.epoch == 2


def test_delta_m_example_matches_the_hand_computation() -> None:
    namespace = run_page(DOCS / "guide.md", until="delta_m(")
    by_hand = 100 * (-(0.40 - 0.38) / 0.38 + (0.50 - 0.55) / 0.55) / 2
    assert namespace["change"] == pytest.approx(by_hand, rel=1e-12)


def test_readme_methods_table_lists_every_registered_method_with_its_kind() -> None:
    from cost_fast import list_aggregators

    table: dict[str, str] = {}
    for line in README.read_text(encoding="utf-8").splitlines():
        row = re.match(r"\| `(gram|grads|loss)`: [^|]*\| ([^|]*)\|", line)
        if row:
            for name in re.findall(r"`([a-z_0-9]+)`", row.group(2)):
                table[name] = row.group(1)
    assert table == dict(list_aggregators())
