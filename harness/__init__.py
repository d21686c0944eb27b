"""The fixed half of qat-autoresearch: data, budget, verified evaluation, results.

harness/*.py is the scoring core: everything that defines the score lives there and in
prepare.py (hashed into the data's manifest); harness/agent/ and harness/tools/ only drive and
view runs. train.py may change freely.
"""
