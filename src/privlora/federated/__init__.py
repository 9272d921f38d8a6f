"""Federated LoRA on Flower (issue 6): ``privlora federate`` → :func:`privlora.federated.run.federate`."""

from privlora.extras import require

require("federated", "flwr")  # every module here imports Flower: a missing extra is one line naming it
