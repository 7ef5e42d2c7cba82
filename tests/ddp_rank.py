"""One rank of a data-parallel PPO update, run as a script under torchrun's environment variables
(``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) by ``tests/test_distributed.py``.

``python tests/ddp_rank.py OUT SIZES`` builds the test model and the fixed batch of
``tests/test_ppo.py`` (the same on every rank), takes this rank's slice (``SIZES``: comma-separated
positions per rank), runs one ``ppo_update`` through ``DistributedDataParallel`` and saves the
parameters, the metrics and the parameter digest to ``OUT/rank{RANK}.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from keisei_stream.config import PPOConfig  # noqa: E402
from keisei_stream.rl import distributed  # noqa: E402
from keisei_stream.rl.model import build_model  # noqa: E402
from keisei_stream.rl.ppo import make_optimizer, ppo_update  # noqa: E402
from test_ppo import _TINY, _fixed_batch  # noqa: E402

PPO = dict(epochs=2, minibatch_size=4096, target_kl=None, clip_epsilon=0.2, learning_rate=1e-3)


def main() -> None:
    out, sizes = Path(sys.argv[1]), [int(x) for x in sys.argv[2].split(",")]
    distributed.init_from_env(torch.device("cpu"), timeout_s=60)
    rank = distributed.rank()
    torch.manual_seed(0)
    model = build_model(_TINY)
    batch, _ = _fixed_batch(model, n=sum(sizes))
    lo = sum(sizes[:rank])
    local = {k: v[lo:lo + sizes[rank]] for k, v in batch.items()}
    cfg = PPOConfig(**PPO)
    opt = make_optimizer(model, cfg)
    metrics = ppo_update(DistributedDataParallel(model, broadcast_buffers=False), opt, None, local, cfg, "cpu",
                         amp=False)
    torch.save({"params": {k: v.detach().clone() for k, v in model.named_parameters()}, "metrics": metrics,
                "digest": distributed.params_digest(model)}, out / f"rank{rank}.pt")
    distributed.shutdown()


if __name__ == "__main__":
    main()
