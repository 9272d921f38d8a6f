"""Split-and-privatize (SAP) fine-tuning: the user's bottom model, privatizers, the provider's server.

Layout: ``models`` (the two halves), ``privatizers`` (dχ, CTI, none), ``wire`` (safetensors on the wire,
validated), ``service`` (the top model's step protocol), ``server`` (FastAPI around it), ``client``
(HTTP endpoint), ``train`` (the user's loop), ``run`` (train/predict run directories), ``attacks``
(EIA, AIA), ``sweep`` (privacy–utility table).
"""
