"""The fixed half of qat-autoresearch: data, budget, verified evaluation, results.

Everything that defines the score lives here and in prepare.py; train.py may change freely.
"""
