"""Federated LoRA on Flower (issue 6): ``privlora federate`` → :func:`privlora.federated.run.federate`."""
