"""A COST training run in its own process, for tests/test_resume.py.

    python resume_worker.py OUT STEPS [--save-at K] [--resume CHECKPOINT]

Trains the tug-of-war problem (FairGrad + COST, public semantics, a teleport per 3-step epoch)
for STEPS steps in total and writes OUT: the final parameters, the optimizer state and the step
infos. ``--save-at K`` also writes OUT.ckpt after K steps (model, optimizer and COST state dicts,
and the global generator's state, as a user's training script would). ``--resume CHECKPOINT``
starts from such a file in this fresh process instead of from the beginning. The data order is
drawn from torch's global generator, as a shuffling loader would.
"""

from __future__ import annotations

import sys

import torch
from tug import Tug, tug_batches

from cost_fast import COST, TeleportConfig, TeleportSchedule, get_aggregator


def loss_fn(model: torch.nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return model.task_losses(x, y)


def main(argv: list[str]) -> None:
    out, total = argv[0], int(argv[1])
    save_at = int(argv[argv.index("--save-at") + 1]) if "--save-at" in argv else None
    resume = argv[argv.index("--resume") + 1] if "--resume" in argv else None
    torch.set_num_threads(1)
    torch.manual_seed(15)
    batches = tug_batches(16, 3)
    model = Tug()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    cost = COST(
        model,
        model.backbone,
        get_aggregator("fairgrad"),
        optimizer,
        loss_fn=loss_fn,
        teleport_data=batches,
        schedule=TeleportSchedule(start_step=1),
        teleport=TeleportConfig(rounds=1, guard=False),
        seed=3,
    )
    start = 0
    if resume is not None:
        saved = torch.load(resume, weights_only=True)
        model.load_state_dict(saved["model"], strict=True)
        optimizer.load_state_dict(saved["optimizer"])
        cost.load_state_dict(saved["cost"])
        torch.set_rng_state(saved["rng"])
        start = saved["step"]
    infos = []
    for step in range(start, total):
        if step == save_at:
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "cost": cost.state_dict(),
                "rng": torch.get_rng_state(),
                "step": step,
            }
            torch.save(state, out + ".ckpt")
        batch = batches[int(torch.randint(0, len(batches), (1,)))]  # a shuffling loader's draw
        info = cost.step(loss_fn(model, batch), batch)
        infos.append([info.step, info.teleported, info.htr or ""])
    torch.save(
        {
            "params": [p.detach().clone() for p in model.parameters()],
            "adam": [optimizer.state[p]["exp_avg_sq"].clone() for p in model.parameters()],
            "infos": infos,
            "rng": torch.get_rng_state(),
        },
        out,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
